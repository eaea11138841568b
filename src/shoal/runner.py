"""Drive a coordinator over a client pool: the carrier loop shared by every pool.

A :class:`ClientPool` trains a task's clients and yields their updates as they arrive
(virtual clients in this process, devices behind the gRPC aggregator, later Ray actors). The
:func:`drive` loop hands the coordinator's commands to the pool and the pool's arrivals back
to the coordinator as events, until the coordinator says the run is finished. It holds no
round logic of its own: deadlines, targets, staleness and commits are the policy's.

With a *time model* (``task_seconds``) every client's update arrives at its own simulated
completion time on a :class:`~shoal.clock.SimClock`: the loop keeps a queue of timed events
and jumps from one to the next, so stragglers, deadlines and buffered asynchronous
aggregation are simulated without sleeping. Without one, a pool's arrivals reach the
coordinator in the order it yields them, at the clock's current time.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeAlias, runtime_checkable

import numpy as np

from shoal.clock import Clock, SimClock
from shoal.coordinator import Coordinator
from shoal.errors import ProtocolError
from shoal.events import (AbortRound, Arrival, CancelTask, CommitVersion, Event, Finished,
                          SendTask, TaskEnded, Tick, TrainTask, UpdateBatch, UpdatesArrived,
                          WakeAt)
from shoal.observers import Observer
from shoal.pipeline import Pipeline
from shoal.policy import RoundPolicy
from shoal.records import RoundRecord
from shoal.sampling import Sampler
from shoal.strategy import ServerState, Strategy

__all__ = ["ClientPool", "PushCarrier", "TaskSeconds", "drive", "run_round"]


@runtime_checkable
class ClientPool(Protocol):
    """How a carrier reaches clients: ``train`` yields their updates as they arrive. A
    client that fails or drops out simply yields nothing."""

    @property
    def num_clients(self) -> int: ...

    def train(self, task: TrainTask, client_ids: np.ndarray) -> Iterable[Arrival]: ...


@runtime_checkable
class PushCarrier(Protocol):
    """A carrier whose clients come to it (devices pulling work over a network): it runs
    the coordinator itself, feeding it their messages as events as they happen, on its own
    clock (the one its clients' deadlines are on). See :class:`~shoal.gateway.DeviceGateway`.
    """

    @property
    def num_clients(self) -> int: ...

    def run(self, coordinator: Coordinator, state: ServerState, *,
            stage_states: tuple | None = None,
            on_commit: Callable[[ServerState, RoundRecord], None] | None = None,
            on_abort: Callable[[RoundRecord, str, bool], None] | None = None) -> str: ...


#: what the timed queue holds: arrivals and task ends at their simulated times, deadlines
_Timed: TypeAlias = UpdatesArrived | TaskEnded | Tick


class TaskSeconds(Protocol):
    """Simulated seconds each client of a task takes, download to upload."""

    def __call__(self, task: TrainTask, client_ids: np.ndarray,
                 num_examples: np.ndarray) -> np.ndarray: ...


def _split(item: Arrival, seconds: np.ndarray) -> list[tuple[float, Arrival]]:
    """A batch's rows as single-client batches with their own completion offsets."""
    if not isinstance(item, UpdateBatch) or len(item.client_ids) <= 1:
        return [(float(np.max(seconds)) if len(seconds) else 0.0, item)]
    out: list[tuple[float, Arrival]] = []
    for i in range(len(item.client_ids)):
        keep = np.zeros(len(item.client_ids), bool)
        keep[i] = True
        out.append((float(seconds[i]), item.rows(keep)))
    return out


def drive(coordinator: Coordinator, pool: ClientPool | PushCarrier, state: ServerState,
          clock: Clock, *, stage_states: tuple | None = None,
          task_seconds: TaskSeconds | None = None,
          on_commit: Callable[[ServerState, RoundRecord], None] | None = None,
          on_abort: Callable[[RoundRecord, str, bool], None] | None = None) -> str:
    """Run ``coordinator`` over ``pool`` from ``state`` until it finishes.

    Args:
        coordinator: a coordinator not yet started.
        pool: the clients: a pull pool, or a :class:`PushCarrier` that runs the coordinator
            itself on its own clock (``clock`` and ``task_seconds`` are then unused).
        state: the server state to start from.
        clock: the run's time (a :class:`SimClock` with ``task_seconds``).
        stage_states: the pipeline stages' saved states (a resumed run).
        task_seconds: the time model; ``None`` delivers arrivals as the pool yields them.
        on_commit: called with ``(state, record)`` for each committed version, before the
            next task is sent (persist it, evaluate it).
        on_abort: called with ``(record, reason, retry)`` for each abandoned round.

    Returns:
        Why the run finished (``"done"``, a privacy budget, ...).

    Raises:
        ProtocolError: the coordinator waits for an event nothing will send.
    """
    if isinstance(pool, PushCarrier):
        return pool.run(coordinator, state, stage_states=stage_states, on_commit=on_commit,
                        on_abort=on_abort)
    if task_seconds is not None and not isinstance(clock, SimClock):
        raise ProtocolError("a time model needs a simulated clock (SimClock)")
    seq = itertools.count()
    timed: list[tuple[float, int, _Timed]] = []  # (time, seq, event)
    todo = deque(coordinator.start(state, clock.now(), stage_states))

    def feed(event: Event) -> None:
        todo.extend(coordinator.handle(event))

    while True:
        while todo:
            cmd = todo.popleft()
            if isinstance(cmd, Finished):
                return cmd.reason
            if isinstance(cmd, SendTask):
                _send(cmd, pool, clock, task_seconds, feed, timed, seq)
            elif isinstance(cmd, CommitVersion):
                if on_commit is not None:
                    on_commit(cmd.state, cmd.record)
            elif isinstance(cmd, AbortRound):
                if on_abort is not None:
                    on_abort(cmd.record, cmd.reason, cmd.retry)
            elif isinstance(cmd, WakeAt):
                heapq.heappush(timed, (cmd.at, next(seq), Tick(cmd.at)))
            elif isinstance(cmd, CancelTask):
                cancel = getattr(pool, "cancel", None)
                if cancel is not None:
                    cancel(cmd.task_id)
        if not timed:
            raise ProtocolError("the run stalled: the coordinator waits for updates that no "
                                "client will send")
        at, _, event = heapq.heappop(timed)
        if isinstance(clock, SimClock):
            clock.advance_to(max(at, clock.now()))
        else:
            time.sleep(max(0.0, at - clock.now()))
        feed(_at(event, clock.now()))


def _at(event: _Timed, now: float) -> _Timed:
    if isinstance(event, Tick):
        return Tick(now)
    if isinstance(event, UpdatesArrived):
        return UpdatesArrived(event.task_id, event.arrival, now)
    return TaskEnded(event.task_id, now, event.abandoned, event.detail)


def _send(cmd: SendTask, pool: ClientPool, clock: Clock, task_seconds: TaskSeconds | None,
          feed: Callable[[Event], None], timed: list[tuple[float, int, _Timed]],
          seq: Iterator[int]) -> None:
    task_id = cmd.task.task_id
    start = clock.now()
    last = start
    for item in pool.train(cmd.task, cmd.client_ids):
        if task_seconds is None:
            feed(UpdatesArrived(task_id, item, clock.now()))
            continue
        ids, n = _ids_and_examples(item)
        secs = np.asarray(task_seconds(cmd.task, ids, n), dtype=np.float64)
        for offset, part in _split(item, secs):
            last = max(last, start + offset)
            heapq.heappush(timed, (start + offset, next(seq),
                                   UpdatesArrived(task_id, part, start + offset)))
    end = TaskEnded(task_id, clock.now())
    if task_seconds is None:
        feed(end)
    else:
        heapq.heappush(timed, (last, next(seq), end))


def _ids_and_examples(item: Arrival) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(item, UpdateBatch):
        return np.asarray(item.client_ids), np.asarray(item.num_examples)
    if hasattr(item, "client_id"):
        return np.array([item.client_id]), np.array([item.num_examples])
    return np.zeros(1, np.int64), np.array([item.num_examples])


def run_round(strategy: Strategy, pool: ClientPool | PushCarrier, sampler: Sampler,
              state: ServerState, *, seed: int, pipeline: Pipeline | None = None,
              policy: RoundPolicy | None = None, clock: Clock | None = None,
              observers: Iterable[Observer] = ()
              ) -> tuple[ServerState, RoundRecord | None]:
    """Run one synchronous round (the next version after ``state``) over ``pool``.

    Returns ``(new_state, record)``; a round that could not commit returns ``state``
    unchanged and its record (one attempt unless ``policy`` says otherwise), and a run that
    could not even start a round (e.g. a spent privacy budget) no record. A convenience for
    scripts and tests; :class:`~shoal.experiment.Experiment` runs whole trainings.
    """
    from shoal.clock import WallClock
    from shoal.policy import SyncPolicy

    policy = policy if policy is not None else SyncPolicy(max_attempts=1)
    coordinator = Coordinator(strategy, pool.num_clients, sampler, seed=seed, policy=policy,
                              pipeline=pipeline, steps=state.version + 1,
                              observers=observers)
    new_state = state
    record: RoundRecord | None = None

    def committed(st: ServerState, rec: RoundRecord) -> None:
        nonlocal new_state, record
        new_state, record = st, rec

    def abandoned(rec: RoundRecord, reason: str, retry: bool) -> None:
        nonlocal record
        record = rec

    drive(coordinator, pool, state, clock or WallClock(), on_commit=committed,
          on_abort=abandoned)
    return new_state, record
