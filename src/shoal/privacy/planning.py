"""Planning a DP-FedAvg run against an (ε, δ) budget, before any round runs.

DP-FedAvg is McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models" (ICLR 2018); its rounds are accounted by :mod:`shoal.privacy.accountant` (RDP:
Mironov, "Rényi Differential Privacy", 2017; PLD: Doroshenko et al., "Connect the Dots", 2022).
This module inverts that accounting: the smallest noise multiplier that reaches a target ε
(:func:`noise_multiplier_for`), the most rounds a budget affords (:func:`max_rounds`), the
refusal of a plan over budget (:func:`plan_check`) and the summary behind ``shoal privacy``
(:func:`privacy_report`). Both inversions are searches that rely on ε being non-increasing in
the noise multiplier and non-decreasing in rounds (see :mod:`shoal.privacy.accountant`).
All functions are pure; every ε they evaluate is cached by the accountant.
"""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

from shoal.errors import BudgetExhausted, PrivacyError
from shoal.privacy.accountant import (
    AccountantName,
    RoundEvent,
    Sampling,
    _event,
    epsilon,
    event_epsilon,
)

__all__ = ["max_rounds", "noise_multiplier_for", "plan_check", "privacy_report"]

_SIGMA_MIN, _SIGMA_MAX = 1e-3, 1e6


def noise_multiplier_for(
    target_epsilon: float,
    q: float,
    rounds: int,
    delta: float,
    accountant: AccountantName = "rdp",
    *,
    sampling: Sampling = "poisson",
    population: int | None = None,
    rtol: float = 1e-6,
) -> float:
    """Smallest noise multiplier z (to relative tolerance ``rtol``) with ε(z) ≤ target.

    Bisection in log z on a bracket [lo, hi] with ε(hi) ≤ target < ε(lo); valid because ε is
    non-increasing in z. The returned value is the upper end, so ε(result) ≤ target always.

    Raises:
        PrivacyError: target not positive, or no z ≤ 1e6 reaches it.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    if not (0 < rtol < 1):
        raise PrivacyError(f"rtol must be in (0, 1), got {rtol!r}")

    def eps(z: float) -> float:
        return epsilon(q, z, rounds, delta, accountant, sampling=sampling, population=population)

    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2.0
        if hi > _SIGMA_MAX:
            raise PrivacyError(
                f"no noise_multiplier <= {_SIGMA_MAX:g} reaches epsilon {target_epsilon:g}"
            )
    lo = hi / 2.0
    while eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2.0
        if lo < _SIGMA_MIN:
            return hi
    while hi / lo - 1.0 > rtol:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def max_rounds(
    budget_epsilon: float,
    q: float,
    noise_multiplier: float,
    delta: float,
    accountant: AccountantName = "rdp",
    *,
    sampling: Sampling = "poisson",
    population: int | None = None,
    limit: int = 10**7,
) -> int:
    """The largest T ≤ ``limit`` with ε(T) ≤ budget (0 if even one round exceeds it).

    Exponential then binary search over T (ε is non-decreasing in T): O(log T) evaluations.
    """
    event = _event(q, noise_multiplier, sampling, population)
    return _max_rounds(event, budget_epsilon, delta, accountant, limit=limit)


def _max_rounds(
    event: RoundEvent,
    budget_epsilon: float,
    delta: float,
    accountant: AccountantName,
    *,
    limit: int,
) -> int:
    def within(t: int) -> bool:
        return event_epsilon(event, t, delta, accountant) <= budget_epsilon

    if limit < 1 or not within(1):
        return 0
    lo, hi = 1, min(2, limit)
    while hi > lo and within(hi):
        if hi == limit:
            return limit
        lo, hi = hi, min(2 * hi, limit)
    if hi == lo:
        return lo
    while hi - lo > 1:  # within(lo) and not within(hi)
        mid = (lo + hi) // 2
        if within(mid):
            lo = mid
        else:
            hi = mid
    return lo


def plan_check(
    budget_epsilon: float,
    q: float,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    accountant: AccountantName = "rdp",
    *,
    sampling: Sampling = "poisson",
    population: int | None = None,
) -> float:
    """Refuse, before training, a plan whose final ε would exceed the budget.

    Returns:
        the planned ε (≤ budget).

    Raises:
        BudgetExhausted: ε after ``rounds`` rounds exceeds ``budget_epsilon``.
    """
    event = _event(q, noise_multiplier, sampling, population)
    eps = event_epsilon(event, rounds, delta, accountant)
    if eps > budget_epsilon:
        afford = _max_rounds(event, budget_epsilon, delta, accountant, limit=rounds)
        raise BudgetExhausted(
            f"planned {rounds} rounds (q={q:g}, noise_multiplier={noise_multiplier:g}, "
            f"delta={delta:g}, {accountant}) reach epsilon={eps:.4g} > budget "
            f"{budget_epsilon:g}; the budget affords {afford} rounds",
            epsilon=eps,
            budget=budget_epsilon,
        )
    return eps



def privacy_report(
    q: float,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    accountant: AccountantName = "rdp",
    target_epsilon: float | None = None,
    *,
    sampling: Sampling = "poisson",
    population: int | None = None,
) -> dict[str, Any]:
    """A JSON-ready summary of a plan (backs ``shoal privacy --json``).

    Keys: ``epsilon``, ``delta``, ``q``, ``noise_multiplier``, ``rounds``, ``accountant``,
    ``sampling``, ``population``, ``neighboring_relation``, ``dp_accounting_version``,
    ``warnings`` (list of str); with ``target_epsilon`` also ``target_epsilon``,
    ``noise_multiplier_for_target`` and ``max_rounds_at_target``.
    """
    event = _event(q, noise_multiplier, sampling, population)
    eps = event_epsilon(event, rounds, delta, accountant)
    warnings: list[str] = []
    if population is not None and delta >= 1.0 / population:
        warnings.append(
            f"delta={delta:g} >= 1/population={1.0 / population:g}: a mechanism that publishes one "
            "client's data in full satisfies this delta; use delta much smaller than 1/N"
        )
    if sampling == "local":
        warnings.append("local DP: q is ignored; every client is assumed in every round")
    report: dict[str, Any] = {
        "epsilon": eps,
        "delta": float(delta),
        "q": event.q,
        "noise_multiplier": float(noise_multiplier),
        "rounds": int(rounds),
        "accountant": accountant,
        "sampling": sampling,
        "population": population,
        "neighboring_relation": event.neighboring_relation,
        "dp_accounting_version": metadata.version("dp-accounting"),
        "warnings": warnings,
    }
    if target_epsilon is not None:
        report["target_epsilon"] = float(target_epsilon)
        report["noise_multiplier_for_target"] = noise_multiplier_for(
            target_epsilon, q, rounds, delta, accountant, sampling=sampling, population=population
        )
        report["max_rounds_at_target"] = max_rounds(
            target_epsilon,
            q,
            noise_multiplier,
            delta,
            accountant,
            sampling=sampling,
            population=population,
        )
    return report
