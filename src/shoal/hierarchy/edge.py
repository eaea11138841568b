"""An edge aggregator: the run's coordinator downstream, one client upstream.

An edge answers its parent's training task for its group of the task's clients (those the
ring gives it) by running a :class:`~shoal.coordinator.Coordinator` over them: the same
policy, pipeline (validation, SecAgg+, clipping) and carrier loop as any aggregator, with a
cohort that is the group itself. What it uploads is one
:class:`~shoal.events.PartialAggregate`: the group's mean delta, the weight behind it, the
clients inside and the task's clients it answers for (``client_ids``), so the parent folds
it like ``clients`` updates and counts none of them twice.

With ``rounds = 1`` the edge only folds: the mean of its group's updates is the upload, and
a flat run and a hierarchical one with the same clients and seed commit the same model. With
``rounds > 1`` the edge runs its own server steps, each from the model of the step before,
and uploads the sum of its steps (its model minus the parent's): HierFAVG (L. Liu, J. Zhang,
S. H. Song, K. B. Letaief, "Client-Edge-Cloud Hierarchical Federated Learning", ICC 2020),
whose edges average their clients ``rounds`` times per cloud aggregation.

Versions and round keys are kept apart. A version names a model (devices cache models by
version; a deployed edge publishes each task's model under its version): with ``rounds = 1``
the edge trains only its parent's model and numbers it as the parent does; with
``rounds > 1`` its versions come from its own counter (:attr:`Edge.next_version`), which only
grows from task to task, so a parent round that is retried with another group never gives
new parameters an old number. Round keys name random streams: edge round ``j`` of a parent
round keyed ``r`` is keyed ``(r - 1) x rounds + j`` (``rounds = 1``: the parent's key, so a
flat run and a hierarchical one train alike), passed to the edge's coordinator as its
``round_offset``; a buffered edge's tasks are keyed past a base drawn for the edge and the
parent round (:meth:`Edge.round_offset`), so no two parent rounds or edges repeat them.

Privacy per tier: the group's sum rule may be SecAgg+ (the edge learns only its group's
sum; one SecAgg instance per group, as in K. Bonawitz et al., "Towards Federated Learning at
Scale: System Design", SysML 2019); a parent task that asks clients to clip (central DP
above) has every device update clipped to that norm and weighed 1 before the group's sum
(:class:`ClientClip`), and the upload promises it, so the parent's DP stage can fold it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from shoal import seeds
from shoal.clock import SimClock
from shoal.codec import Chain, from_bytes, to_bytes
from shoal.coordinator import Coordinator
from shoal.errors import ConfigError
from shoal.events import PartialAggregate, TrainTask
from shoal.observers import Observer
from shoal.pipeline import Pipeline, PlainSum, Sum, SumRule, SumRun, Validation
from shoal.policy import RoundPolicy, SyncPolicy
from shoal.records import RoundRecord
from shoal.robust.clipping import NormBound
from shoal.runner import ClientPool, PushCarrier, drive
from shoal.strategy import ServerState
from shoal.strategy.fedavg import check_delta
from shoal.strategy.state import initial_params

__all__ = ["ClientClip", "Edge", "EdgeStep", "GroupSampler", "MIN_SECURE_GROUP", "UploadTap"]

_STEPS = "delta"  # EdgeStep's slot: the sum of the steps taken
#: the smallest group an edge sums securely: SecAgg+ needs a threshold t >= 2 of k >= 2
#: neighbours, and a sum of one or two clients would reveal them to each other or the edge
MIN_SECURE_GROUP = 3
#: what an edge's own records pass up with its upload (summed by the parent's tally)
_PASS_UP = ("secagg_dropped", "secagg_included")


@dataclass(frozen=True)
class GroupSampler:
    """The edge's cohort: its group of the parent's task, whatever it is asked; a buffered
    edge's tasks draw from the group's idle clients."""

    ids: np.ndarray

    def sample(self, num_clients: int, rng: np.random.Generator,
               count: int | None = None) -> np.ndarray:
        return self.ids

    def idle(self, num_clients: int, count: int, rng: np.random.Generator,
             busy: AbstractSet[int]) -> np.ndarray:
        free = np.array([c for c in self.ids.tolist() if c not in busy], np.int64)
        if len(free) < count:
            return np.zeros(0, np.int64)
        return np.sort(rng.choice(free, size=count, replace=False))


@dataclass(frozen=True)
class EdgeStep:
    """An edge's server step: FedAvg with step size 1 (HierFAVG's edge average) that also
    keeps the sum of the mean deltas it applied in the slot ``"delta"``, the upload (exact in
    float64 arithmetic, not a difference of two rounded models).

    Args:
        settings: the parent task's client settings (e.g. FedProx ``mu``), passed on.
    """

    settings: Mapping[str, float] = field(default_factory=dict)
    name: ClassVar[str] = "edge"

    def init(self, params: np.ndarray) -> ServerState:
        p = initial_params(params)
        return ServerState(params=p, version=0, slots={_STEPS: np.zeros_like(p)})

    def client_config(self, state: ServerState) -> dict[str, float]:
        return dict(self.settings)

    def apply(self, state: ServerState, delta: np.ndarray) -> ServerState:
        step = check_delta(state, delta)
        steps = (step + state.slots[_STEPS]).astype(np.float32)
        step += state.params
        return ServerState(params=step.astype(np.float32), version=state.version + 1,
                           slots={_STEPS: steps})


# --------------------------------------------------------------------------- stages


class _TapRun:
    def __init__(self) -> None:
        self.rows_in = 0  # rows folded (a group's mean is one)
        self.clients = 0  # client updates inside them

    def rows(self, rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.rows_in += len(rows)
        self.clients += len(rows)
        return rows, weights

    def partial(self, rows: np.ndarray, weights: np.ndarray, clients: int,
                clip_norm: float | None) -> tuple[np.ndarray, np.ndarray]:
        self.rows_in += 1
        self.clients += clients
        return rows, weights

    def finish(self, total: Sum) -> tuple[Sum, tuple[float, int]]:
        # rows the sum left out (secure aggregation's dropouts) take their clients with them
        lost = self.rows_in - total.count
        return total, (float(total.weight), self.clients - lost)


@dataclass(frozen=True)
class UploadTap:
    """A pass-through stage whose state is the last released sum's ``(weight, clients)``:
    what the edge's upload weighs and how many client updates it holds (under SecAgg+ only
    the survivors'; a group from a tier below counts its own clients). Put first, it sees
    the sum last, as released."""

    name: ClassVar[str] = "upload_tap"

    def init(self) -> tuple[float, int]:
        return 0.0, 0

    def begin(self, state: Any, step: int) -> _TapRun:
        return _TapRun()

    def allows_step(self, state: Any) -> str:
        return ""


class _ClipRun:
    """Robust norm bounding at ``clip_norm`` (clip each row, check a group's promise), with
    every client weighed 1."""

    def __init__(self, clip_norm: float) -> None:
        bound = NormBound(clip_norm)
        self.bound = bound.begin(bound.init(), 0)

    def rows(self, rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        clipped, _ = self.bound.rows(rows, weights)
        return clipped, np.ones(len(rows))

    def partial(self, rows: np.ndarray, weights: np.ndarray, clients: int,
                clip_norm: float | None) -> tuple[np.ndarray, np.ndarray]:
        return self.bound.partial(rows, weights, clients, clip_norm)

    def finish(self, total: Sum) -> tuple[Sum, None]:
        return total, None


@dataclass(frozen=True)
class ClientClip:
    """Clip every device update to the parent task's ``clip_norm`` and weigh it 1 (central
    DP above this tier cannot clip inside a group's sum); a group from a tier below must
    promise the same. Its tasks ask devices to clip too (``client_clip_norm``)."""

    clip_norm: float
    name: ClassVar[str] = "client_clip"

    def init(self) -> None:
        return None

    def begin(self, state: Any, step: int) -> _ClipRun:
        return _ClipRun(self.clip_norm)

    def allows_step(self, state: Any) -> str:
        return ""

    def client_clip_norm(self, state: Any) -> float:
        return self.clip_norm


@dataclass(frozen=True)
class _Keyed:
    """``rule`` with its steps renumbered by ``step_of`` (an edge's own random streams)."""

    rule: SumRule
    step_of: Callable[[int], int]

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def holds_updates(self) -> bool:
        return self.rule.holds_updates

    def begin(self, dim: int, step: int) -> SumRun:
        return self.rule.begin(dim, self.step_of(step))


# --------------------------------------------------------------------------- the edge


@dataclass
class Edge:
    """One edge aggregator of a tier (see the module docstring).

    Args:
        name: the edge's id (on the ring).
        seed: the run seed (the edge's coordinator derives nothing else from it: its cohort
            is its group).
        rounds: edge rounds per parent task (1: fold only; > 1: HierFAVG).
        sum_rule: how the group's rows are added (e.g. SecAgg+); ``None``: the plain sum.
            Its step (what keys its random streams) is unique to this edge and edge round
            key ``k``: ``(k - 1) x peers + index + 1``.
        index, peers: this edge's place in its tier and the tier's size.
        policy: the edge's round policy for a group of ``n`` clients (``policy(n)``); by
            default one synchronous round per step awaiting the whole group. A buffered
            policy (FedBuff at the edge) makes ``rounds`` server steps from the group's
            updates as they come, staleness counted in the edge's own steps; the upload's
            staleness at the parent is counted in the parent's versions.
        observers: told what happens at this edge.
        validation: the bounds every device update is checked against (a deployment's
            ``deploy.max_norm``).

    Raises:
        ConfigError: ``rounds < 1``.
    """

    name: str
    seed: int
    rounds: int = 1
    sum_rule: SumRule | None = None
    index: int = 0
    peers: int = 1
    policy: Callable[[int], RoundPolicy] | None = None
    observers: Iterable[Observer] = ()
    validation: Validation = Validation()
    #: the records of the edge's rounds in the last task it answered
    records: list[RoundRecord] = field(default_factory=list, init=False)
    #: with ``rounds > 1``: the version the edge's next task starts from; it only grows
    #: (by ``rounds`` per task), so no version is given two models
    next_version: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"hierarchy.edge_rounds must be >= 1, got {self.rounds}",
                              key="hierarchy.edge_rounds")

    def pipeline(self, task: TrainTask, round_offset: int = 0) -> Pipeline:
        """The group's pipeline for ``task``: the upload tap, per-client clipping when the
        task asks for it, the sum rule (its step that makes version ``v`` keyed by the edge
        round's key ``v + round_offset``, see the class docstring)."""
        clip = () if task.clip_norm is None else (ClientClip(task.clip_norm),)
        rule: SumRule = PlainSum()
        if self.sum_rule is not None:  # the pipeline's step is the edge's next version
            rule = _Keyed(self.sum_rule, lambda v: (v + round_offset - 1) * self.peers
                          + self.index + 1)
        return Pipeline(stages=(UploadTap(), *clip), sum_rule=rule,
                        validation=self.validation)

    def sums(self, client_ids: np.ndarray) -> bool:
        """Whether this edge aggregates a group of ``client_ids`` (a secure sum rule needs
        :data:`MIN_SECURE_GROUP` distinct clients; a smaller group is never asked)."""
        return self.sum_rule is None or len(np.unique(client_ids)) >= MIN_SECURE_GROUP

    def first_key(self, task: TrainTask) -> int:
        """The round key of the edge's first round of ``task``: ``(r - 1) x rounds + 1``
        for a parent round keyed ``r``."""
        return (task.round - 1) * self.rounds + 1

    def round_offset(self, task: TrainTask, policy: RoundPolicy, first: int) -> int:
        """The ``round_offset`` of the edge's coordinator for ``task`` under ``policy``, its
        first round training version ``first``.

        Synchronous edge rounds: edge round ``j`` (making version ``first + j``) is keyed
        ``(r - 1) x rounds + j``, as every edge of the tier keys it (their groups are
        disjoint; one edge round keys the parent's round, as a flat run would). Buffered: the
        coordinator numbers its tasks 1, 2, ... in every parent task, so task ``t`` is keyed
        ``t`` past a base drawn from the run seed, the edge's name and the parent's key
        (62 bits): no two edges or parent rounds share their devices' streams (the chance
        that two ranges of ``n`` tasks overlap is about ``n / 2^62``).
        """
        if isinstance(policy, SyncPolicy):
            return self.first_key(task) - 1 - first
        state = seeds.seed_sequence(self.seed, "edge_tasks", self.name, task.round)
        return int(state.generate_state(2, np.uint32).view(np.uint64)[0] >> np.uint64(2))

    def first_version(self, task: TrainTask) -> int:
        """The version the edge's first round of ``task`` trains from: the parent's with
        one edge round (the edge trains only the parent's model), else
        :attr:`next_version` (never given a model before)."""
        return task.version if self.rounds == 1 else self.next_version

    def answer(self, task: TrainTask, client_ids: np.ndarray,
               child: ClientPool | PushCarrier) -> PartialAggregate | None:
        """Run ``rounds`` edge rounds of ``client_ids`` (this edge's part of ``task``'s
        cohort) over ``child`` (the devices in this process, a tier below, or a deployed
        edge's gRPC carrier) and return the upload, or ``None`` when no round committed
        (the parent then hears nothing for these clients). A group smaller than
        :data:`MIN_SECURE_GROUP` under a secure sum rule is not aggregated (``None``).

        The upload went through the wire format: its ``upload_bytes`` are the encoded
        payload's length, and its delta the decoded vector.
        """
        ids = np.unique(np.asarray(client_ids, np.int64))
        if not self.sums(ids):
            self.records = []
            return None  # a secure sum of one or two clients would reveal them
        strategy = EdgeStep(task.settings)
        # versions name models, round keys random streams (the module docstring): the edge
        # round that makes version first + j is keyed (r - 1) x rounds + j
        first = self.first_version(task)
        if self.rounds > 1:
            self.next_version = first + self.rounds  # used or not, never given again
        policy = self.policy(len(ids)) if self.policy is not None \
            else SyncPolicy(max_attempts=1)
        offset = self.round_offset(task, policy, first)
        coordinator = Coordinator(
            strategy, child.num_clients, GroupSampler(ids), seed=self.seed, policy=policy,
            pipeline=self.pipeline(task, offset), steps=first + self.rounds,
            observers=self.observers, round_offset=offset)
        self.records = []
        final: dict[str, ServerState] = {}

        def committed(state: ServerState, record: RoundRecord) -> None:
            final["state"] = state
            self.records.append(record)

        def abandoned(record: RoundRecord, reason: str, retry: bool) -> None:
            self.records.append(record)

        start = replace(strategy.init(task.params), version=first)
        drive(coordinator, child, start, SimClock(),
              on_commit=committed, on_abort=abandoned)
        if "state" not in final:
            return None
        weight, count = coordinator.stage_states[0]
        if count < 1 or weight <= 0:
            return None
        blob = to_bytes(Chain([]).encode(np.asarray(final["state"].slots[_STEPS]),
                                         np.random.default_rng(0)))  # raw: draws nothing
        delta = from_bytes(blob, max_elements=task.params.size)
        # what moved into this edge, and (from tiers below) into theirs
        ingress = sum(r.bytes_up + r.privacy.get("edge_ingress_bytes", 0.0)
                      for r in self.records)
        metrics: dict[str, float] = {"upload_bytes": float(len(blob)),
                                     "download_bytes": float(len(blob)),
                                     "edge_ingress_bytes": float(ingress)}
        last = self.records[-1].privacy
        for key, value in last.items():
            if key.startswith(_PASS_UP):
                metrics[key] = float(value)
        clip = task.clip_norm
        return PartialAggregate(
            delta=delta, num_examples=int(round(weight)), clients=int(count),
            metrics=metrics, base_version=task.version, clip_norm=clip, client_ids=ids)
