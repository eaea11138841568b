"""Drive a coordinator over a client pool: the carrier loop shared by every pool.

A :class:`ClientPool` trains a task's clients and yields their updates as they arrive
(virtual clients in this process, devices behind the gRPC aggregator, later Ray actors). The
:func:`drive` loop hands the coordinator's commands to the pool and the pool's arrivals back
to the coordinator as events, until the coordinator says the run is finished. It holds no
round logic of its own: deadlines, targets, staleness and commits are the policy's.

With a *time model* (``task_seconds``) the run is a discrete-event simulation on a
:class:`~shoal.clock.SimClock`: the loop keeps a queue of timed events and jumps from one to
the next, so stragglers, deadlines and buffered asynchronous aggregation are simulated without
sleeping. Each client of a task

1. downloads the model (``download_bytes`` over its bandwidth), then trains (the time
   model's compute seconds), then uploads its update (``upload_bytes``), when the model is a
   :class:`DeviceModel` (a device trace); a plain :class:`TaskSeconds` has compute time only;
2. drops out -- :class:`~shoal.events.ClientsFailed` with reason ``"offline"`` at the moment
   it goes offline -- if its session ends before its upload is done;
3. is never simulated past its task's deadline: the coordinator gives up on it then.

A :class:`LazyPool` (the in-process pool) is asked for an update only when the simulated
clock reaches the end of that client's training, and then trains the next clients of the
same model version together (up to its ``chunk``, earliest first): clients that drop out
before uploading anything, time out, or belong to a round that closed without them are never
trained, and buffered refills of one version train as one cohort. Training does not depend on
time, so this changes nothing but the cost. Without a time model, a pool's arrivals reach the
coordinator in the order it yields them, at the clock's current time.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from shoal.clock import Clock, SimClock
from shoal.coordinator import Coordinator
from shoal.errors import ProtocolError
from shoal.events import (AbortRound, Arrival, CancelTask, ClientsFailed, ClientUpdate,
                          CommitVersion, Event, Finished, SendTask, TaskEnded, Tick, TrainTask,
                          UpdateBatch, UpdatesArrived, WakeAt)
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
class LazyPool(Protocol):
    """A pool that can say what a task will cost before training it, and train any clients
    of one model version together when their updates are due (see the module docstring)."""

    @property
    def num_clients(self) -> int: ...

    @property
    def chunk(self) -> int:
        """Clients trained together at most."""
        ...

    def train(self, task: TrainTask, client_ids: np.ndarray) -> Iterable[Arrival]: ...

    def example_counts(self, client_ids: np.ndarray) -> np.ndarray:
        """Training examples of each client (int64)."""
        ...

    def download(self, task: TrainTask, client_ids: np.ndarray) -> np.ndarray:
        """Bytes each client downloads to get ``task``'s model (int64); records the sync."""
        ...

    def train_group(self, tasks: Sequence[TrainTask], client_ids: np.ndarray,
                    download_bytes: np.ndarray) -> Iterable[UpdateBatch]:
        """Train client ``client_ids[i]`` for ``tasks[i]`` (tasks of one version); yields
        their updates, ``download_bytes`` reported with them."""
        ...


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


class TaskSeconds(Protocol):
    """Simulated seconds each client of a task computes (training only)."""

    def __call__(self, task: TrainTask, client_ids: np.ndarray,
                 num_examples: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class DeviceModel(Protocol):
    """A time model with networks and availability (a device trace,
    :class:`~shoal.sim.devices.TracedDevices`): compute seconds as :class:`TaskSeconds`,
    plus transfer seconds and when each device goes offline."""

    def __call__(self, task: TrainTask, client_ids: np.ndarray,
                 num_examples: np.ndarray) -> np.ndarray: ...

    def transfer_seconds(self, client_ids: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """Seconds to move ``nbytes`` to or from each client."""
        ...

    def online_until(self, client_ids: np.ndarray, t: float) -> np.ndarray:
        """When each client's session ends (``inf``: never; ``t``: offline now)."""
        ...


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

    timeline = _Timeline(pool, task_seconds, feed) if task_seconds is not None else None
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


# -------------------------------------------------------------------------------------------
# Simulated time
# -------------------------------------------------------------------------------------------

_TICK, _TRAINED, _ARRIVE, _FAIL, _LAPSE = range(5)


@dataclass
class _Flight:
    """A task whose clients are still being simulated."""

    task: TrainTask
    open: int  # clients with an event still to come
    cancelled: bool = False
    lapsed: bool = False  # some client ran past the deadline: the coordinator's tick ends it
    ready: dict[int, Arrival] = field(default_factory=dict)  # trained, not yet delivered


@dataclass(order=True)
class _Due:
    """A client of a lazy pool whose training ends at ``at`` and is not trained yet."""

    at: float
    seq: int
    task_id: int = field(compare=False)
    client: int = field(compare=False)
    download_bytes: int = field(compare=False)


class _Timeline:
    """The discrete-event half of :func:`drive`: per-client events on a heap, ordered by
    (time, insertion), so the same run gives the same timeline."""

    def __init__(self, pool: ClientPool, seconds: TaskSeconds,
                 feed: Callable[[Event], None]) -> None:
        self.pool = pool
        self.seconds = seconds
        self.devices = seconds if isinstance(seconds, DeviceModel) else None
        self.lazy = pool if isinstance(pool, LazyPool) else None
        self.feed = feed
        self.heap: list[tuple[float, int, int, int, object]] = []
        self.seq = itertools.count()
        self.flights: dict[int, _Flight] = {}
        self.due: dict[int, list[_Due]] = {}  # version -> clients of lazy tasks

    def _push(self, at: float, kind: int, task_id: int, payload: object) -> int:
        n = next(self.seq)
        heapq.heappush(self.heap, (at, n, kind, task_id, payload))
        return n

    def wake(self, at: float) -> None:
        self._push(at, _TICK, 0, None)

    def cancel(self, task_id: int) -> None:
        flight = self.flights.get(task_id)
        if flight is not None:
            flight.cancelled = True
            flight.ready.clear()  # trained updates nobody will receive

    def send(self, task: TrainTask, client_ids: np.ndarray, now: float) -> None:
        """Schedule each client's download and training (and train now for an eager pool)."""
        ids = np.asarray(client_ids, dtype=np.int64)
        flight = _Flight(task, 0)
        self.flights[task.task_id] = flight
        if self.lazy is not None:
            examples = np.asarray(self.lazy.example_counts(ids), np.int64)
            down = np.asarray(self.lazy.download(task, ids), np.int64)
        else:
            ids, examples, down = self._train_now(flight, ids)
        compute = np.asarray(self.seconds(task, ids, examples), dtype=np.float64)
        if self.devices is not None:
            trained = now + self.devices.transfer_seconds(ids, down) + compute
            until = self.devices.online_until(ids, now)
        else:
            trained = now + compute
            until = np.full(ids.size, math.inf)
        for c, at, end, nbytes in zip(ids.tolist(), trained.tolist(), until.tolist(),
                                      down.tolist()):
            if end < at:  # offline before its training is done (or already offline)
                self._push(max(end, now), _FAIL, task.task_id, c)
            elif at > task.deadline:  # the coordinator gives up on it at the deadline
                self._push(task.deadline, _LAPSE, task.task_id, c)
            else:
                seq = self._push(at, _TRAINED, task.task_id, (c, end))
                if self.lazy is not None:
                    self.due.setdefault(task.version, []).append(
                        _Due(at, seq, task.task_id, c, nbytes))
            flight.open += 1
        if flight.open == 0:
            self._settle(task.task_id, now, count=False)

    def _train_now(self, flight: _Flight, ids: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An eager pool: train the task now; keep each client's update for its time."""
        got_ids, examples, down = [], [], []
        for item in self.pool.train(flight.task, ids):
            for part in _per_client(item):
                c = int(part.client_ids[0]) if isinstance(part, UpdateBatch) else \
                    int(part.client_id)
                flight.ready[c] = part
                got_ids.append(c)
                examples.append(int(np.asarray(part.num_examples).reshape(-1)[0]))
                down.append(int(np.sum(part.metrics.get("download_bytes", 0))))
        return (np.array(got_ids, np.int64), np.array(examples, np.int64),
                np.array(down, np.int64))

    def step(self, clock: SimClock) -> bool:
        """Handle the next event; False when none is left."""
        if not self.heap:
            return False
        at, _, kind, task_id, payload = heapq.heappop(self.heap)
        clock.advance_to(max(at, clock.now()))
        now = clock.now()
        if kind == _TICK:
            self.feed(Tick(now))
            return True
        flight = self.flights.get(task_id)
        if flight is None:
            return True
        if flight.cancelled:
            self._settle(task_id, now)
            return True
        if kind == _TRAINED:
            c, until = payload  # type: ignore[misc]
            self._trained(flight, c, until, now)
        elif kind == _ARRIVE:
            self.feed(UpdatesArrived(task_id, payload, now))  # type: ignore[arg-type]
            self._settle(task_id, now)
        elif kind == _LAPSE:  # past its deadline: the coordinator's tick times it out
            flight.lapsed = True
            self._settle(task_id, now)
        else:
            self.feed(ClientsFailed(task_id, (int(payload),), "offline", now))  # type: ignore
            self._settle(task_id, now)
        return True

    def _trained(self, flight: _Flight, client: int, until: float, now: float) -> None:
        task_id = flight.task.task_id
        arrival = flight.ready.pop(client, None)
        if arrival is None and self.lazy is not None:
            arrival = self._train_due(flight, client)
        if arrival is None:  # an eager pool's client that yielded nothing
            self._settle(task_id, now)
            return
        up = now
        if self.devices is not None:
            nbytes = np.asarray([np.sum(arrival.metrics.get("upload_bytes", 0))])
            up = now + float(self.devices.transfer_seconds(np.array([client]), nbytes)[0])
        if until < up:  # offline during the upload
            self._push(until, _FAIL, task_id, client)
        elif up > flight.task.deadline:  # the coordinator gives up on it at the deadline
            self._push(flight.task.deadline, _LAPSE, task_id, client)
        elif up == now:
            self.feed(UpdatesArrived(task_id, arrival, now))
            self._settle(task_id, now)
        else:
            self._push(up, _ARRIVE, task_id, arrival)

    def _train_due(self, flight: _Flight, client: int) -> Arrival | None:
        """Train ``client`` with the next clients of its version that are due, earliest
        first (at most the pool's ``chunk``)."""
        assert self.lazy is not None
        version = flight.task.version
        live = [d for d in self.due.get(version, ())
                if not self.flights[d.task_id].cancelled]
        live.sort()
        mine = next(i for i, d in enumerate(live)
                    if d.task_id == flight.task.task_id and d.client == client)
        take = live[:max(self.lazy.chunk, 1)]
        if mine >= len(take):
            take = [live[mine]] + take[:-1]
        taken = {(d.task_id, d.client) for d in take}
        rest = [d for d in live if (d.task_id, d.client) not in taken]
        if rest:
            self.due[version] = rest
        else:
            self.due.pop(version, None)
        take.sort(key=lambda d: (d.client, d.task_id))  # one order, whatever the timing
        tasks = [self.flights[d.task_id].task for d in take]
        ids = np.array([d.client for d in take], np.int64)
        down = np.array([d.download_bytes for d in take], np.int64)
        for item in self.lazy.train_group(tasks, ids, down):
            for part in _per_client(item):
                c = int(part.client_ids[0])  # type: ignore[union-attr]
                owner = next(d.task_id for d in take if d.client == c)
                self.flights[owner].ready[c] = part
        return flight.ready.pop(client, None)

    def _settle(self, task_id: int, now: float, count: bool = True) -> None:
        """One client of ``task_id`` is done with; the task ends with its last."""
        flight = self.flights.get(task_id)
        if flight is None:
            return
        if count:
            flight.open -= 1
        if flight.open <= 0:
            del self.flights[task_id]
            if not flight.cancelled and not flight.lapsed:
                self.feed(TaskEnded(task_id, now))


def _per_client(item: Arrival) -> Iterator[UpdateBatch | ClientUpdate]:
    """An arrival as one arrival per client (rows copied: a pool may reuse its buffers)."""
    if isinstance(item, ClientUpdate):
        yield item
    elif isinstance(item, UpdateBatch):
        for i in range(len(item.client_ids)):
            yield UpdateBatch(item.client_ids[i:i + 1].copy(), item.deltas[i:i + 1].copy(),
                              np.asarray(item.num_examples)[i:i + 1].copy(),
                              {k: np.asarray(v)[i:i + 1].copy()
                               for k, v in item.metrics.items()}, item.base_version)
    else:
        raise ProtocolError("a time model needs per-client arrivals; this pool sent a "
                            "group's aggregate (PartialAggregate)")


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
