"""Drive a coordinator over a client pool: the carrier loop shared by every pool.

A :class:`ClientPool` trains a task's clients and yields their updates as they arrive
(virtual clients in this process, devices behind the gRPC aggregator, later Ray actors). The
:func:`drive` loop hands the coordinator's commands to the pool and the pool's arrivals back
to the coordinator as events, until the coordinator says the run is finished. It holds no
round logic of its own: deadlines, targets, staleness and commits are the policy's.

With a *time model* (``task_seconds``) the run is a discrete-event simulation on a
:class:`~shoal.clock.SimClock` (:mod:`shoal.discrete_event`): every client downloads, trains
and uploads on the simulated clock, drops out when its device goes offline, and the loop
jumps from one event to the next, so stragglers, deadlines and buffered asynchronous
aggregation are simulated without sleeping. Without one, a pool's arrivals reach the
coordinator in the order it yields them, at the clock's current time.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import numpy as np

from shoal.clock import Clock, SimClock
from shoal.coordinator import Coordinator
from shoal.discrete_event import DeviceModel, DeviceTimeline, LazyPool, TaskSeconds
from shoal.errors import ProtocolError
from shoal.events import (AbortRound, Arrival, CancelTask, CommitVersion, Event, Finished,
                          SendTask, TaskEnded, Tick, TrainTask, UpdatesArrived, WakeAt)
from shoal.observers import Observer
from shoal.pipeline import Pipeline
from shoal.policy import RoundPolicy
from shoal.records import RoundRecord
from shoal.sampling import Sampler
from shoal.strategy import ServerState, Strategy

__all__ = ["ClientPool", "DeviceModel", "LazyPool", "PushCarrier", "TaskSeconds", "drive",
           "run_round"]


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
        task_seconds: the time model (a :class:`TaskSeconds`, or a :class:`DeviceModel` for
            transfers and availability too); ``None`` delivers arrivals as the pool yields
            them.
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
    todo = deque(coordinator.start(state, clock.now(), stage_states))

    def feed(event: Event) -> None:
        todo.extend(coordinator.handle(event))

    timeline = DeviceTimeline(pool, task_seconds, feed, getattr(coordinator, "room", None)) \
        if task_seconds is not None else None
    ticks: list[tuple[float, int]] = []  # without a time model: (deadline, seq)
    seq = itertools.count()
    while True:
        while todo:
            cmd = todo.popleft()
            if isinstance(cmd, Finished):
                return cmd.reason
            if isinstance(cmd, SendTask):
                if timeline is not None:
                    timeline.send(cmd.task, cmd.client_ids, clock.now())
                else:
                    for item in pool.train(cmd.task, cmd.client_ids):
                        feed(UpdatesArrived(cmd.task.task_id, item, clock.now()))
                    feed(TaskEnded(cmd.task.task_id, clock.now()))
            elif isinstance(cmd, CommitVersion):
                if on_commit is not None:
                    on_commit(cmd.state, cmd.record)
            elif isinstance(cmd, AbortRound):
                if on_abort is not None:
                    on_abort(cmd.record, cmd.reason, cmd.retry)
            elif isinstance(cmd, WakeAt):
                if timeline is not None:
                    timeline.wake(cmd.at)
                else:
                    heapq.heappush(ticks, (cmd.at, next(seq)))
            elif isinstance(cmd, CancelTask):
                if timeline is not None:
                    timeline.cancel(cmd.task_id)
                cancel = getattr(pool, "cancel", None)
                if cancel is not None:
                    cancel(cmd.task_id)
        if timeline is not None:
            assert isinstance(clock, SimClock)
            if not timeline.step(clock):
                raise ProtocolError("the run stalled: the coordinator waits for updates that "
                                    "no client will send")
            continue
        if not ticks:
            raise ProtocolError("the run stalled: the coordinator waits for updates that no "
                                "client will send")
        at, _ = heapq.heappop(ticks)
        time.sleep(max(0.0, at - clock.now()))
        feed(Tick(clock.now()))


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
