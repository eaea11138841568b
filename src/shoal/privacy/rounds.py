"""Differential privacy as the round engine sees it: an aggregation plug and a budget.

:class:`DPAggregation` satisfies the coordinator's ``Aggregation`` protocol. It carries the
privacy state across rounds -- the clip norm (adaptive clipping moves it) and the
:class:`~shoal.privacy.accountant.PrivacyLedger` of rounds released -- and reports the ε spent
after every round.

* ``central``: every arriving update is clipped to C and folded into an unweighted sum;
  Gaussian noise N(0, (z·C)²) is added to the sum, divided by the expected cohort size
  (McMahan et al., ICLR 2018, "Learning Differentially Private Recurrent Language Models").
* ``local``: clients clipped and noised their own updates (:mod:`shoal.uplink`); the server
  takes their unweighted mean and accounts each upload as a Gaussian release.

Noise comes from ``rng_for_round(round)``: the run's seeded stream in simulation
(reproducible), :func:`~shoal.privacy.dp.secure_generator` in deployment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shoal.errors import BudgetExhausted, PrivacyError, UpdateRejected
from shoal.privacy.accountant import PrivacyLedger, RoundEvent
from shoal.privacy.dp import CentralDP, CentralDPState, RoundAccumulator

__all__ = ["DPAggregation", "BudgetPolicy"]


@dataclass(frozen=True)
class BudgetPolicy:
    """An ε budget at δ. ``epsilon <= 0`` means no budget (ε is still reported)."""

    epsilon: float
    delta: float

    @property
    def enforced(self) -> bool:
        return self.epsilon > 0


class _CentralAdapter:
    """Folds coordinator updates into a central-DP round accumulator (weights ignored:
    DP-FedAvg weighs every client equally so that one client's influence is bounded by C)."""

    def __init__(self, central: CentralDP, state: CentralDPState, dim: int) -> None:
        self._begin = lambda: central.begin_round(state, dim)
        self.acc: RoundAccumulator = self._begin()
        self.count = 0

    def add(self, update: np.ndarray, weight: float) -> None:
        self.acc.add(update)
        self.count += 1

    def add_stacked(self, updates: np.ndarray, weights: np.ndarray) -> None:
        # all-or-nothing like WeightedMean.add_stacked: fold into a scratch accumulator first
        scratch = self._begin()
        for row in updates:
            scratch.add(row)
        self.acc.merge(scratch)
        self.count += len(updates)


class _UniformMean:
    """Unweighted mean of (locally privatized) uploads."""

    def __init__(self, dim: int) -> None:
        self.sum = np.zeros(dim, dtype=np.float64)
        self.count = 0

    def add(self, update: np.ndarray, weight: float) -> None:
        self.add_stacked(update[None, :], np.ones(1))

    def add_stacked(self, updates: np.ndarray, weights: np.ndarray) -> None:
        if updates.ndim != 2 or updates.shape[1] != self.sum.shape[0]:
            raise UpdateRejected("wrong_shape", f"expected rows of {self.sum.shape[0]} values, "
                                 f"got shape {updates.shape}")
        total = updates.sum(axis=0, dtype=np.float64)
        if not np.isfinite(total).all():
            raise UpdateRejected("non_finite", "an update holds NaN or infinity")
        self.sum += total
        self.count += len(updates)


class DPAggregation:
    """Central or local DP for the coordinator, with its ledger and budget.

    Args:
        placement: ``"central"`` or ``"local"``.
        event: what one round releases, for the accountant (Poisson rate or fixed-size
            sample, and the noise multiplier).
        budget: the ε budget and the δ at which ε is reported.
        accountant: ``"rdp"`` or ``"pld"``.
        rng_for_round: the noise generator of a round (central placement).
        central: the central mechanism (central placement only).
    """

    def __init__(self, placement: str, event: RoundEvent, budget: BudgetPolicy,
                 accountant: str = "rdp",
                 rng_for_round: Callable[[int], np.random.Generator] | None = None,
                 central: CentralDP | None = None) -> None:
        if placement not in ("central", "local"):
            raise PrivacyError(f"placement must be 'central' or 'local', got {placement!r}")
        if placement == "central" and (central is None or rng_for_round is None):
            raise PrivacyError("central DP needs a CentralDP mechanism and a noise generator")
        self.placement = placement
        self.event = event
        self.budget = budget
        self.central = central
        self.rng_for_round = rng_for_round
        self.ledger = PrivacyLedger(accountant)
        self.dp_state: CentralDPState | None = central.init() if central else None
        # A central round is released even if nobody reported: noise alone.
        self.always_commits = placement == "central"

    # -- the Aggregation protocol ---------------------------------------------------------

    def begin(self, round: int, dim: int):
        if self.placement == "local":
            return _UniformMean(dim)
        assert self.central is not None and self.dp_state is not None  # set for "central"
        return _CentralAdapter(self.central, self.dp_state, dim)

    def finish(self, acc, round: int) -> tuple[np.ndarray, dict[str, float]]:
        info: dict[str, float] = {}
        if self.placement == "local":
            mean = (acc.sum / acc.count).astype(np.float32)
        else:
            assert self.rng_for_round is not None  # checked in __init__ for "central"
            res = acc.acc.finish(self.rng_for_round(round))
            self.dp_state = res.state
            mean = res.mean
            info["clip_norm"] = res.clip_norm
            info["noise_std"] = res.noise_std
            if res.unclipped_fraction is not None:
                info["unclipped_fraction"] = res.unclipped_fraction
        self.ledger = self.ledger.record(self.event)
        info["epsilon"] = self.ledger.epsilon(self.budget.delta)
        return mean, info

    # -- budget ---------------------------------------------------------------------------

    def next_round_allowed(self) -> bool:
        """False when the budget is enforced and one more round would exceed it."""
        if not self.budget.enforced:
            return True
        return not self.ledger.would_exceed(self.budget.epsilon, self.budget.delta,
                                            self.event)

    def check_plan(self, rounds: int) -> float:
        """ε after ``rounds`` more rounds; raises :class:`BudgetExhausted` if over budget."""
        eps = self.ledger.record(self.event, rounds).epsilon(self.budget.delta)
        if self.budget.enforced and eps > self.budget.epsilon:
            lo, hi = 0, rounds  # eps(lo) <= budget < eps(hi); bisect on the round count
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self.ledger.record(self.event, mid).epsilon(self.budget.delta) \
                        <= self.budget.epsilon:
                    lo = mid
                else:
                    hi = mid
            affordable = lo
            raise BudgetExhausted(
                f"the plan of {rounds} rounds would spend epsilon={eps:.4g} at delta="
                f"{self.budget.delta:g}, over the budget {self.budget.epsilon:g}; the budget "
                f"affords {affordable} rounds (lower rounds or sampling.q, raise "
                f"privacy.noise_multiplier, or set privacy.on_budget = 'stop')",
                epsilon=eps, budget=self.budget.epsilon)
        return eps

    def state_dict(self) -> dict:
        """Checkpointable state: the ledger and the clip norm."""
        return {"ledger": self.ledger.to_dict(),
                "clip_norm": None if self.dp_state is None else self.dp_state.clip_norm,
                "dp_round": None if self.dp_state is None else self.dp_state.round}

    def load_state_dict(self, d: dict) -> None:
        """Restore :meth:`state_dict` (a resumed run keeps its spent budget and clip norm).

        Raises:
            PrivacyError: the saved ledger was kept with another accountant.
        """
        ledger = PrivacyLedger.from_dict(d["ledger"])
        if ledger.accountant != self.ledger.accountant:
            raise PrivacyError(f"the checkpoint's privacy ledger used the "
                               f"{ledger.accountant!r} accountant, this run "
                               f"{self.ledger.accountant!r}")
        self.ledger = ledger
        if self.dp_state is not None and d.get("clip_norm") is not None:
            self.dp_state = CentralDPState(clip_norm=float(d["clip_norm"]),
                                           round=int(d.get("dp_round") or 0))
