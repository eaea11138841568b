"""The round engine: one event-driven, sans-I/O coordinator for every mode and carrier.

::

    events ──▶ Coordinator(strategy, policy, pipeline, sampler) ──▶ commands
      UpdatesArrived · ClientsFailed ·            SendTask · CancelTask · WakeAt ·
      TaskEnded · Tick                            CommitVersion · AbortRound · Finished

The coordinator holds no socket, thread or clock: every event carries its ``now``, and
every decision comes back as a command for the carrier (the simulator, the gRPC server, an
in-memory transport) to carry out. The :mod:`policy <shoal.policy>` decides when to open,
close and commit (synchronous rounds or FedBuff); the :mod:`pipeline <shoal.pipeline>`
validates and aggregates; the strategy (server optimizer) steps the model; observers hear
about it. Every task names the version it was built from and every update carries its base
version, so staleness is ``current version - base version``.
How it takes the updates that arrive (checks, folding, refusals) is
:class:`~shoal.arrivals.ArrivalDesk`, a mixin it inherits.

Evaluation tasks (federated evaluation) are a second task kind beside training: a caller
asks :meth:`Coordinator.evaluate` for one, the coordinator sends it (:class:`SendEval`),
folds the :class:`EvalReported` events of its cohort (:mod:`shoal.evaluation`) and closes it
with an :class:`EvalDone` once every client reported, failed or its deadline passed. They
never touch the open aggregation, the policy or the model, and work before :meth:`start` and
after the run finished (a canary evaluates without training).

Randomness: the cohort of sync round ``r`` (retry ``a``) comes from the stream
``(seed, "sample", r[, a])`` and a buffered task's client from ``(seed, "sample", task)``
(both keys shifted by ``round_offset``),
so a resumed run picks the same clients; a deployment with differential privacy passes an
unpredictable ``sample_rng`` instead.

Not thread-safe: a carrier serialises calls (one lock or one event loop).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from shoal import seeds
from shoal.arrivals import ArrivalDesk, _clients_of, _rows_of, _Task
from shoal.errors import ConfigError, ProtocolError
from shoal.evaluation import EvalTally
from shoal.events import (AbortRound, CancelTask, ClientsFailed, Command, CommitVersion,
                          EvalDone, EvalReported, EvalTask, Event, Finished, SendEval, SendTask,
                          TaskEnded, Tick, TrainTask, UpdateRefused, UpdatesArrived, WakeAt)
from shoal.observers import Observer, Observers
from shoal.pipeline import Pipeline, PipelineRun
from shoal.policy import RoundPolicy, SyncPolicy
from shoal.sampling import IdleSampler, Sampler
from shoal.strategy import ServerState, Strategy
from shoal.tally import Tally

__all__ = ["Coordinator"]

_DROPPED_AT = "secagg_dropped_at_"  # + stage: clients secure aggregation lost there


class Coordinator(ArrivalDesk):
    """Runs a strategy over a population of clients, driven by events.

    Args:
        strategy: the server optimizer (pure; state in, state out).
        num_clients: the population size (client ids ``0 .. num_clients - 1``).
        sampler: who trains each sync round.
        seed: the run seed (cohorts derive from it).
        policy: when to open, close and commit (default: synchronous rounds, every sampled
            client awaited).
        pipeline: validation and aggregation (default: the plain weighted mean).
        steps: commit this many versions in all, then finish (``None`` = no limit).
        observers: hooks told about tasks, updates, rejections and versions.
        sample_rng: the generator of a cohort, ``sample_rng(key, attempt)``; by default the
            run's seeded stream.
        round_offset: a sync round that makes version ``v`` is keyed ``v + round_offset``
            and a buffered task ``t`` is keyed ``t + round_offset`` (its cohort's and its
            clients' random streams): an edge aggregator numbers its versions on its own
            (devices cache models by version) and keys its rounds apart from them.
    """

    def __init__(self, strategy: Strategy, num_clients: int, sampler: Sampler, *, seed: int,
                 policy: RoundPolicy | None = None, pipeline: Pipeline | None = None,
                 steps: int | None = None, observers: Iterable[Observer] = (),
                 sample_rng: Callable[[int, int], np.random.Generator] | None = None,
                 round_offset: int = 0) -> None:
        if num_clients < 1:
            raise ConfigError(f"the population must have at least one client, got "
                              f"{num_clients}", key="data.clients")
        self.strategy = strategy
        self.num_clients = int(num_clients)
        self.sampler = sampler
        self.seed = seed
        self.policy = policy if policy is not None else SyncPolicy()
        self.pipeline = pipeline if pipeline is not None else Pipeline()
        self.steps = steps
        self.observers = Observers(observers)
        self.sample_rng = sample_rng or self._seeded_sample_rng
        self.round_offset = int(round_offset)
        self._out: list[Command] = []
        self._tasks: dict[int, _Task] = {}
        self._evals: dict[int, tuple[EvalTask, EvalTally]] = {}
        self._eval_ids: set[int] = set()  # every evaluation task ever opened
        self._next_task = 1
        self._now = 0.0
        self._done = ""
        self._started = False

    # -- state ------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def accepted(self) -> int:
        return self._tally.accepted

    @property
    def now(self) -> float:
        return self._now

    @property
    def releases_empty(self) -> bool:
        return self.pipeline.releases_empty

    @property
    def finished(self) -> str:
        """Why the run finished (``"done"``, a budget, ...), or ``""`` while it runs."""
        return self._done

    def _seeded_sample_rng(self, key: int, attempt: int) -> np.random.Generator:
        path = (key,) if attempt == 0 else (key, attempt)
        return seeds.generator(self.seed, "sample", *path)

    def cohort(self, round: int, attempt: int = 0, count: int | None = None) -> np.ndarray:
        """The clients sampled for sync ``round`` (retry ``attempt``); with the default
        generators the same for the same seed, always."""
        return self.sampler.sample(self.num_clients, self.sample_rng(round, attempt), count)

    # -- driving ----------------------------------------------------------------------------

    def start(self, state: ServerState, now: float, stage_states: tuple | None = None
              ) -> list[Command]:
        """Begin from ``state`` (and the pipeline stages' saved states) at ``now``."""
        if self._started:
            raise ProtocolError("the coordinator was already started")
        self._started = True
        self.state = state
        self.stage_states = stage_states if stage_states is not None else self.pipeline.init()
        self._now = float(now)
        self._begin_aggregation()
        if not self.can_step():
            self._finish(self._done or "done")
        else:
            self.policy.start(self)
        return self._flush()

    def handle(self, event: Event) -> list[Command]:
        """Take one event; return the commands it leads to (possibly none)."""
        if isinstance(event, EvalReported) or (
                isinstance(event, (ClientsFailed, TaskEnded)) and event.task_id in self._eval_ids):
            self._now = max(self._now, float(event.now))
            self._eval_event(event)
            return self._flush()
        if isinstance(event, Tick) and self._evals:
            self._now = max(self._now, float(event.now))
            self._close_due_evals()
            if not self._started:
                return self._flush()
        if not self._started:
            raise ProtocolError("start the coordinator before sending it events")
        self._now = max(self._now, float(event.now))
        if self._done:
            if isinstance(event, UpdatesArrived):
                self._refuse(event.task_id, "late", _rows_of(event.arrival),
                             f"the run has finished ({self._done})",
                             _clients_of(event.arrival))
            return self._flush()
        if isinstance(event, UpdatesArrived):
            self._arrived(event)
        elif isinstance(event, ClientsFailed):
            self._failed(event.task_id, event.client_ids, event.reason)
        elif isinstance(event, TaskEnded):
            self._ended(event)
        elif isinstance(event, Tick):
            self._tick()
        else:
            raise ProtocolError(f"unknown event {type(event).__name__}")
        return self._flush()

    def _flush(self) -> list[Command]:
        out, self._out = self._out, []
        return out

    # -- evaluation tasks -------------------------------------------------------------------

    def evaluate(self, params: np.ndarray, version: int, now: float, *,
                 clients: np.ndarray | None = None, count: int | None = None,
                 deadline: float = math.inf, purpose: str = "",
                 rng: np.random.Generator | None = None) -> list[Command]:
        """Open an evaluation task of ``params`` (model ``version``); returns its commands
        (:class:`SendEval`, and :class:`WakeAt` for a finite deadline).

        Args:
            clients: who evaluates (sorted, unique); or else ``count`` clients drawn by the
                sampler (all of the sampler's cohort when ``count`` is ``None``) from ``rng``,
                by default the stream ``(seed, "evaluate", task id)``.
            deadline: when to stop waiting (the run's clock).
            purpose: a label returned with the result.

        Raises:
            ConfigError: an empty cohort, or a client id outside the population.
        """
        self._now = max(self._now, float(now))
        task_id = self._next_task
        if clients is None:
            rng = rng if rng is not None else seeds.generator(self.seed, "evaluate", task_id)
            clients = self.sampler.sample(self.num_clients, rng, count)
        ids = np.unique(np.asarray(clients, dtype=np.int64))
        if len(ids) == 0:
            raise ConfigError("an evaluation task needs at least one client", key="clients")
        if ids[0] < 0 or ids[-1] >= self.num_clients:
            raise ConfigError(f"evaluation clients must be in 0..{self.num_clients - 1}",
                              key="clients")
        self._next_task += 1
        task = EvalTask(task_id, int(version), params, float(deadline), purpose)
        self._evals[task_id] = (task, EvalTally(task_id, int(version), purpose, ids))
        self._eval_ids.add(task_id)
        self._out.append(SendEval(task, ids))
        if math.isfinite(deadline):
            self._out.append(WakeAt(float(deadline)))
        return self._flush()

    def _eval_event(self, event: EvalReported | ClientsFailed | TaskEnded) -> None:
        entry = self._evals.get(event.task_id)
        if isinstance(event, EvalReported):
            ids = tuple(int(c) for c in np.asarray(event.reports.client_ids).tolist())
            if entry is None:
                self._out.append(UpdateRefused(event.task_id, ids, "unknown_task",
                                               f"no evaluation task {event.task_id} is open"))
                return
            refused, reason = entry[1].fold(event.reports)
            if len(refused):
                self._out.append(UpdateRefused(event.task_id,
                                               tuple(int(c) for c in refused), reason,
                                               "evaluation report refused"))
        elif entry is None:  # the task already closed: nothing to do
            return
        elif isinstance(event, ClientsFailed):
            entry[1].drop(np.asarray(event.client_ids, np.int64))
        else:
            entry[1].drop(None)
        if entry is not None and entry[1].done:
            self._close_eval(event.task_id,
                             "ended" if isinstance(event, TaskEnded) else "complete")

    def _close_eval(self, task_id: int, closed_by: str) -> None:
        _, tally = self._evals.pop(task_id)
        self._out.append(EvalDone(task_id, tally.close(closed_by)))

    def _close_due_evals(self) -> None:
        for task_id, (task, tally) in list(self._evals.items()):
            if self._now >= task.deadline:
                if tally.pending:
                    self._out.append(CancelTask(task_id, "evaluation deadline"))
                self._close_eval(task_id, "deadline")

    # -- the Engine interface the policy uses -------------------------------------------------

    def can_step(self) -> bool:
        if self._done:
            return False
        if self.steps is not None and self.state.version >= self.steps:
            self._finish("done")
            return False
        why = self.pipeline.allows_step(self.stage_states)
        if why:
            self._finish(why)
            return False
        return True

    def send(self, count: int | None, deadline: float) -> int | None:
        task_id = self._next_task
        if isinstance(self.policy, SyncPolicy):
            key = self.state.version + 1 + self.round_offset
            count = count if count is None else min(count, self.num_clients)
            clients = self.cohort(key, self.policy.attempt, count)
        else:
            key = task_id + self.round_offset
            clients = self._idle_clients(count or 1, self.sample_rng(key, 0))
        if len(clients) == 0:
            return None
        self._next_task += 1
        task = TrainTask(task_id=task_id, version=self.state.version, params=self.state.params,
                         round=key, settings=self.strategy.client_config(self.state),
                         deadline=deadline,
                         clip_norm=self.pipeline.client_clip_norm(self.stage_states))
        ids = np.asarray(clients, dtype=np.int64)
        self._tasks[task_id] = _Task(task, ids, set(ids.tolist()))
        self._tally.sampled += len(ids)
        self._out.append(SendTask(task, ids))
        self.observers.task_sent(task_id, task.version, len(ids), self._now)
        return task_id

    def _idle_clients(self, count: int, rng: np.random.Generator) -> np.ndarray:
        busy = set().union(*(t.pending for t in self._tasks.values() if not t.cancelled))
        if isinstance(self.sampler, IdleSampler):  # e.g. only the clients online now
            picked_ids = self.sampler.idle(self.num_clients, count, rng, busy)
            return picked_ids if len(picked_ids) == count else np.zeros(0, np.int64)
        if self.num_clients - len(busy) < count:
            return np.zeros(0, np.int64)
        picked: list[int] = []
        while len(picked) < count:  # busy clients are few: rejection sampling is O(count)
            c = int(rng.integers(self.num_clients))
            if c not in busy and c not in picked:
                picked.append(c)
        return np.sort(np.array(picked, dtype=np.int64))

    def room(self, task_id: int) -> int:
        """How many more updates of ``task_id`` the open aggregation can fold before its
        policy may act on one (close the round): a carrier may hand over that many arrivals
        of the task as one event with the same outcome (the simulator does, see
        :mod:`shoal.runner`). At least 1."""
        t = self._tasks.get(task_id)
        room = getattr(self.policy, "room", None)
        if t is None or t.cancelled or self._done or room is None:
            return 1
        return max(1, int(room(self, task_id)))

    def outstanding(self, task_id: int) -> int:
        t = self._tasks.get(task_id)
        return 0 if t is None or t.cancelled else len(t.pending)

    def cancel(self, task_id: int, reason: str) -> None:
        t = self._tasks.get(task_id)
        if t is None or t.cancelled:
            return
        t.cancelled = True
        if t.pending:
            self.observers.clients_failed(task_id, len(t.pending), "cancelled", self._now)
        self._out.append(CancelTask(task_id, reason))

    def wake_at(self, at: float) -> None:
        self._out.append(WakeAt(at))

    def close(self, closed_by: str, *, commit: bool, retry: bool) -> bool:
        """Finish the open aggregation; see :class:`~shoal.policy.Engine`."""
        tally, run = self._tally, self._run
        reason = closed_by
        mean = None
        info: dict[str, float] = dict(tally.group_metrics)
        if commit:
            try:
                mean, states, step_info = run.finish()
            except ProtocolError as exc:
                # e.g. secure aggregation lost too many clients: nothing is revealed
                tally.rejected["aggregation_aborted"] += 1
                info["aborted"] = 1.0
                reason = f"aggregation aborted: {exc}"
            else:
                info.update(step_info.info)
                if mean is None:
                    reason = "no update to aggregate"
        elif closed_by != "abandoned":
            reason = (f"{closed_by}: {tally.accepted} updates, fewer than the round's "
                      f"minimum")
        committed = mean is not None
        if mean is not None:
            self.state = self.strategy.apply(self.state, mean)
            self.stage_states = states
        for task_id, t in list(self._tasks.items()):
            if t.cancelled or not t.pending:
                del self._tasks[task_id]
        record = tally.record(
            round=self.state.version if committed else self.state.version + 1,
            version=self.state.version, committed=committed, seconds=self._now - tally.started,
            info=info, closed_by=closed_by, attempt=getattr(self.policy, "attempt", 0))
        self._begin_aggregation()
        if committed:
            self._out.append(CommitVersion(self.state, record))
            self.observers.version_committed(record)
            if any(k in info for k in ("epsilon", "noise_std")):
                self.observers.privacy_spent(self.state.version, info)
            for key, count in info.items():  # secure aggregation: dropouts by stage
                if key.startswith(_DROPPED_AT) and count:
                    self.observers.secagg_dropouts(self.state.version,
                                                   key[len(_DROPPED_AT):], int(count))
            self.can_step()  # finishes the run once the last version is in
        else:
            self._out.append(AbortRound(record, reason, retry))
            self.observers.round_abandoned(record, reason)
            if not retry:
                self._finish(f"round {record.round} could not commit: {reason}")
        return committed

    # -- internals --------------------------------------------------------------------------

    def _begin_aggregation(self) -> None:
        self._run: PipelineRun = self.pipeline.begin(self.stage_states, self.state.version + 1,
                                                     self.state.params.size)
        self._tally = Tally(started=self._now)

    def _finish(self, reason: str) -> None:
        if self._done:
            return
        self._done = reason
        for task_id in list(self._tasks):
            self.cancel(task_id, "run finished")
        self._out.append(Finished(reason))

    def _failed(self, task_id: int, client_ids: tuple[int, ...], reason: str) -> None:
        t = self._tasks.get(task_id)
        if t is None or t.cancelled:
            return
        gone = [c for c in client_ids if c in t.pending]
        if not gone:
            return
        t.pending.difference_update(gone)
        self._tally.rejected[reason] += len(gone)
        self.observers.clients_failed(task_id, len(gone), reason, self._now)
        self.policy.on_end(self, task_id, False)

    def _ended(self, event: TaskEnded) -> None:
        t = self._tasks.get(event.task_id)
        if t is None or t.cancelled:
            return
        if event.abandoned:
            self._tally.rejected["round_abandoned"] += 1
        t.pending.clear()
        self.policy.on_end(self, event.task_id, event.abandoned)

    def _tick(self) -> None:
        # clients past their task's deadline are given up; the policy then decides (a sync
        # round closes "by deadline", a buffered policy asks other clients)
        for task_id, t in list(self._tasks.items()):
            if not t.cancelled and t.pending and self._now >= t.task.deadline:
                self._tally.rejected["timed_out"] += len(t.pending)
                self.observers.clients_failed(task_id, len(t.pending), "timed_out", self._now)
                t.pending.clear()
        self.policy.on_tick(self, self._now)
