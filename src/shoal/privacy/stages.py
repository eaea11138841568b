"""Differential privacy as stages of the aggregation pipeline, with the ledger as state.

* :class:`CentralDPStage` -- DP-FedAvg with a fixed denominator (H. B. McMahan et al.,
  "Learning Differentially Private Recurrent Language Models", ICLR 2018): on the way in
  every update is clipped to L2 norm C and weighed equally (one client's influence is then
  bounded by C); on the way out Gaussian noise N(0, (z·C)^2) is added to the *sum* -- after
  secure aggregation when the pipeline has one -- and the sum is divided by the expected
  cohort size. With adaptive clipping C follows a quantile of update norms (G. Andrew et al.,
  "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021).
* :class:`LocalDPStage` -- clients clipped and noised their own updates; the server takes
  their unweighted mean and accounts each upload as a Gaussian release.
* :class:`DistributedDPStage` -- the distributed discrete Gaussian (P. Kairouz, Z. Liu and
  T. Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with
  Secure Aggregation", ICML 2021): clients clip, round and noise their own updates inside
  the secure sum (:mod:`shoal.privacy.ddg`); this stage weighs every client 1, refuses a sum
  that does not carry enough noise shares, divides by the expected cohort and accounts the
  release with that paper's bound.

Either stage records every release in an immutable
:class:`~shoal.privacy.accountant.PrivacyLedger` that is part of the stage's state (threaded
through the coordinator and checkpointed, never mutated in place), reports the ε spent, and
refuses a step the ε budget cannot afford.

Noise comes from ``rng_for_step(step)``: the run's seeded stream in simulation
(reproducible), :func:`~shoal.privacy.dp.secure_generator` (a CSPRNG) in deployment, where
the mechanism also releases on an exact grid with discrete Gaussian noise
(``CentralDP(discrete=True)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from shoal.errors import BudgetExhausted, PrivacyError, UpdateRejected
from shoal.pipeline import Sum
from shoal.privacy.accountant import PrivacyLedger, RoundEvent
from shoal.privacy.central import CentralDP, CentralDPState
from shoal.privacy.csprng import RandomSource
from shoal.privacy.ddg import DistributedDiscreteGaussian
from shoal.privacy.ddg_accounting import DistributedEvent

__all__ = ["BudgetPolicy", "DPState", "CentralDPStage", "DistributedDPStage", "LocalDPStage"]


@dataclass(frozen=True)
class BudgetPolicy:
    """An ε budget at δ. ``epsilon <= 0`` means no budget (ε is still reported)."""

    epsilon: float
    delta: float

    @property
    def enforced(self) -> bool:
        return self.epsilon > 0


@dataclass(frozen=True)
class DPState:
    """What a DP stage carries between steps: the ledger and (central) the clip norm."""

    ledger: PrivacyLedger
    clip_norm: float | None = None
    releases: int = 0


class _Accounting:
    """The ledger and budget, shared by both placements."""

    name: str
    event: RoundEvent | DistributedEvent
    budget: BudgetPolicy
    accountant: str

    def _account(self, state: DPState) -> tuple[PrivacyLedger, float]:
        ledger = state.ledger.record(self.event)
        return ledger, ledger.epsilon(self.budget.delta)

    def allows_step(self, state: DPState) -> str:
        if self.budget.enforced and state.ledger.would_exceed(
                self.budget.epsilon, self.budget.delta, self.event):
            return (f"privacy budget: round {state.releases + 1} would exceed epsilon "
                    f"{self.budget.epsilon:g}")
        return ""

    def check_plan(self, state: DPState, rounds: int) -> float:
        """ε after ``rounds`` more releases on top of ``state``'s ledger (a resumed run's
        spent budget included, priced at this stage's possibly changed settings); raises
        :class:`BudgetExhausted` if over budget (the message says what was already spent
        and how many more rounds the budget affords)."""
        ledger, delta = state.ledger, self.budget.delta
        if rounds <= 0:
            return ledger.epsilon(delta)
        eps = ledger.record(self.event, rounds).epsilon(delta)
        if self.budget.enforced and eps > self.budget.epsilon:
            lo, hi = 0, rounds  # eps(lo) <= budget < eps(hi); bisect on the round count
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if ledger.record(self.event, mid).epsilon(delta) <= self.budget.epsilon:
                    lo = mid
                else:
                    hi = mid
            spent = (f" on top of the epsilon={ledger.epsilon(delta):.4g} already spent in "
                     f"{ledger.rounds} rounds" if ledger.rounds else "")
            more = " more" if ledger.rounds else ""
            raise BudgetExhausted(
                f"the plan of {rounds}{more} rounds{spent} would spend epsilon={eps:.4g} at "
                f"delta={delta:g}, over the budget {self.budget.epsilon:g}; the budget affords "
                f"{lo}{more} rounds (lower rounds or sampling.q, raise "
                f"privacy.noise_multiplier, or set privacy.on_budget = 'stop')",
                epsilon=eps, budget=self.budget.epsilon)
        return eps

    def state_dict(self, state: DPState) -> dict:
        return {"ledger": state.ledger.to_dict(), "clip_norm": state.clip_norm,
                "releases": state.releases}

    def load_state_dict(self, d: dict) -> DPState:
        """Restore :meth:`state_dict` (a resumed run keeps its spent budget and clip norm).

        Raises:
            PrivacyError: the saved ledger was kept with another accountant.
        """
        ledger = PrivacyLedger.from_dict(d["ledger"])
        if ledger.accountant != self.accountant:
            raise PrivacyError(f"the checkpoint's privacy ledger used the "
                               f"{ledger.accountant!r} accountant, this run "
                               f"{self.accountant!r}")
        fresh = self.init()
        clip = d.get("clip_norm")
        return DPState(ledger=ledger, clip_norm=fresh.clip_norm if clip is None else float(clip),
                       releases=int(d.get("releases") or 0))

    def init(self) -> DPState:
        raise NotImplementedError


class _CentralRun:
    def __init__(self, stage: CentralDPStage, state: DPState, step: int) -> None:
        if state.clip_norm is None:
            raise PrivacyError("central DP needs a clip norm in its state; this state has "
                               "none (a local-DP state?)")
        self.stage, self.state, self.step = stage, state, step
        self.clip_norm: float = state.clip_norm  # C of this step
        self.count = 0
        self.clipped = 0

    def rows(self, rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = self.clip_norm
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
        scale = np.where(norms > c, c / np.maximum(norms, 1e-300), 1.0)
        self.count += len(rows)
        self.clipped += int((norms > c).sum())
        return rows.astype(np.float64) * scale[:, None], np.ones(len(rows))

    def partial(self, rows: np.ndarray, weights: np.ndarray, clients: int,
                clip_norm: float | None) -> tuple[np.ndarray, np.ndarray]:
        """A group's mean (secure aggregation's sum, an edge's partial): its clients clipped
        their updates and weighed them 1, so it adds ``clients`` unit contributions of norm
        at most C. Clipping the mean instead would bound the group, not each client.

        Raises:
            UpdateRejected: ``not_clipped`` -- the group does not promise clipping to at most
                this step's C with unit weights (its sum's sensitivity would be unknown).
        """
        c = self.clip_norm
        weight = float(weights[0])
        if clip_norm is None or not clip_norm <= c * (1 + 1e-9):
            raise UpdateRejected("not_clipped", f"central DP needs every client update in a "
                                 f"group clipped to at most C = {c:g} by its client; the "
                                 f"group promises {clip_norm!r}")
        if abs(weight - clients) > 1e-6 * max(1, clients):
            raise UpdateRejected("not_clipped", f"central DP weighs every client 1: a group "
                                 f"of {clients} clients must weigh {clients}, got {weight:g}")
        self.count += int(clients)
        return rows.astype(np.float64), np.array([float(clients)])

    def finish(self, total: Sum) -> tuple[Sum, DPState]:
        stage, dp, c = self.stage, self.stage.central, self.clip_norm
        noised, nxt, fraction, sum_std = dp.release(
            total.vector.astype(np.float64, copy=True), self.count, self.clipped,
            CentralDPState(clip_norm=c, round=self.state.releases), stage.rng_for_step(self.step))
        info = {"clip_norm": c, "noise_std": sum_std / dp.expected_clients}
        if fraction is not None:
            info["unclipped_fraction"] = fraction
        ledger, eps = stage._account(self.state)
        info["epsilon"] = eps
        state = DPState(ledger=ledger, clip_norm=nxt.clip_norm, releases=self.state.releases + 1)
        return Sum(noised, dp.expected_clients, total.count, {**total.info, **info}), state


@dataclass(frozen=True)
class CentralDPStage(_Accounting):
    """Server-side DP-FedAvg as a pipeline stage (see the module docstring).

    Args:
        central: the mechanism (noise multiplier, clip norm, expected clients, adaptive).
        event: what one release is, for the accountant (Poisson rate or fixed-size sample).
        budget: the ε budget and the δ at which ε is reported.
        accountant: ``"rdp"`` or ``"pld"``.
        rng_for_step: the noise generator of a step.
    """

    central: CentralDP
    event: RoundEvent
    budget: BudgetPolicy
    rng_for_step: Callable[[int], RandomSource]
    accountant: str = "rdp"
    name: str = "central_dp"
    #: a release happens (noise alone) even when nobody reported
    releases_empty: bool = True

    def init(self) -> DPState:
        return DPState(ledger=PrivacyLedger(self.accountant),
                       clip_norm=float(self.central.clip_norm))

    def client_clip_norm(self, state: DPState) -> float | None:
        """Clients clip to this step's C before their update leaves them (the server clips
        again what it sees; under secure aggregation it sees only the sum)."""
        return state.clip_norm

    def begin(self, state: DPState, step: int) -> _CentralRun:
        return _CentralRun(self, state, step)


class _LocalRun:
    def __init__(self, stage: LocalDPStage, state: DPState) -> None:
        self.stage, self.state = stage, state

    def rows(self, rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # example counts travel in the clear, outside the local guarantee: weigh equally
        return rows, np.ones(len(rows))

    def finish(self, total: Sum) -> tuple[Sum, DPState]:
        ledger, eps = self.stage._account(self.state)
        state = replace(self.state, ledger=ledger, releases=self.state.releases + 1)
        return Sum(total.vector, total.weight, total.count, {**total.info, "epsilon": eps}), \
            state


@dataclass(frozen=True)
class LocalDPStage(_Accounting):
    """The server's half of local DP: an unweighted mean and the ledger (clients privatize
    in :class:`~shoal.uplink.Uplink`)."""

    event: RoundEvent
    budget: BudgetPolicy
    accountant: str = "rdp"
    name: str = "local_dp"
    releases_empty: bool = False

    def init(self) -> DPState:
        return DPState(ledger=PrivacyLedger(self.accountant))

    def begin(self, state: DPState, step: int) -> _LocalRun:
        return _LocalRun(self, state)


class _DistributedRun:
    def __init__(self, stage: DistributedDPStage, state: DPState) -> None:
        self.stage, self.state = stage, state
        self.shares = 0  # noise shares in the groups folded (deployed secure rounds)

    def rows(self, rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # the clients clip inside the secure sum; every client counts once
        return rows, np.ones(len(rows))

    def partial(self, rows: np.ndarray, weights: np.ndarray, clients: int,
                clip_norm: float | None) -> tuple[np.ndarray, np.ndarray]:
        """A group: with ``noised_groups`` (the carrier runs the secure sum itself, and its
        sessions unmask only sums of at least h + f noised inputs), the mean of a secure
        round whose ``clients`` devices clipped to C, weighed 1 and added their shares;
        otherwise refused (a pre-aggregated group carries no per-client noise shares).

        Raises:
            UpdateRejected: ``not_noised`` -- no ``noised_groups``, or a group of fewer
                than h + f clients, that does not promise clipping to C, or whose weight is
                not its client count.
        """
        mech = self.stage.mechanism
        weight = float(weights[0])
        if not self.stage.noised_groups:
            raise UpdateRejected("not_noised", "distributed DP needs each client's own noise "
                                 "share inside the secure sum; a pre-aggregated group has none")
        if clients < mech.min_inputs or clip_norm is None \
                or not clip_norm <= mech.clip_norm * (1 + 1e-9) \
                or abs(weight - clients) > 1e-6 * max(1, clients):
            raise UpdateRejected("not_noised", f"distributed DP folds a secure round of at "
                                 f"least {mech.min_inputs} clients, each clipped to C = "
                                 f"{mech.clip_norm:g} and weighing 1; this group has "
                                 f"{clients} clients weighing {weight:g}, clipped to "
                                 f"{clip_norm!r}")
        self.shares += int(clients)
        return rows.astype(np.float64), np.array([float(clients)])

    def finish(self, total: Sum) -> tuple[Sum, DPState]:
        """The noised sum over the expected cohort, and the ledger with this release.

        Raises:
            PrivacyError: the sum does not say it holds at least h + f noise shares (a sum
                rule that does not add them); nothing is released or accounted.
        """
        stage, mech = self.stage, self.stage.mechanism
        shares = total.info.get("ddg_noise_shares") or self.shares or None
        if shares is None or shares < mech.min_inputs:
            raise PrivacyError(f"distributed DP releases only a sum holding at least "
                               f"{mech.min_inputs} clients' noise shares; this one claims "
                               f"{shares!r}")
        ledger, eps = stage._account(self.state)
        info = {"clip_norm": mech.clip_norm, "epsilon": eps,
                "noise_std": mech.sum_noise_std(int(shares)) / stage.expected_clients}
        state = replace(self.state, ledger=ledger, releases=self.state.releases + 1)
        return Sum(total.vector, stage.expected_clients, total.count,
                   {**total.info, **info}), state


@dataclass(frozen=True)
class DistributedDPStage(_Accounting):
    """The server's half of distributed DP (see the module docstring): the noise is in the
    secure sum already; this stage checks that it is, fixes the denominator to the expected
    cohort and keeps the ledger.

    Args:
        mechanism: z, C, h, f of the distributed discrete Gaussian.
        expected_clients: the fixed denominator (the cohort size).
        event: one round for the accountant (:meth:`DistributedDiscreteGaussian.event`).
        budget: the ε budget and the δ at which ε is reported.
        noised_groups: the carrier runs the secure sum (devices over gRPC) and hands the
            coordinator each round's unmasked sum as a group; its sessions unmask nothing
            below h + f inputs, so a group of at least h + f clients clipped to C holds
            that many noise shares. Without it groups are refused.
    """

    mechanism: DistributedDiscreteGaussian
    expected_clients: float
    event: DistributedEvent
    budget: BudgetPolicy
    accountant: str = "rdp"
    noised_groups: bool = False
    name: str = "distributed_dp"
    #: a round that aborts (too few noise shares) or has no update releases nothing
    releases_empty: bool = False

    def init(self) -> DPState:
        return DPState(ledger=PrivacyLedger(self.accountant),
                       clip_norm=float(self.mechanism.clip_norm))

    def client_clip_norm(self, state: DPState) -> float | None:
        """C: tasks ask devices to clip to it and weigh their update 1 (their encoding
        clips again inside the ring)."""
        return float(self.mechanism.clip_norm)

    def begin(self, state: DPState, step: int) -> _DistributedRun:
        return _DistributedRun(self, state)
