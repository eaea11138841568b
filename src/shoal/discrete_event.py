"""Simulated device time: the discrete-event half of :func:`shoal.runner.drive`.

Every client of a task gets its own events on one heap, ordered by (simulated time,
insertion), so the same run gives the same timeline. A client

1. downloads the model (``download_bytes`` over its bandwidth), trains (the time model's
   compute seconds) and uploads its update (``upload_bytes``), when the time model is a
   :class:`DeviceModel` (a device trace); a plain :class:`TaskSeconds` has compute time only;
2. drops out -- :class:`~shoal.events.ClientsFailed` with reason ``"offline"``, at the moment
   its session ends -- if it goes offline before its upload is done;
3. is never simulated past its task's deadline: the coordinator's tick gives up on it then.

A :class:`LazyPool` (the in-process pool) is asked for an update only when the simulated
clock reaches that client's arrival (or the end of its training, when the upload's size is
only known once the update is encoded). It then trains the next due clients of the same model
version together (up to its ``chunk``, earliest first), so clients that drop out, time out,
or belong to a round that closed without them are never trained, and buffered refills of one
version train as one cohort. A run of arrivals of one task that the coordinator can take
before its policy acts (``Coordinator.room``) reaches it as one event. Training does not
depend on time, so neither changes anything but the cost.

Trained updates wait for their arrival in reused float32 blocks (:class:`_Rows`): no
allocation per client, and a run of arrivals is gathered into a reused buffer that the
coordinator folds before the next delivery (every sum rule copies or accumulates what it
folds). They take memory for the updates trained and not yet delivered: about a cohort in
sync rounds, up to the clients in flight in buffered aggregation (one model version's
refills train together).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from shoal.clock import SimClock
from shoal.errors import ProtocolError
from shoal.events import (Arrival, ClientsFailed, ClientUpdate, Event, TaskEnded, Tick,
                          TrainTask, UpdateBatch, UpdatesArrived)

__all__ = ["DeviceModel", "DeviceTimeline", "LazyPool", "TaskSeconds"]


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


@runtime_checkable
class LazyPool(Protocol):
    """A pool that can say what a task will cost before training it, and train any clients
    of one model version together when their updates are due."""

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

    def upload_bytes(self, client_ids: np.ndarray) -> np.ndarray | None:
        """Bytes each client will upload, if known before training (uncompressed updates);
        ``None`` when only the encoded update tells."""
        ...

    def train_group(self, tasks: Sequence[TrainTask], client_ids: np.ndarray,
                    download_bytes: np.ndarray) -> Iterable[UpdateBatch]:
        """Train client ``client_ids[i]`` for ``tasks[i]`` (tasks of one version); yields
        their updates, ``download_bytes`` reported with them."""
        ...


_TICK, _TRAINED, _ARRIVE, _FAIL, _LAPSE = range(5)
#: rows per block of stored updates (the 2NN: 51 MB a block)
_BLOCK = 64


class _Rows:
    """Update rows waiting for delivery, in float32 blocks of :data:`_BLOCK` rows reused
    across the run (a new block only when every row is taken: no copy as it grows), and a
    reused buffer to gather a delivery into. Slot ``s`` is row ``s % _BLOCK`` of block
    ``s // _BLOCK``."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.free: list[int] = []
        self.out = np.empty((0, 0), np.float32)

    def store(self, rows: np.ndarray) -> list[int]:
        k, dim = rows.shape
        if self.blocks and self.blocks[0].shape[1] != dim:
            raise ProtocolError("updates of different lengths in one run")
        while len(self.free) < k:
            first = len(self.blocks) * _BLOCK
            self.blocks.append(np.empty((_BLOCK, dim), np.float32))
            self.free.extend(range(first + _BLOCK - 1, first - 1, -1))
        slots = [self.free.pop() for _ in range(k)]
        for i, slot in enumerate(slots):
            self.blocks[slot // _BLOCK][slot % _BLOCK] = rows[i]
        return slots

    def gather(self, slots: list[int]) -> np.ndarray:
        """The rows at ``slots`` as one matrix, valid until the next call."""
        dim = self.blocks[0].shape[1]
        if self.out.shape[0] < len(slots) or self.out.shape[1] != dim:
            self.out = np.empty((max(len(slots), 2 * self.out.shape[0]), dim), np.float32)
        out = self.out[:len(slots)]
        for i, slot in enumerate(slots):
            out[i] = self.blocks[slot // _BLOCK][slot % _BLOCK]
        return out

    def release(self, slots: Iterable[int]) -> None:
        self.free.extend(slots)


@dataclass
class _Ready:
    """A client's trained update: its row and what travels with it."""

    slot: int
    examples: int
    metrics: dict[str, float]
    base_version: int | None


@dataclass
class _Flight:
    """A task whose clients are still being simulated."""

    task: TrainTask
    open: int  # clients with an event still to come
    cancelled: bool = False
    lapsed: bool = False  # some client ran past the deadline: the coordinator's tick ends it
    ready: dict[int, _Ready] = field(default_factory=dict)  # trained, not yet delivered


@dataclass(order=True)
class _Due:
    """A client of a lazy pool, not trained yet, whose update is due at ``at``."""

    at: float
    seq: int
    task_id: int = field(compare=False)
    client: int = field(compare=False)
    download_bytes: int = field(compare=False)


class DeviceTimeline:
    """Per-client events of the tasks a carrier loop sends, on a simulated clock.

    Args:
        pool: the clients (a :class:`LazyPool` is trained lazily, another pool at once).
        seconds: the time model.
        feed: hands an event to the coordinator (and queues its commands).
        room: ``Coordinator.room``: how many arrivals of a task may come as one event.
    """

    def __init__(self, pool: object, seconds: TaskSeconds, feed: Callable[[Event], None],
                 room: Callable[[int], int] | None = None) -> None:
        self.pool = pool
        self.seconds = seconds
        self.devices = seconds if isinstance(seconds, DeviceModel) else None
        self.lazy = pool if isinstance(pool, LazyPool) else None
        self.feed = feed
        self.room = room or (lambda task_id: 1)
        self.most = max(1, self.lazy.chunk) if self.lazy is not None else 64
        # (time, insertion, kind, task, (client, end of its session))
        self.heap: list[tuple[float, int, int, int, tuple[int, float]]] = []
        self.seq = itertools.count()
        self.flights: dict[int, _Flight] = {}
        self.due: dict[int, list[_Due]] = {}  # version -> clients of lazy tasks
        self.rows = _Rows()

    def _push(self, at: float, kind: int, task_id: int = 0, client: int = 0,
              until: float = math.inf) -> int:
        n = next(self.seq)
        heapq.heappush(self.heap, (at, n, kind, task_id, (client, until)))
        return n

    def wake(self, at: float) -> None:
        """A :class:`~shoal.events.Tick` at ``at``."""
        self._push(at, _TICK)

    def cancel(self, task_id: int) -> None:
        """The task's round closed: nothing more of it reaches the coordinator."""
        flight = self.flights.get(task_id)
        if flight is not None:
            flight.cancelled = True
            self.rows.release(r.slot for r in flight.ready.values())
            flight.ready.clear()
            version = flight.task.version  # its clients will never be trained
            due = [d for d in self.due.get(version, ()) if d.task_id != task_id]
            if due:
                self.due[version] = due
            else:
                self.due.pop(version, None)

    # -- sending ----------------------------------------------------------------------------

    def send(self, task: TrainTask, client_ids: np.ndarray, now: float) -> None:
        """Schedule each client's download, training and upload (and train now for an
        eager pool)."""
        ids = np.asarray(client_ids, dtype=np.int64)
        flight = _Flight(task, 0)
        self.flights[task.task_id] = flight
        up: np.ndarray | None
        if self.lazy is not None:
            examples = np.asarray(self.lazy.example_counts(ids), np.int64)
            down = np.asarray(self.lazy.download(task, ids), np.int64)
            up = self.lazy.upload_bytes(ids)
        else:
            ids, examples, down, up = self._train_now(flight, ids)
        trained = now + np.asarray(self.seconds(task, ids, examples), dtype=np.float64)
        done = trained
        until = np.full(ids.size, math.inf)
        if self.devices is not None:
            trained = trained + self.devices.transfer_seconds(ids, down)
            done = trained if up is None else \
                trained + self.devices.transfer_seconds(ids, np.asarray(up))
            until = self.devices.online_until(ids, now)
        # with the upload's size known, the whole timeline is known now: the update is due
        # at its arrival; otherwise at the end of training, when its size is learnt
        kind = _TRAINED if up is None else _ARRIVE
        for c, at, end, nbytes in zip(ids.tolist(), done.tolist(), until.tolist(),
                                      down.tolist()):
            if end < at:  # offline before its upload is done (or already offline)
                self._push(max(end, now), _FAIL, task.task_id, c)
            elif at > task.deadline:  # the coordinator gives up on it at the deadline
                self._push(task.deadline, _LAPSE, task.task_id, c)
            else:
                seq = self._push(at, kind, task.task_id, c, end)
                if self.lazy is not None:
                    self.due.setdefault(task.version, []).append(
                        _Due(at, seq, task.task_id, c, nbytes))
            flight.open += 1
        if flight.open == 0:
            self._settle(task.task_id, now, count=False)

    def _train_now(self, flight: _Flight, ids: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """An eager pool: train the task now; keep each client's update for its time."""
        got: list[int] = []
        for item in self.pool.train(flight.task, ids):  # type: ignore[attr-defined]
            got += self._store(item, {c: flight for c in ids.tolist()})
        ready = [flight.ready[c] for c in got]
        return (np.array(got, np.int64), np.array([r.examples for r in ready], np.int64),
                np.array([r.metrics.get("download_bytes", 0) for r in ready], np.int64),
                np.array([r.metrics.get("upload_bytes", 0) for r in ready], np.int64))

    def _store(self, item: Arrival, owners: dict[int, _Flight]) -> list[int]:
        """Keep ``item``'s rows for delivery, each with its client's flight; its clients."""
        if isinstance(item, ClientUpdate):
            item = UpdateBatch(np.array([item.client_id], np.int64),
                               np.asarray(item.delta, np.float32)[np.newaxis],
                               np.array([item.num_examples], np.int64),
                               {k: np.array([v]) for k, v in item.metrics.items()},
                               item.base_version)
        elif not isinstance(item, UpdateBatch):
            raise ProtocolError("a time model needs per-client arrivals; this pool sent a "
                                "group's aggregate (PartialAggregate)")
        ids = np.asarray(item.client_ids, np.int64).tolist()
        slots = self.rows.store(np.asarray(item.deltas, np.float32))
        examples = np.asarray(item.num_examples).tolist()
        metrics = {k: np.asarray(v).tolist() for k, v in item.metrics.items()}
        for i, (c, slot) in enumerate(zip(ids, slots)):
            owners[c].ready[c] = _Ready(slot, int(examples[i]),
                                        {k: v[i] for k, v in metrics.items()},
                                        item.base_version)
        return ids

    # -- the clock --------------------------------------------------------------------------

    def step(self, clock: SimClock) -> bool:
        """Handle the next event (or a run of arrivals of one task); False when none is
        left."""
        if not self.heap:
            return False
        at, _, kind, task_id, (client, until) = heapq.heappop(self.heap)
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
        elif kind == _TRAINED:
            self._trained(flight, client, until, now)
        elif kind == _ARRIVE:
            self._arrive(flight, [client], clock)
        elif kind == _LAPSE:  # past its deadline: the coordinator's tick times it out
            flight.lapsed = True
            self._settle(task_id, now)
        else:
            self.feed(ClientsFailed(task_id, (client,), "offline", now))
            self._settle(task_id, now)
        return True

    def _arrive(self, flight: _Flight, clients: list[int], clock: SimClock) -> None:
        """Deliver ``clients``' updates with the arrivals of the same task that come next,
        as many as the coordinator can take before its policy acts."""
        task_id = flight.task.task_id
        room = min(self.room(task_id), self.most)
        while len(clients) < room and self.heap and self.heap[0][2] == _ARRIVE \
                and self.heap[0][3] == task_id:
            at, _, _, _, (client, _) = heapq.heappop(self.heap)
            clock.advance_to(max(at, clock.now()))
            clients.append(client)
        ready = []
        for c in clients:
            if c not in flight.ready and self.lazy is not None:
                self._train_due(flight, c)
            if c in flight.ready:
                ready.append((c, flight.ready.pop(c)))
        now = clock.now()
        if ready:
            base = ready[0][1].base_version
            if any(r.base_version != base for _, r in ready):
                raise ProtocolError("updates of one task must share a base version")
            slots = [r.slot for _, r in ready]
            keys = ready[0][1].metrics.keys()
            batch = UpdateBatch(np.array([c for c, _ in ready], np.int64),
                                self.rows.gather(slots),
                                np.array([r.examples for _, r in ready], np.int64),
                                {k: np.array([r.metrics[k] for _, r in ready]) for k in keys},
                                base)
            self.feed(UpdatesArrived(task_id, batch, now))
            self.rows.release(slots)
        for _ in clients:
            self._settle(task_id, now)

    def _trained(self, flight: _Flight, client: int, until: float, now: float) -> None:
        """The end of a client's training when its upload's size was not known: train it
        (lazily), then schedule its upload."""
        task_id = flight.task.task_id
        if client not in flight.ready and self.lazy is not None:
            self._train_due(flight, client)
        ready = flight.ready.get(client)
        if ready is None:  # an eager pool's client that yielded nothing
            self._settle(task_id, now)
            return
        up = now
        if self.devices is not None:
            nbytes = np.array([ready.metrics.get("upload_bytes", 0)])
            up = now + float(self.devices.transfer_seconds(np.array([client]), nbytes)[0])
        if until < up or up > flight.task.deadline:
            self.rows.release([flight.ready.pop(client).slot])
            if until < up:  # offline during the upload
                self._push(until, _FAIL, task_id, client)
            else:  # the coordinator gives up on it at the deadline
                self._push(flight.task.deadline, _LAPSE, task_id, client)
        else:
            self._push(up, _ARRIVE, task_id, client, until)

    def _train_due(self, flight: _Flight, client: int) -> None:
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
        owners = {d.client: self.flights[d.task_id] for d in take}
        for item in self.lazy.train_group([self.flights[d.task_id].task for d in take],
                                          np.array([d.client for d in take], np.int64),
                                          np.array([d.download_bytes for d in take],
                                                   np.int64)):
            self._store(item, owners)

    def _settle(self, task_id: int, now: float, count: bool = True) -> None:
        """One client of ``task_id`` is done with; the task ends with its last."""
        flight = self.flights.get(task_id)
        if flight is None:
            return
        if count:
            flight.open -= 1
        if flight.open <= 0:
            del self.flights[task_id]
            self.rows.release(r.slot for r in flight.ready.values())
            if not flight.cancelled and not flight.lapsed:
                self.feed(TaskEnded(task_id, now))
