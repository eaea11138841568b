"""Who trains: the coordinator's samplers, and the record of who took part.

A :class:`Sampler` draws a cohort -- sorted int64 client positions in ``range(num_clients)``
-- from the generator it is given, so cohorts are reproducible from (run seed, round,
attempt) in simulation and unpredictable (``os.urandom``) where differential privacy needs
them to be.

:class:`RegistrySampler` is the one sampler of both modes: a :mod:`shoal.selection` selector
picks rows of a registry's :class:`~shoal.registry.Columns` (attributes, availability
windows, participation), and the sampler maps them to the pool's client positions. In a
deployment the registry is the SQLite file of enrolled devices and position ``i`` is the
pool's ``i``-th device; in simulation it is an in-memory registry of virtual clients whose
row ``i`` is client ``i``, and :func:`recording` writes each cohort's outcomes back into it
(who was accepted, refused, dropped), which is what fairness-aware selection reads.
:class:`UniformSampler` is the registry sampler with the :class:`~shoal.selection.Uniform`
selector over an anonymous population (``Columns.of_size``, O(1) memory): its cohort is
``np.sort(rng.choice(num_clients, size=per_round, replace=False))``, the simulator's cohorts
since its first release. :class:`PoissonSampler` is the sampling differential-privacy
accounting assumes. :class:`OnlineSampler` draws uniformly among the clients a device trace
says are online at the simulated time, for sync cohorts and buffered tasks alike, without
scanning the population.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from shoal.errors import ConfigError
from shoal.events import (ClientsFailed, ClientUpdate, Command, SendTask, TaskEnded,
                          UpdateBatch, UpdateRefused, UpdatesArrived)
from shoal.registry.base import Registry
from shoal.registry.columns import Columns, encode_ids, find_ids
from shoal.selection import Selector, Uniform

__all__ = ["Availability", "IdleSampler", "OnlineSampler", "OutcomeRecorder", "OutcomeTap",
           "ParticipationCounts", "PoissonSampler", "RegistrySampler", "Sampler",
           "UniformSampler", "online_draw", "recording"]


class Sampler(Protocol):
    """Chooses a cohort (sorted int64 client ids) from ``num_clients`` using ``rng``;
    ``count`` overrides the sampler's own cohort size (over-selection)."""

    def sample(self, num_clients: int, rng: np.random.Generator,
               count: int | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class RegistrySampler:
    """The coordinator's :class:`Sampler` over a registry (see the module docstring).

    The registry is read at each round (participation and availability change). The cohort
    may be short when fewer clients are eligible -- in a deployment the round's
    ``min_fraction`` then decides.

    Attributes:
        selector: chooses rows of the registry's columns.
        per_round: the cohort size when the coordinator asks for none.
        devices: the pool's device ids, position ``i`` being ``devices[i]``; pool devices
            missing from the registry are never chosen. ``None``: position ``i`` is the
            registry's row ``i`` (the simulator's ``sequential_ids``).
        registry: returns the registry to read each round; ``None``: an anonymous
            population of ``num_clients`` clients (``Columns.of_size``: no attributes, no
            windows, no participation).
        clock: ``now`` for availability windows (seconds since the epoch).

    Raises:
        ConfigError: ``per_round`` is not an int >= 1; ``devices`` without a registry.
    """

    selector: Selector
    per_round: int
    devices: Sequence[str] | None = None
    registry: Callable[[], Registry] | None = None
    clock: Callable[[], float] = time.time
    #: the pool's ids (position order), sorted, and the position of each sorted one
    _pool: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(
        default=None, init=False, repr=False, compare=False)
    #: clients whose updates the coordinator is judging (set by :class:`OutcomeTap`)
    _judged: _Judged = field(default_factory=lambda: _Judged(), init=False, repr=False,
                             compare=False)

    def __post_init__(self) -> None:
        k = self.per_round
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"sampling.per_round = {k!r} must be an int >= 1",
                              key="sampling.per_round")
        if self.devices is not None:
            if self.registry is None:
                raise ConfigError("a sampler over named devices needs their registry",
                                  key="sampling.selection")
            ids = encode_ids(self.devices)
            order = np.argsort(ids, kind="stable")
            object.__setattr__(self, "_pool", (ids, ids[order], order))

    def sample(self, num_clients: int, rng: np.random.Generator,
               count: int | None = None) -> np.ndarray:
        """Up to ``count`` (default ``per_round``) client positions, sorted int64.

        Raises:
            ConfigError: the registry does not hold the pool's clients.
        """
        k = self.per_round if count is None else count
        cols = self.registry().columns() if self.registry is not None \
            else Columns.of_size(num_clients)
        if self._pool is None:
            if cols.size != num_clients:
                raise ConfigError(f"the registry holds {cols.size} clients, the pool "
                                  f"{num_clients}: client i must be the registry's row i",
                                  key="data.clients")
            return self.selector.select(self._counting_judged(cols), k, rng, self.clock())
        among, position = self._rows_of_pool(cols)
        chosen = self.selector.select(cols, k, rng, self.clock(), among)
        return np.sort(position[np.searchsorted(among, chosen)])

    def _counting_judged(self, cols: Columns) -> Columns:
        """``cols`` with one more participation for the clients being judged.

        The coordinator draws the next cohort inside the event that completes a round, so
        the outcomes of that event's updates are recorded only after the draw: counting
        them as taken part (they nearly always are) keeps fairness-aware selection from
        seeing a round late. Positions are rows here (a pool without named devices).
        """
        judged = self._judged.positions
        if judged.size == 0:
            return cols
        part = np.array(cols.participation, dtype=np.int64)
        part[judged] += 1
        return dataclasses.replace(cols, participation=part)

    def _rows_of_pool(self, cols: Columns) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, positions)``: the registry rows of the pool's devices that it holds
        (sorted) and each one's position in the pool."""
        assert self._pool is not None
        _, ids, order = self._pool
        if cols.ids is None:
            raise ConfigError("an anonymous population (Columns.of_size) has no device ids "
                              "to find the pool's devices by", key="sampling.selection")
        rows, held = find_ids(cols.ids, ids)
        return rows[held], order[held].astype(np.int64)

    def record(self, positions: np.ndarray, round: int, outcome: str, now: float) -> None:
        """Record ``outcome`` in ``round`` for the clients at ``positions`` (one call to
        the registry's :meth:`~shoal.registry.Registry.record_outcomes`)."""
        if self.registry is None or len(positions) == 0:
            return
        registry = self.registry()
        positions = np.asarray(positions, dtype=np.int64)
        if self._pool is not None:
            named = self._pool[0][positions]
        else:
            ids = registry.columns().ids
            if ids is None:
                raise ConfigError("an anonymous population has no device ids to record "
                                  "outcomes under", key="sampling.selection")
            named = ids[positions]
        registry.record_outcomes(named, round, outcome, now=now)


class _Judged:
    """A mutable slot in a frozen sampler: the positions of the clients whose updates the
    coordinator is judging while it may draw the next cohort."""

    def __init__(self) -> None:
        self.positions = np.zeros(0, dtype=np.int64)


class Availability(Protocol):
    """Who is online when: a device trace (:class:`~shoal.sim.traces.DeviceTrace`)."""

    def online(self, client_ids: np.ndarray, t: float) -> np.ndarray:
        """Whether each client is online at ``t`` (bool)."""
        ...


@runtime_checkable
class IdleSampler(Protocol):
    """A sampler that also picks clients for buffered tasks (the coordinator asks it, with
    the clients already busy, instead of drawing uniformly itself)."""

    def sample(self, num_clients: int, rng: np.random.Generator,
               count: int | None = None) -> np.ndarray: ...

    def idle(self, num_clients: int, count: int, rng: np.random.Generator,
             busy: AbstractSet[int]) -> np.ndarray:
        """``count`` clients (sorted int64), none of ``busy``; fewer, or none, when fewer
        are eligible."""
        ...


@dataclass(frozen=True)
class OnlineSampler:
    """Uniform among the clients online at the simulated time: the sampler of a run on a
    device trace, for sync cohorts and buffered tasks alike.

    A candidate is drawn uniformly from the whole population and kept if it is online (and
    not busy, not yet drawn): rejection sampling, which yields a uniformly random subset of
    the eligible clients and costs ``O(count / online fraction)`` availability look-ups of
    ``O(log windows)`` each -- selecting 1,300 clients out of ten million asks about a few
    thousand, never all. When few clients are eligible (under 1 in 64 of those drawn so far)
    the rest of the cohort is drawn from a full scan instead, which keeps the draw uniform.

    Attributes:
        availability: who is online when.
        per_round: the cohort size when the coordinator asks for none.
        clock: the simulated time (the run's :class:`~shoal.clock.SimClock` ``now``).

    Raises:
        ConfigError: ``per_round`` is not an int >= 1.
    """

    availability: Availability
    per_round: int
    clock: Callable[[], float]

    def __post_init__(self) -> None:
        k = self.per_round
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"sampling.per_round = {k!r} must be an int >= 1",
                              key="sampling.per_round")

    def sample(self, num_clients: int, rng: np.random.Generator,
               count: int | None = None) -> np.ndarray:
        k = self.per_round if count is None else count
        return online_draw(num_clients, k, rng, self.availability, self.clock())

    def idle(self, num_clients: int, count: int, rng: np.random.Generator,
             busy: AbstractSet[int]) -> np.ndarray:
        return online_draw(num_clients, count, rng, self.availability, self.clock(),
                           np.fromiter(busy, np.int64, len(busy)))


def online_draw(n: int, count: int, rng: np.random.Generator, availability: Availability,
                now: float, exclude: np.ndarray | None = None) -> np.ndarray:
    """``count`` clients of ``range(n)`` uniformly without replacement among those online at
    ``now`` and not in ``exclude``; all of them (sorted) if fewer are eligible. See
    :class:`OnlineSampler` for the method."""
    count = max(0, int(count))
    barred = np.unique(np.asarray(exclude if exclude is not None else (), np.int64))
    picked: list[np.ndarray] = []
    got = drawn = kept = 0
    seen = np.zeros(0, np.int64)  # sorted: every candidate looked at
    while got < count and seen.size + barred.size < n:
        rate = (kept + 1) / (drawn + 1)
        if drawn >= 64 and rate < 1 / 64:
            break  # few are eligible: scan them all
        m = min(int(1.25 * (count - got) / rate) + 32, 4 * n)
        cand = rng.integers(n, size=m)
        _, first = np.unique(cand, return_index=True)
        cand = cand[np.sort(first)]  # draw order, each once
        cand = cand[~np.isin(cand, seen, assume_unique=True)]
        seen = np.union1d(seen, cand)
        ok = cand[~np.isin(cand, barred) & availability.online(cand, now)]
        drawn += cand.size
        kept += ok.size
        take = ok[:count - got]
        picked.append(take)
        got += take.size
    out = np.concatenate([np.zeros(0, np.int64), *picked])
    if got < count and seen.size + barred.size < n:
        # the rest from the eligible clients not drawn yet: still a uniform subset
        rest = np.setdiff1d(np.arange(n, dtype=np.int64), np.union1d(seen, barred),
                            assume_unique=True)
        rest = rest[availability.online(rest, now)]
        more = rest if rest.size <= count - got else rng.choice(rest, count - got,
                                                                 replace=False)
        out = np.concatenate((out, more))
    return np.sort(out)


@dataclass
class ParticipationCounts:
    """Accepted updates per client, as one int32 column (4 bytes a client): who gets to
    train. An :class:`OutcomeTap` records into it."""

    counts: np.ndarray

    @classmethod
    def of_size(cls, n: int) -> ParticipationCounts:
        return cls(np.zeros(n, np.int32))

    def record(self, positions: np.ndarray, round: int, outcome: str, now: float) -> None:
        if outcome == "accepted" and len(positions):
            np.add.at(self.counts, np.asarray(positions, np.int64), 1)

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(times, clients)``: how many clients trained exactly ``times`` times."""
        hist = np.bincount(self.counts)
        times = np.flatnonzero(hist)
        return times, hist[times]


class UniformSampler(RegistrySampler):
    """``per_round`` clients uniformly at random without replacement (sorted ids): the
    :class:`~shoal.selection.Uniform` selector over an anonymous population, exactly
    ``np.sort(rng.choice(num_clients, size=per_round, replace=False))``."""

    def __init__(self, per_round: int) -> None:
        super().__init__(Uniform(), per_round)


@dataclass(frozen=True)
class PoissonSampler:
    """Each client joins independently with probability ``q`` (the sampling that
    differential-privacy accounting assumes); the cohort size varies and may be 0."""

    q: float

    def sample(self, num_clients: int, rng: np.random.Generator,
               count: int | None = None) -> np.ndarray:
        if not 0.0 < self.q <= 1.0:
            raise ConfigError(f"sampling.q = {self.q} must be in (0, 1]", key="sampling.q")
        if count is not None:
            raise ConfigError("Poisson sampling has no fixed cohort size to over-select; "
                              "use sampling.method = 'uniform' with round.over_selection",
                              key="round.over_selection")
        return np.flatnonzero(rng.random(num_clients) < self.q)


# ---------------------------------------------------------------------------------------------
# Who took part
# ---------------------------------------------------------------------------------------------


class OutcomeTap:
    """A coordinator seen through: events and commands pass unchanged, and each client's
    outcome goes to ``sampler``'s registry -- ``accepted`` for an arrival's clients that no
    :class:`~shoal.events.UpdateRefused` of the answer names, ``late`` or
    ``rejected:<reason>`` for those it names, ``dropped`` for failed clients. One vectorized
    registry call per outcome and event: O(clients of the event), nothing per idle client.

    The simulator's carrier (:func:`~shoal.runner.drive`) drives the tap in place of the
    coordinator; a deployment records outcomes in its gateway instead.
    """

    def __init__(self, coordinator: Any, sampler: RegistrySampler | None,
                 also: Sequence[OutcomeRecorder] = ()) -> None:
        self.coordinator = coordinator
        self.sampler = sampler
        self.recorders: list[OutcomeRecorder] = ([sampler] if sampler is not None else []) \
            + list(also)
        self._round: dict[int, int] = {}  # open task -> its round

    def _record(self, positions: np.ndarray, round: int, outcome: str, now: float) -> None:
        for r in self.recorders:
            r.record(positions, round, outcome, now)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.coordinator, name)

    def start(self, state: object, now: float, stage_states: tuple | None = None
              ) -> list[Command]:
        return self._sent(self.coordinator.start(state, now, stage_states))

    def handle(self, event: Any) -> list[Command]:
        rnd = self._round.get(getattr(event, "task_id", -1))
        clients = _clients(event.arrival) if isinstance(event, UpdatesArrived) else None
        judging = clients is not None and rnd is not None and self.sampler is not None \
            and self.sampler.devices is None
        if judging:
            self.sampler._judged.positions = clients  # type: ignore[union-attr]
        try:
            cmds = self._sent(self.coordinator.handle(event))
        finally:
            if judging:
                self.sampler._judged.positions = np.zeros(0, dtype=np.int64)  # type: ignore
        if clients is not None and rnd is not None:
            self._arrived(event, clients, rnd, cmds)
        elif isinstance(event, ClientsFailed) and rnd is not None:
            self._record(np.asarray(event.client_ids), rnd, "dropped", event.now)
        elif isinstance(event, TaskEnded):
            self._round.pop(event.task_id, None)
        return cmds

    def _sent(self, cmds: list[Command]) -> list[Command]:
        for c in cmds:
            if isinstance(c, SendTask):
                self._round[c.task.task_id] = c.task.round
        return cmds

    def _arrived(self, event: UpdatesArrived, clients: np.ndarray, rnd: int,
                 cmds: list[Command]) -> None:
        refused = np.zeros(0, np.int64)
        for c in cmds:
            if isinstance(c, UpdateRefused) and c.task_id == event.task_id and c.client_ids:
                ids = np.intersect1d(np.asarray(c.client_ids, np.int64), clients)
                ids = np.setdiff1d(ids, refused)  # a client's first refusal is its outcome
                outcome = "late" if c.reason == "late" else f"rejected:{c.reason}"
                self._record(ids, rnd, outcome, event.now)
                refused = np.union1d(refused, ids)
        self._record(np.setdiff1d(clients, refused), rnd, "accepted", event.now)


def _clients(item: object) -> np.ndarray | None:
    """The clients of an arrival; ``None`` for a group's aggregate, which names none."""
    if isinstance(item, ClientUpdate):
        return np.array([item.client_id], dtype=np.int64)
    if isinstance(item, UpdateBatch):
        return np.asarray(item.client_ids, dtype=np.int64)
    return None


class OutcomeRecorder(Protocol):
    """Where an :class:`OutcomeTap` writes each client's outcome."""

    def record(self, positions: np.ndarray, round: int, outcome: str, now: float) -> None: ...


def recording(coordinator: Any, sampler: Sampler, also: Sequence[OutcomeRecorder] = ()
              ) -> Any:
    """``coordinator`` behind an :class:`OutcomeTap` when ``sampler`` reads a registry (so
    the registry learns who took part) or other recorders (``also``, e.g.
    :class:`ParticipationCounts`) want the outcomes, else ``coordinator`` itself."""
    reads = isinstance(sampler, RegistrySampler) and sampler.registry is not None
    if reads or also:
        return OutcomeTap(coordinator, sampler if reads else None, also)  # type: ignore
    return coordinator
