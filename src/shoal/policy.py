"""Round policies: *when* the coordinator opens, closes and commits, and nothing else.

* :class:`SyncPolicy` -- synchronous rounds: ask ``ceil(target x over_selection)`` clients,
  close the round when ``target`` updates are in, when every asked client has reported or
  failed, or at the deadline; commit with at least ``ceil(min_fraction x target)`` updates,
  otherwise abandon the round and retry it with a fresh cohort (at most ``max_attempts``
  times). Stragglers of a closed round are cancelled; their late updates are refused.
* :class:`BufferedPolicy` -- buffered asynchronous aggregation, FedBuff (J. Nguyen et al.,
  "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022): keep
  ``concurrency`` clients training at all times, each from the version current when it was
  asked; every arriving update is scaled by the staleness weight ``1 / (1 + s)^a`` with
  ``s = current version - base version``, updates older than ``max_staleness`` versions are
  refused with reason ``"stale"``, and after ``buffer_size`` updates the server steps.

A policy talks to the coordinator through the small :class:`Engine` interface (send a task,
close the current aggregation, cancel a task, ask for a wake-up) and keeps only its own
bookkeeping; aggregation, selection and records are the coordinator's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from shoal.errors import ConfigError, UpdateRejected

__all__ = ["Engine", "RoundPolicy", "SyncPolicy", "BufferedPolicy", "staleness_weight"]


class Engine(Protocol):
    """What a policy may ask of the coordinator."""

    @property
    def version(self) -> int: ...

    @property
    def accepted(self) -> int:
        """Client updates folded into the open aggregation."""
        ...

    @property
    def now(self) -> float: ...

    @property
    def releases_empty(self) -> bool:
        """The pipeline releases a result even without updates (central DP: noise alone,
        accounted whether or not anyone reported)."""
        ...

    def can_step(self) -> bool:
        """False once the run's steps are done or a stage (privacy budget) forbids one."""
        ...

    def send(self, count: int | None, deadline: float) -> int | None:
        """Ask ``count`` clients (``None``: the sampler's own choice) to train the current
        version; returns the task id, or ``None`` when nobody could be asked."""
        ...

    def outstanding(self, task_id: int) -> int:
        """Clients of the task that neither reported nor failed yet."""
        ...

    def close(self, closed_by: str, *, commit: bool, retry: bool) -> bool:
        """Finish the open aggregation: commit a version (``commit``) or abandon it; returns
        whether a version was committed (the pipeline may still abort)."""
        ...

    def cancel(self, task_id: int, reason: str) -> None: ...

    def wake_at(self, at: float) -> None: ...


class RoundPolicy(Protocol):
    name: str

    def start(self, engine: Engine) -> None: ...

    def on_update(self, engine: Engine, task_id: int) -> None: ...

    def on_end(self, engine: Engine, task_id: int, abandoned: bool) -> None: ...

    def on_tick(self, engine: Engine, now: float) -> None: ...

    def staleness_weight(self, staleness: int) -> float:
        """The factor an update ``staleness`` versions old is scaled by.

        Raises:
            UpdateRejected: ``"stale"``, the update may not be folded at all.
        """
        ...


def staleness_weight(staleness: int, exponent: float, reference: float = 0.0) -> float:
    """FedBuff's polynomial staleness weight, normalised at ``reference``:
    ``((1 + reference) / (1 + s))^a``.

    ``reference = 0`` is the paper's ``1 / (1 + s)^a`` (1 for a fresh update; every stale
    update shrinks the step). FLSim, the paper's reference implementation, divides by the
    weight at an expected staleness (default 1), so an update as stale as usual keeps its full
    size and only the relative weights change.
    """
    return ((1.0 + reference) / (1.0 + staleness)) ** exponent


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, key=key)


@dataclass
class SyncPolicy:
    """Synchronous rounds with over-selection, a deadline and a minimum fraction.

    Args:
        target: updates that complete a round; ``None`` = every asked client.
        over_selection: clients asked = ``ceil(target x this)`` (>= 1; needs ``target``).
        deadline_s: how long a round stays open; ``inf`` = until every asked client is done.
        min_fraction: a round commits with at least ``ceil(min_fraction x target)``
            updates (at least one); below that it is abandoned and retried.
        max_attempts: fresh cohorts tried per round before the run gives up.
        idle_wait_s: when nobody can be asked (no device online in a simulated trace), wait
            this long and ask again, without counting an attempt; 0 = abandon the attempt.
    """

    target: int | None = None
    over_selection: float = 1.0
    deadline_s: float = math.inf
    min_fraction: float = 0.0
    max_attempts: int = 5
    idle_wait_s: float = 0.0
    name: str = "sync"
    _task: int | None = field(default=None, init=False, repr=False)
    _asked: int = field(default=0, init=False, repr=False)
    _deadline: float = field(default=math.inf, init=False, repr=False)
    _attempt: int = field(default=0, init=False, repr=False)
    _idle_until: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _check(self.target is None or self.target >= 1, "round.target",
               f"round.target must be >= 1, got {self.target!r}")
        _check(math.isfinite(self.over_selection) and self.over_selection >= 1.0,
               "round.over_selection", f"round.over_selection must be >= 1, got "
               f"{self.over_selection!r}")
        _check(self.deadline_s > 0, "round.deadline_s",
               f"round.deadline_s must be > 0, got {self.deadline_s!r}")
        _check(0.0 <= self.min_fraction <= 1.0, "round.min_fraction",
               f"round.min_fraction must be in [0, 1], got {self.min_fraction!r}")
        _check(self.max_attempts >= 1, "round.max_attempts",
               f"round.max_attempts must be >= 1, got {self.max_attempts!r}")
        _check(math.isfinite(self.idle_wait_s) and self.idle_wait_s >= 0, "sim.idle_wait_s",
               f"idle_wait_s must be a finite number >= 0, got {self.idle_wait_s!r}")

    @property
    def attempt(self) -> int:
        """Retry number of the current round (0 for its first cohort)."""
        return self._attempt

    def _target(self) -> int:
        # a cohort smaller than the target (a small population, few eligible devices) is
        # judged against what it could deliver
        if self.target is None:
            return self._asked
        return min(self.target, self._asked) if self._asked else self.target

    def min_accepted(self) -> int:
        # 1e-9 tolerance: 0.7 * 10 is 7.000000000000001 in floating point and means 7
        return max(1, math.ceil(self.min_fraction * self._target() - 1e-9))

    def _open(self, engine: Engine) -> None:
        if not engine.can_step():
            return
        count = None if self.target is None else \
            math.ceil(self.target * self.over_selection - 1e-9)
        self._deadline = engine.now + self.deadline_s
        self._task = engine.send(count, self._deadline)
        self._asked = 0 if self._task is None else engine.outstanding(self._task)
        if self._task is None and self.idle_wait_s > 0:
            self._idle_until = engine.now + self.idle_wait_s
            engine.wake_at(self._idle_until)
        elif self._task is None:
            self._close(engine, "no_clients")
        elif math.isfinite(self._deadline):
            engine.wake_at(self._deadline)

    def start(self, engine: Engine) -> None:
        self._attempt = 0
        self._open(engine)

    def _close(self, engine: Engine, closed_by: str, abandoned: bool = False) -> None:
        task, self._task = self._task, None
        if task is not None and engine.outstanding(task):
            engine.cancel(task, "round closed: " + closed_by)
        commit = not abandoned and (engine.accepted >= self.min_accepted()
                                    or engine.releases_empty)
        retry = self._attempt + 1 < self.max_attempts
        if engine.close(closed_by, commit=commit, retry=retry):
            self._attempt = 0
        elif retry:
            self._attempt += 1
        else:
            return  # the coordinator has already said the run cannot go on
        self._open(engine)

    def on_update(self, engine: Engine, task_id: int) -> None:
        if task_id != self._task:
            return
        if self.target is not None and engine.accepted >= self.target:
            self._close(engine, "target_reached")
        elif engine.outstanding(task_id) == 0:
            self._close(engine, "all_reported")

    def on_end(self, engine: Engine, task_id: int, abandoned: bool) -> None:
        if task_id != self._task:
            return
        if abandoned:
            self._close(engine, "abandoned", abandoned=True)
        elif engine.outstanding(task_id) == 0:
            self._close(engine, "all_reported")

    def room(self, engine: Engine, task_id: int) -> int:
        """Updates of ``task_id`` that can be folded before :meth:`on_update` closes the
        round: up to the target, or every outstanding client without one."""
        if task_id != self._task:
            return 1
        if self.target is not None:
            return self.target - engine.accepted
        return engine.outstanding(task_id)

    def on_tick(self, engine: Engine, now: float) -> None:
        if self._task is None and self._idle_until is not None and now >= self._idle_until:
            self._idle_until = None
            self._open(engine)
        elif self._task is not None and now >= self._deadline:
            self._close(engine, "deadline")
        elif self._task is not None and engine.outstanding(self._task) == 0:
            self._close(engine, "all_reported")

    def staleness_weight(self, staleness: int) -> float:
        if staleness != 0:
            raise UpdateRejected("stale", f"trained from a model {staleness} versions old; "
                                 f"a synchronous round takes only its own version")
        return 1.0


@dataclass
class BufferedPolicy:
    """FedBuff: ``concurrency`` clients in flight, a server step every ``buffer_size``
    updates, staleness-weighted.

    Args:
        concurrency: C, tasks in flight at all times (>= 1).
        buffer_size: K, updates per server step (>= 1).
        staleness_exponent: a in ``1 / (1 + s)^a`` (0 = no down-weighting; the paper's
            ``1 / sqrt(1 + s)`` is 0.5).
        staleness_reference: the staleness whose weight is 1 (:func:`staleness_weight`;
            0 = the paper's raw weights, 1 = FLSim's default normalisation).
        max_staleness: updates more versions old than this are refused (``"stale"``).
        deadline_s: a task not reported within this is given up (its client is free again).
        idle_wait_s: when no task is in flight and nobody can be asked (no device online in a
            simulated trace), ask again after this long; 0 = wait for an event that never
            comes (the carrier reports a stall).
    """

    concurrency: int = 10
    buffer_size: int = 10
    staleness_exponent: float = 0.5
    staleness_reference: float = 1.0
    max_staleness: int = 10
    deadline_s: float = math.inf
    idle_wait_s: float = 0.0
    name: str = "buffered"
    _live: set[int] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        _check(self.concurrency >= 1, "round.concurrency",
               f"round.concurrency must be >= 1, got {self.concurrency!r}")
        _check(self.buffer_size >= 1, "round.buffer_size",
               f"round.buffer_size must be >= 1, got {self.buffer_size!r}")
        _check(math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0,
               "round.staleness_exponent", f"round.staleness_exponent must be >= 0, got "
               f"{self.staleness_exponent!r}")
        _check(math.isfinite(self.staleness_reference) and self.staleness_reference >= 0,
               "round.staleness_reference", f"round.staleness_reference must be >= 0, got "
               f"{self.staleness_reference!r}")
        _check(self.max_staleness >= 0, "round.max_staleness",
               f"round.max_staleness must be >= 0, got {self.max_staleness!r}")
        _check(self.deadline_s > 0, "round.deadline_s",
               f"round.deadline_s must be > 0, got {self.deadline_s!r}")
        _check(math.isfinite(self.idle_wait_s) and self.idle_wait_s >= 0, "sim.idle_wait_s",
               f"idle_wait_s must be a finite number >= 0, got {self.idle_wait_s!r}")

    def _fill(self, engine: Engine) -> None:
        """Top the tasks in flight up to ``concurrency`` clients (one task per client, so
        each carries the version current when its client was asked)."""
        # every live task has its one client outstanding (tasks are dropped from the set as
        # their client is done: _settle, on_tick), so the busy clients are counted in O(1)
        busy = len(self._live)
        while busy < self.concurrency and engine.can_step():
            deadline = engine.now + self.deadline_s
            task = engine.send(1, deadline)
            if task is None:
                if not self._live and self.idle_wait_s > 0:
                    engine.wake_at(engine.now + self.idle_wait_s)
                return
            self._live.add(task)
            busy += engine.outstanding(task)
            if math.isfinite(deadline):
                engine.wake_at(deadline)

    def start(self, engine: Engine) -> None:
        self._live.clear()
        self._fill(engine)

    def _settle(self, engine: Engine, task_id: int) -> None:
        if task_id in self._live and engine.outstanding(task_id) == 0:
            self._live.discard(task_id)
        if engine.accepted >= self.buffer_size:
            engine.close("buffer_full", commit=True, retry=True)
        self._fill(engine)

    def on_update(self, engine: Engine, task_id: int) -> None:
        self._settle(engine, task_id)

    def on_end(self, engine: Engine, task_id: int, abandoned: bool) -> None:
        self._settle(engine, task_id)

    def on_tick(self, engine: Engine, now: float) -> None:
        # the coordinator has already timed out tasks past their deadline
        self._live = {t for t in self._live if engine.outstanding(t)}
        self._fill(engine)

    def staleness_weight(self, staleness: int) -> float:
        if staleness > self.max_staleness:
            raise UpdateRejected("stale", f"trained from a model {staleness} versions old; "
                                 f"round.max_staleness = {self.max_staleness}")
        return staleness_weight(staleness, self.staleness_exponent, self.staleness_reference)
