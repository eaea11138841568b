"""What flows into and out of the coordinator: tasks, updates, events and commands.

Carriers (the simulator, the gRPC server, an in-memory test transport) turn what happens to
clients into *events* and carry out the *commands* the coordinator returns. Everything here
is a small frozen dataclass with no behaviour beyond checking itself, so a scenario can be
recorded, replayed and compared across carriers.

Versions, not rounds: every task names the model version it was built from and every update
carries that ``base_version``; staleness (buffered aggregation) and delta downloads come from
it. A round (sync) or a server step (buffered) is only what produced a version.

Two kinds of task: a :class:`TrainTask` (train and upload an update) and an
:class:`EvalTask` (evaluate a model on local held-out data and report metrics, nothing else:
federated evaluation, :mod:`shoal.evaluation`). Both draw their ids from one counter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

if TYPE_CHECKING:  # for annotations only: events stay a leaf module (numpy alone at run time)
    from shoal.evaluation import EvalResult
    from shoal.records import RoundRecord
    from shoal.strategy import ServerState

__all__ = [
    "TrainTask", "ClientUpdate", "UpdateBatch", "PartialAggregate", "Arrival",
    "UpdatesArrived", "ClientsFailed", "TaskEnded", "Tick", "Event",
    "SendTask", "CancelTask", "WakeAt", "CommitVersion", "AbortRound", "UpdateRefused",
    "Finished", "Command", "EvalTask", "EvalReports", "EvalReported", "SendEval",
    "EvalDone",
]


# --------------------------------------------------------------------------- work and results


@dataclass(frozen=True)
class TrainTask:
    """What every client of one task receives.

    Attributes:
        task_id: unique within a run (1, 2, ...); arrivals name it.
        version: the model version ``params`` is (the base version of every update).
        params: the global model as a flat float32 vector (read-only for clients).
        round: the key of the clients' random streams: the round number in sync rounds
            (so wave-1 runs stay bit-identical), the task id in buffered aggregation.
        settings: the strategy's client settings (e.g. FedProx ``mu``).
        deadline: when the coordinator stops waiting (seconds, the run's clock), or ``inf``.
        clip_norm: clients clip their update to this L2 norm and weigh it as one example
            before it leaves them (central DP's sensitivity bound, which the server cannot
            enforce on updates it only sees summed under secure aggregation); ``None``: no
            clipping asked.
    """

    task_id: int
    version: int
    params: np.ndarray
    round: int
    settings: Mapping[str, float] = field(default_factory=dict)
    deadline: float = float("inf")
    clip_norm: float | None = None


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution.

    Attributes:
        client_id: the client (an index into the population).
        delta: trained params minus the base model, flat.
        num_examples: the client's weight (examples it trained on).
        base_version: the version it trained from; ``None`` means the task's version.
        metrics: e.g. ``loss``, ``upload_bytes``, ``download_bytes``.
    """

    client_id: int
    delta: np.ndarray
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    base_version: int | None = None


@dataclass(frozen=True)
class UpdateBatch:
    """Several clients' updates at once, as rows of one matrix (the in-process pool's form:
    splitting it into single updates would only cost copies).

    Attributes:
        client_ids: int64 ``(k,)``.
        deltas: float32 ``(k, D)``.
        num_examples: int64 ``(k,)``.
        metrics: name -> float ``(k,)`` per-client values (e.g. ``loss``).
        base_version: the version every row trained from; ``None`` means the task's.
    """

    client_ids: np.ndarray
    deltas: np.ndarray
    num_examples: np.ndarray
    metrics: Mapping[str, np.ndarray] = field(default_factory=dict)
    base_version: int | None = None

    def rows(self, keep: np.ndarray) -> UpdateBatch:
        """The batch restricted to the rows where ``keep`` (a bool mask) is true."""
        return UpdateBatch(self.client_ids[keep], self.deltas[keep], self.num_examples[keep],
                           {k: np.asarray(v)[keep] for k, v in self.metrics.items()},
                           self.base_version)


@dataclass(frozen=True)
class PartialAggregate:
    """The weighted mean of several clients' updates, aggregated before it reached the
    coordinator: by secure aggregation (the server learns only this) or by an edge
    aggregator. It folds like one update of weight ``num_examples`` and counts as ``clients``
    accepted updates.

    Attributes:
        delta: float32 ``(D,)``, the weighted mean of the clients' deltas.
        num_examples: the total weight behind it.
        clients: how many client updates it holds (>= 1).
        metrics: values to record with the round (e.g. ``secagg_dropped``), and
            ``upload_bytes`` / ``download_bytes`` for the whole group.
        base_version: the version the group trained from; ``None`` means the task's.
        clip_norm: every client update inside was clipped to this L2 norm and weighed 1 by
            its client (the task's ``clip_norm``), so ``num_examples == clients``; ``None``:
            no such promise. Central DP folds a group only with this promise.
        client_ids: int64, the task's clients this group answers for (those inside it and
            those that dropped out on the way): an edge aggregator answers for its part of
            a cohort, and the task still waits for the others. A client is answered for
            once: a group naming one that already reported or failed is refused
            (``duplicate``). ``None``: every client of the task (secure aggregation's one
            group per task).
    """

    delta: np.ndarray
    num_examples: int
    clients: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    base_version: int | None = None
    clip_norm: float | None = None
    client_ids: np.ndarray | None = None


Arrival: TypeAlias = ClientUpdate | UpdateBatch | PartialAggregate


@dataclass(frozen=True)
class EvalTask:
    """Evaluate ``params`` on local held-out data and report metrics; no training, no
    upload of a model.

    Attributes:
        task_id: unique within a run (shared with training tasks).
        version: the model version ``params`` is.
        params: the model to evaluate, flat float32 (read-only).
        deadline: when the coordinator stops waiting, or ``inf``.
        purpose: the requester's label, returned with the result (e.g. ``"canary"``).
    """

    task_id: int
    version: int
    params: np.ndarray
    deadline: float = float("inf")
    purpose: str = ""


@dataclass(frozen=True)
class EvalReports:
    """Evaluation reports of several clients, as rows.

    Attributes:
        client_ids: int64 ``(k,)``.
        num_examples: int64 ``(k,)`` held-out examples each client evaluated (its weight).
        metrics: name -> float ``(k,)`` per-client values (e.g. ``loss``, ``accuracy``).
        segments: ``(k,)`` each client's segment (a device attribute), or empty for none.
    """

    client_ids: np.ndarray
    num_examples: np.ndarray
    metrics: Mapping[str, np.ndarray]
    segments: tuple[str, ...] = ()

    def check(self) -> None:
        """Raises :class:`~shoal.errors.ProtocolError` when rows disagree in length, a
        weight is negative or a metric is not a 1-D array of the rows' length."""
        from shoal.errors import ProtocolError

        k = len(self.client_ids)
        if len(self.num_examples) != k or (self.segments and len(self.segments) != k):
            raise ProtocolError("evaluation reports: rows disagree in length")
        if k and int(np.min(self.num_examples)) < 0:
            raise ProtocolError("evaluation reports: a negative example count")
        for name, v in self.metrics.items():
            if np.ndim(v) != 1 or len(v) != k:
                raise ProtocolError(f"evaluation reports: metric {name!r} is not one value "
                                    "per client")

    def segments_or_blank(self) -> tuple[str, ...]:
        return self.segments if self.segments else ("",) * len(self.client_ids)


# --------------------------------------------------------------------------- events (in)


@dataclass(frozen=True)
class UpdatesArrived:
    """Updates for ``task_id`` reached the server at ``now``."""

    task_id: int
    arrival: Arrival
    now: float


@dataclass(frozen=True)
class ClientsFailed:
    """Clients of ``task_id`` will not report (dropped, crashed, refused the task)."""

    task_id: int
    client_ids: tuple[int, ...]
    reason: str
    now: float


@dataclass(frozen=True)
class TaskEnded:
    """The carrier will deliver nothing more for ``task_id`` (every client reported, failed
    or was cut off). ``abandoned`` is the carrier's word that its own transport-level round
    could not complete (e.g. too few devices before its deadline): the policy then abandons
    the round rather than commit it."""

    task_id: int
    now: float
    abandoned: bool = False
    detail: str = ""


@dataclass(frozen=True)
class Tick:
    """Time passed: deadlines up to ``now`` are due."""

    now: float


@dataclass(frozen=True)
class EvalReported:
    """Evaluation reports for evaluation task ``task_id`` reached the server at ``now``."""

    task_id: int
    reports: EvalReports
    now: float


Event: TypeAlias = UpdatesArrived | ClientsFailed | TaskEnded | Tick | EvalReported


# --------------------------------------------------------------------------- commands (out)


@dataclass(frozen=True)
class SendTask:
    """Train ``task`` on ``client_ids`` (int64, sorted) and report back."""

    task: TrainTask
    client_ids: np.ndarray


@dataclass(frozen=True)
class CancelTask:
    """Stop waiting for ``task_id`` (its round closed): drop what is still in flight."""

    task_id: int
    reason: str


@dataclass(frozen=True)
class WakeAt:
    """Send a :class:`Tick` at ``at`` (a deadline)."""

    at: float


@dataclass(frozen=True)
class CommitVersion:
    """A new global model version: persist it, evaluate it, serve it.

    ``state`` is the new server state (``state.version`` is the version); ``record`` says
    what produced it.
    """

    state: ServerState
    record: RoundRecord


@dataclass(frozen=True)
class AbortRound:
    """A round was abandoned (too few updates, secure aggregation aborted); the model is
    unchanged. ``retry`` is false when the policy gives up (the run cannot continue)."""

    record: RoundRecord
    reason: str
    retry: bool


@dataclass(frozen=True)
class UpdateRefused:
    """Updates of ``task_id`` were refused with ``reason`` (not folded, nothing changed).

    ``client_ids`` are the refused clients (empty for a :class:`PartialAggregate`, which has
    none of its own). A carrier that answers clients one by one (the gRPC aggregator) tells
    each its reason; a client not named in any refusal of the commands that answered its
    arrival was accepted.
    """

    task_id: int
    client_ids: tuple[int, ...]
    reason: str
    detail: str


@dataclass(frozen=True)
class Finished:
    """The run is over: the last version is committed, or it stopped for ``reason``."""

    reason: str


@dataclass(frozen=True)
class SendEval:
    """Evaluate ``task`` on ``client_ids`` (int64, sorted) and report metrics."""

    task: EvalTask
    client_ids: np.ndarray


@dataclass(frozen=True)
class EvalDone:
    """Evaluation task ``task_id`` closed; ``result`` is what its cohort reported."""

    task_id: int
    result: EvalResult


Command: TypeAlias = (SendTask | CancelTask | WakeAt | CommitVersion | AbortRound
                      | UpdateRefused | Finished | SendEval | EvalDone)
