"""Robust rules that must see every update: the pipeline's sum rule for median, trimmed
mean, Krum, Multi-Krum and Bulyan (:mod:`shoal.robust.rules`).

:class:`HeldRule` keeps the round's updates in one float32 buffer that grows by doubling
(memory O(updates x model): it says so in ``holds_updates``), weighs every client equally
(a claimed example count is a lever for an attacker, and these rules count votes), and at the
end of the round checks the rule's assumption for the ``n`` updates it holds and
``f = ceil(byzantine_fraction x n)``; a round that breaks it is refused with
:class:`AssumptionBroken` and nothing is revealed (the coordinator records the round as
aborted and the policy retries it with a fresh cohort).

A group's mean (:class:`~shoal.events.PartialAggregate`: secure aggregation, an edge) is one
vector standing for many clients: a robust rule cannot weigh it, so it is refused
(``group_refused``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shoal.errors import ConfigError, ProtocolError, UpdateRejected
from shoal.pipeline import Sum
from shoal.robust import rules

__all__ = ["AssumptionBroken", "HeldRule", "byzantine_count"]


class AssumptionBroken(ProtocolError):
    """A robust rule was asked to aggregate a round its assumption does not cover.

    Attributes:
        rule: the rule's name; n: updates in the round; f: Byzantine clients assumed.
    """

    def __init__(self, message: str, *, rule: str, n: int, f: int) -> None:
        super().__init__(message)
        self.rule, self.n, self.f = rule, n, f


def byzantine_count(n: int, fraction: float) -> int:
    """``f`` for ``n`` updates when up to ``fraction`` of them may be Byzantine (rounded
    up: a rule that assumes too few attackers is the one that fails)."""
    return int(math.ceil(fraction * n - 1e-9))


class _HeldRun:
    def __init__(self, rule: HeldRule, dim: int) -> None:
        self.rule = rule
        self.dim = dim
        self.buf = np.empty((0, dim), np.float32)
        self.n = 0

    @property
    def count(self) -> int:
        return self.n

    def add(self, rows: np.ndarray, weights: np.ndarray) -> None:
        k = len(rows)
        if self.n + k > len(self.buf):
            grown = np.empty((max(2 * len(self.buf), self.n + k, 8), self.dim), np.float32)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        self.buf[self.n:self.n + k] = rows
        self.n += k

    def refuse_partial(self, clients: int) -> None:
        raise UpdateRejected("group_refused", f"the robust rule {self.rule.name!r} needs "
                             f"every client's update; a group's mean of {clients} clients "
                             f"cannot be weighed against them")

    def finish(self) -> Sum:
        mean, f = self.rule.aggregate(self.buf[:self.n])
        self.buf = np.empty((0, self.dim), np.float32)  # release the round's updates
        n = self.n
        return Sum(mean * n, float(n), n, {"robust_n": float(n), "robust_f": float(f)})


@dataclass(frozen=True)
class HeldRule:
    """A robust rule as the pipeline's sum rule.

    Args:
        rule: ``"median"``, ``"trimmed_mean"``, ``"krum"``, ``"multi_krum"`` or ``"bulyan"``.
        byzantine_fraction: at most this fraction of a round's updates is assumed Byzantine.
        beta: trimmed mean: the fraction trimmed at each end (at least
            ``byzantine_fraction``; ``None`` = equal to it).
        m: Multi-Krum: updates averaged (0 = ``n - f``).

    Raises:
        ConfigError: an unknown rule, a fraction outside [0, 0.5), ``beta`` below the
            Byzantine fraction, or ``m`` below 0.
    """

    rule: str
    byzantine_fraction: float
    beta: float | None = None
    m: int = 0
    holds_updates: bool = True

    def __post_init__(self) -> None:
        if self.rule not in rules.RULES:
            raise ConfigError(f"robust.rule must be one of {sorted(rules.RULES)}, got "
                              f"{self.rule!r}", key="robust.rule")
        if not 0.0 <= self.byzantine_fraction < 0.5:
            raise ConfigError(f"robust.byzantine_fraction must be in [0, 0.5), got "
                              f"{self.byzantine_fraction!r}", key="robust.byzantine_fraction")
        if self.beta is not None and not self.byzantine_fraction <= self.beta < 0.5:
            raise ConfigError(f"robust.trim must be in [byzantine_fraction = "
                              f"{self.byzantine_fraction:g}, 0.5), got {self.beta!r} (trimming "
                              f"fewer than the attackers lets them through)", key="robust.trim")
        if self.m < 0:
            raise ConfigError(f"robust.krum_m must be >= 0, got {self.m!r}",
                              key="robust.krum_m")

    @property
    def name(self) -> str:
        return self.rule

    def begin(self, dim: int, step: int) -> _HeldRun:
        return _HeldRun(self, dim)

    def aggregate(self, rows: np.ndarray) -> tuple[np.ndarray, int]:
        """The rule's aggregate of ``rows`` ``(n, d)`` (float64) and the ``f`` it assumed.

        Raises:
            AssumptionBroken: the round breaks the rule's assumption.
        """
        n = len(rows)
        f = byzantine_count(n, self.byzantine_fraction)
        beta = self.byzantine_fraction if self.beta is None else self.beta
        why = rules.requirement(self.rule, n, f, beta=beta)
        if why:
            raise AssumptionBroken(f"{why} (robust.byzantine_fraction = "
                                   f"{self.byzantine_fraction:g}); the round is refused",
                                   rule=self.rule, n=n, f=f)
        if self.rule == "median":
            return rules.coordinate_median(rows), f
        if self.rule == "trimmed_mean":
            return rules.trimmed_mean(rows, rules.trim_count(n, beta)), f
        if self.rule == "krum":
            return rules.krum(rows, f), f
        if self.rule == "multi_krum":
            return rules.multi_krum(rows, f, min(self.m or n - f, n)), f
        return rules.bulyan(rows, f), f
