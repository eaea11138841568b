"""A federated training run, assembled from a :class:`~shoal.config.Config`.

:class:`Experiment` wires the pieces together -- data and partition, model, the client pool
(virtual clients in this process by default, or any other :class:`~shoal.runner.ClientPool`
such as the gRPC aggregator's devices), the strategy, the round policy and the aggregation
pipeline -- and :meth:`Experiment.run` drives a fresh :class:`~shoal.coordinator.Coordinator`
over the pool with :func:`~shoal.runner.drive`, telling the run's observers (the progress
bar, the run directory, logs, metrics: :mod:`shoal.telemetry`) what happens and reporting
each :class:`~shoal.records.RoundRecord` once it is final. Which observers a run has is the
caller's business; this module knows only the :class:`~shoal.observers.Observer` hooks.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

import numpy as np
from threadpoolctl import ThreadpoolController

from shoal.build import (expected_cohort, load_data, local_dp_from_config,
                         pipeline_from_config, policy_from_config, sampler_from_config,
                         secure_sum_from_config, strategy_from_config, time_model_from_config,
                         unpredictable)
from shoal.clock import SimClock, WallClock
from shoal.config import Config
from shoal.coordinator import Coordinator
from shoal.data import FederatedData, GeneratedClients
from shoal.errors import ConfigError, ShoalError
from shoal.observers import Observer, Observers
from shoal.params import ParamSpec
from shoal.pipeline import stage_states_from_dict, stage_states_to_dict
from shoal.records import RoundRecord
from shoal.runner import ClientPool, PushCarrier, TaskSeconds, drive
from shoal.sampling import OnlineSampler, ParticipationCounts, Sampler, recording
from shoal.store import Checkpoint
from shoal.run_result import RunResult, peak_rss_mb
from shoal.strategy import ServerState

if TYPE_CHECKING:  # for annotations only (PyTorch is imported where a model is built)
    import torch

    from shoal.frameworks.torch import FlatModule
    from shoal.sim.traces import DeviceTrace

__all__ = ["CentralModel", "Experiment", "RunResult", "peak_rss_mb", "auto_threads",
           "expected_cohort"]


class CentralModel(Protocol):
    """A model that lives outside the run's process (a deployment's
    :class:`~shoal.model_host.ModelHost`): its layout, initial parameters and central
    evaluation."""

    spec: ParamSpec
    initial_params: np.ndarray

    def evaluate(self, params: np.ndarray) -> dict[str, float]:
        """Metrics (``accuracy``, ``loss``) of ``params`` on the central test set."""
        ...


def auto_threads(cfg: Config) -> int:
    """PyTorch threads for ``sim.threads = 0``.

    Small cohorts train as small batched matmuls that do not speed up on a second thread;
    there one thread trains while the other core evaluates the previous round's model
    (config S: 2.7 s against 3.9 s with two threads). Large cohorts (config L) gain from
    every core (2.1 s against 2.6 s).
    """
    cores = os.cpu_count() or 1
    return 1 if expected_cohort(cfg) < 32 else cores


def _torch_threads(threads: int | None) -> None:
    """An evaluation thread's PyTorch threads (``None``: it does not run PyTorch)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


class _InLine:
    """The part of an executor :meth:`Experiment.run` uses, running each call at once."""

    def submit(self, fn: Callable[..., object], *args: object) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # delivered by fut.result(), as a thread pool would
            fut.set_exception(exc)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _numpy_blas_single_threaded() -> contextlib.AbstractContextManager:
    """Keep numpy's own BLAS (OpenBLAS, BLIS) on one thread for the duration of a run.

    The run's cores belong to PyTorch: training and evaluation threads. numpy's BLAS only
    serves memory-bound folds (``w @ deltas``), and OpenBLAS's worker threads busy-wait after
    every call: on two cores that spinning took a core from the evaluation thread and from
    training (config S: 3.7 s against 2.8 s).

    Only the copy numpy's wheel bundles (in ``numpy.libs`` or inside the package) is limited.
    A BLAS numpy shares with PyTorch (a conda or distribution build) is left alone, as is MKL:
    limiting it would pin PyTorch's matmuls to one thread too. The limit is process-wide, so
    runs in concurrent threads of one process should not rely on it.
    """
    home = os.path.dirname(os.path.abspath(np.__file__))
    private = (home + os.sep, home + ".libs" + os.sep)
    blas = ThreadpoolController().select(internal_api=["openblas", "blis"])
    own = [lib.filepath for lib in blas.lib_controllers
           if os.path.abspath(lib.filepath).startswith(private)]
    if not own:
        return contextlib.nullcontext()
    return blas.select(filepath=own).limit(limits=1)


class Experiment:
    """Everything a run needs, built once (this is the run's start-up cost).

    Args:
        cfg: a validated configuration.
        data: already-loaded data (benchmarks and tests share one copy across runs).
        pool, sampler: another carrier for the clients (the gRPC aggregator's device pool)
            and how it samples them; by default virtual clients in this process, sampled
            per ``cfg``.
        model: with ``pool``, where the model lives (its layout, initial parameters and
            central evaluation; a :class:`~shoal.model_host.ModelHost` in its own process):
            then this process neither loads the data nor imports PyTorch.
    """

    #: the clients' data (not set when the model is hosted elsewhere: ``hosted``)
    data: FederatedData | GeneratedClients
    #: the model central evaluation loads (not set when it is hosted elsewhere: ``hosted``)
    eval_model: FlatModule

    def __init__(self, cfg: Config, data: FederatedData | GeneratedClients | None = None, *,
                 pool: ClientPool | PushCarrier | None = None,
                 sampler: Sampler | None = None, model: CentralModel | None = None) -> None:
        t0 = time.perf_counter()
        self.cfg = cfg
        #: PyTorch intra-op threads of this run. The setting is per OS thread (OpenMP): a
        #: new thread starts with one per core, so every thread the run starts sets it too.
        self.threads = cfg["sim"]["threads"] or auto_threads(cfg)
        self.deployed = pool is not None
        #: whether the model lives in another process (``model``): no data nor PyTorch here
        self.hosted = model is not None
        if model is not None:
            if pool is None:
                raise ConfigError("a model hosted elsewhere needs a carrier for the clients "
                                  "(pool)", key="pool")
            self._init_hosted(cfg, model, pool, sampler, t0)
            return
        import torch

        from shoal.frameworks.torch import FlatModule
        from shoal.models import build_model
        from shoal.training import evaluate

        torch.set_num_threads(self.threads)
        self.data = data if data is not None else load_data(cfg)
        train, test = self.data.train, self.data.test
        in_features = int(np.prod(train.x.shape[1:]))
        name = cfg["model"]["name"]
        build = lambda: build_model(name, in_features, train.num_classes, cfg.seed)  # noqa: E731
        self.eval_model = FlatModule(build())
        eval_model = self.eval_model
        self.spec = eval_model.spec
        if pool is not None:
            self.engine = "devices"
        elif isinstance(self.data, GeneratedClients):
            pool, self.engine = self._generated_pool(build())
        else:
            from shoal.sim.attacks import attacked_pool  # the plain pool without [attack]

            pool, self.engine = attacked_pool(cfg, build(), self.data, self.spec.size,
                                              local_dp_from_config(cfg))
        if cfg["hierarchy"]["edges"] and isinstance(pool, ClientPool) and not self.deployed:
            # simulated edges between the devices and this run's coordinator
            from shoal.hierarchy.tiers import hierarchy_from_config

            pool = hierarchy_from_config(cfg, pool, secure_sum_from_config(cfg))
        self._init_rounds(cfg, pool, sampler or sampler_from_config(cfg, self.data))
        self.time_model = None if self.deployed else self._time_model(sampler is None)
        x_test, y_test = torch.from_numpy(test.x), torch.from_numpy(test.y)
        #: central evaluation of a flat model -> metrics (replaceable, e.g. by a spy)
        self.evaluate: Callable[[np.ndarray], dict] = \
            lambda params: evaluate(eval_model, params, x_test, y_test)
        self.initial_params = eval_model.get()
        self.startup_seconds = time.perf_counter() - t0

    def _init_hosted(self, cfg: Config, model: CentralModel, pool: ClientPool | PushCarrier,
                     sampler: Sampler | None, t0: float) -> None:
        """:meth:`__init__` for a deployment whose model lives elsewhere (no data here)."""
        if sampler is None:
            raise ConfigError("a model hosted elsewhere needs the carrier's sampler",
                              key="sampler")
        self.spec = model.spec
        self.engine = "devices"
        self._init_rounds(cfg, pool, sampler)
        self.time_model = None
        self.evaluate = model.evaluate
        self.initial_params = model.initial_params
        self.startup_seconds = time.perf_counter() - t0

    def _init_rounds(self, cfg: Config, pool: ClientPool | PushCarrier, sampler: Sampler
                     ) -> None:
        """The round machinery every kind of run shares: carrier, strategy, sampler,
        pipeline, clocks."""
        self.pool = pool
        self.strategy = strategy_from_config(cfg)
        self.policy_name = cfg["round"]["policy"]
        self.sampler = sampler
        self.pipeline = pipeline_from_config(
            cfg, deployed=self.deployed,
            secure_in_transport=getattr(pool, "aggregates_securely", False))
        self.privacy = next((s for s in self.pipeline.stages if hasattr(s, "check_plan")),
                            None)
        #: the simulated clock of the current run (a fresh one each :meth:`run`)
        self.clock = SimClock()
        #: the device trace of ``sim.time_model = "trace"`` (None otherwise)
        self.trace: DeviceTrace | None = None
        self._stage_states: tuple | None = None

    def _generated_pool(self, model: torch.nn.Module) -> tuple[ClientPool, str]:
        """The in-process pool of a generated population (no per-client data to poison).

        Raises:
            ConfigError: an attack, whose poisoning needs a partitioned dataset.
        """
        from shoal.sim.pool import in_process_pool

        if self.cfg["attack"]["kind"] != "none":
            raise ConfigError("attacks poison a partitioned dataset; use data.population = "
                              "'partition' with [attack]", key="data.population")
        return in_process_pool(self.cfg, model, self.data, self.spec.size,
                               local_dp_from_config(self.cfg))

    def _time_model(self, own_sampler: bool) -> TaskSeconds | None:
        """The simulated device time of ``cfg``; with a trace that has online windows, the
        sampler becomes uniform among the clients online at the simulated time.

        Raises:
            ConfigError: a trace with windows and a selection or sampling method that cannot
                follow them.
        """
        cfg = self.cfg
        if cfg["sim"]["time_model"] != "trace":
            return time_model_from_config(cfg)
        from shoal.sim.devices import TracedDevices, trace_from_config

        trace = self.trace = trace_from_config(cfg)
        if trace.availability.rows and own_sampler:
            s = cfg["sampling"]
            if s["method"] != "uniform" or s["selection"] != "uniform":
                raise ConfigError("a trace with online windows samples uniformly among the "
                                  "clients online at the simulated time: use "
                                  "sampling.method = 'uniform' and sampling.selection = "
                                  "'uniform' (or a trace without windows)",
                                  key="sampling.selection")
            self.sampler = OnlineSampler(trace.availability, s["per_round"],
                                         lambda: self.clock.now())
        return TracedDevices(trace, cfg["client"]["epochs"])

    def close(self) -> None:
        """Release what the client pool holds (Ray actors, with ``sim.backend = "ray"``);
        results already returned stay valid."""
        close = getattr(self.pool, "close", None)
        if close is not None:
            close()

    @property
    def coordinator(self) -> Coordinator:
        """A fresh coordinator for this run's settings, without observers."""
        return self.make_coordinator()

    def make_coordinator(self, observers: Iterable[Observer] = ()) -> Coordinator:
        """A fresh coordinator for this run's settings that tells ``observers`` what happens
        (each :meth:`run` starts its own)."""
        unpredictable_cohorts = self.deployed and self.privacy is not None
        policy = policy_from_config(self.cfg, deployed=self.deployed)
        return Coordinator(self.strategy, self.pool.num_clients, self.sampler,
                           seed=self.cfg.seed, policy=policy, pipeline=self.pipeline, steps=self.cfg.rounds,
                           observers=observers,
                           sample_rng=unpredictable if unpredictable_cohorts else None)

    def checkpoint(self, state: ServerState, stage_states: tuple | None = None) -> Checkpoint:
        """Everything needed to resume this run after ``state``: the model, the strategy
        state, the version, the seed, the resolved config and the pipeline stages' states
        (the privacy ledger and clip norm)."""
        meta: dict = {"config": self.cfg.to_dict(), "model": self.cfg["model"]["name"],
                      "strategy": self.cfg["strategy"]["name"]}
        states = stage_states if stage_states is not None else self._stage_states
        if states:
            meta["stages"] = stage_states_to_dict(self.pipeline, states)
        return Checkpoint(state=state, spec=self.spec, seed=self.cfg.seed, meta=meta)

    def restore(self, ckpt: Checkpoint) -> ServerState:
        """The state to pass to :meth:`run` to continue from ``ckpt``.

        Resuming is exact: cohorts and local batch orders are keyed by (seed, round, client),
        so rounds r+1.. see the same clients and batches as an uninterrupted run.

        Raises:
            ConfigError: the checkpoint belongs to another model or seed, or the run keeps
                client-side state a checkpoint does not hold (error-feedback residuals), or
                it runs DP and the checkpoint has no privacy ledger.
            BudgetExhausted: with ``privacy.on_budget = "refuse"``, the remaining rounds at
                this config's settings would take the restored ledger past the budget.
        """
        if ckpt.spec != self.spec:
            raise ConfigError("the checkpoint's model does not match this config's model "
                              f"({ckpt.spec.size} vs {self.spec.size} parameters)",
                              key="model.name")
        if ckpt.seed != self.cfg.seed:
            raise ConfigError(f"the checkpoint was made with seed {ckpt.seed}, the config "
                              f"says {self.cfg.seed}: a resumed run must keep its seed",
                              key="seed")
        if self.cfg["compression"]["error_feedback"]:
            raise ConfigError("cannot resume a run with compression.error_feedback: the "
                              "clients' residuals are not in the checkpoint",
                              key="compression.error_feedback")
        saved = ckpt.meta.get("stages", {})
        if self.privacy is not None and self.privacy.name not in saved:
            raise ConfigError("the checkpoint has no privacy ledger, so the epsilon "
                              "already spent is unknown; refusing to resume with DP",
                              key="privacy.placement")
        self._stage_states = stage_states_from_dict(self.pipeline, saved)
        self.check_budget(ckpt.state.version)
        return ckpt.state

    def check_budget(self, version: int = 0) -> None:
        """With ``privacy.on_budget = "refuse"``, refuse a plan the ε budget cannot afford:
        the rounds from ``version`` to ``cfg.rounds``, priced on top of the ledger this run
        starts from (a resumed run's spent budget, at this config's possibly changed
        settings). :meth:`run` calls it before the first round; :meth:`restore` at once.

        Raises:
            BudgetExhausted: the message says what was spent and what is still affordable.
        """
        if self.privacy is None or self.cfg["privacy"]["on_budget"] != "refuse":
            return
        states = self._stage_states if self._stage_states is not None else self.pipeline.init()
        spent = states[list(self.pipeline.stages).index(self.privacy)]
        self.privacy.check_plan(spent, self.cfg.rounds - version)

    def run(self, on_round: Callable[[RoundRecord], None] | None = None,
            state: ServerState | None = None,
            on_commit: Callable[[ServerState, RoundRecord], None] | None = None, *,
            observers: Iterable[Observer] = ()) -> RunResult:
        """Run until ``cfg.rounds`` versions are committed (from ``state`` if given, else from
        the initial model), telling ``observers`` what happens.

        Central evaluation of version v runs on a background thread while the next version
        trains (each committed model is immutable, so this is safe) when training leaves a
        core for it (remote devices, or fewer training threads than cores); when in-process
        training uses every core, evaluation runs between rounds with every core instead
        (config L: 1.27 s against 1.53 s overlapped; config S: 3.2 s overlapped against
        4.4 s in line). Records reach ``on_round``, then every observer's
        ``version_evaluated``, in version order as their evaluations finish (``on_round``
        is a shorthand for an observer with only that hook). ``on_commit(state, record)``
        runs right after each committed version, before the next task is sent.

        Raises:
            ShoalError: a round could not commit after its policy's attempts (every sampled
                client had no data, or secure aggregation aborted every time).
        """
        with _numpy_blas_single_threaded():
            return self._run(on_round, state, on_commit, Observers(observers))

    def _run(self, on_round: Callable[[RoundRecord], None] | None, state: ServerState | None,
             on_commit: Callable[[ServerState, RoundRecord], None] | None,
             observers: Observers) -> RunResult:
        self.check_budget(state.version if state is not None else 0)
        t0 = time.perf_counter()
        every = self.cfg["eval"]["every"]
        records: list[RoundRecord] = []
        cores = os.cpu_count() or 1
        remote = self.engine == "devices"
        # with remote clients the cores are idle while a round runs: evaluate with all of
        # them (a hosted model evaluates in its own process, with its own threads)
        threads = None if self.hosted else cores if remote else self.threads
        evaluator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-eval",
                                       initializer=_torch_threads, initargs=(threads,)) \
            if remote or self.threads < cores else _InLine()
        pending: deque[tuple[RoundRecord, Future | None]] = deque()

        def emit(block_all: bool) -> None:
            # hand finished records on in order; keep at most one evaluation in flight
            while pending and (block_all or len(pending) > 1 or pending[0][1] is None
                               or pending[0][1].done()):
                rec, fut = pending.popleft()
                if fut is not None:
                    rec = replace(rec, eval=dict(fut.result()))
                records.append(rec)
                if on_round:
                    on_round(rec)
                observers.version_evaluated(rec)

        def submit(rec: RoundRecord, params: np.ndarray | None) -> None:
            fut = evaluator.submit(self.evaluate, params) if params is not None else None
            pending.append((rec, fut))
            emit(block_all=False)

        timeline = None
        participation: ParticipationCounts | None = None
        if self.time_model is not None:
            from shoal.sim.timeline import Timeline

            timeline = Timeline(lambda: self.clock.now())
            observers = Observers([*observers.observers, timeline])
        coordinator = self.make_coordinator(observers.observers)
        final: dict[str, ServerState] = {}  # the last committed state

        def committed(st: ServerState, rec: RoundRecord) -> None:
            final["state"] = st
            self._stage_states = coordinator.stage_states
            if on_commit is not None:
                on_commit(st, rec)  # e.g. a crash-safe commit to the model store
            do_eval = st.version % every == 0 or st.version == self.cfg.rounds
            submit(rec, st.params if do_eval else None)

        def abandoned(rec: RoundRecord, reason: str, retry: bool) -> None:
            if retry:
                return
            why = (f"secure aggregation aborted ({reason})"
                   if rec.rejected.get("aggregation_aborted")
                   else "no sampled client had data" if rec.accepted == 0 else reason)
            raise ShoalError(f"round {rec.round} did not commit after "
                             f"{rec.attempt + 1} cohorts: {why}")

        try:
            if state is None:
                state = self.strategy.init(self.initial_params)
                submit(RoundRecord(round=0), state.params)
            final["state"] = state
            self.clock = SimClock()
            clock = self.clock if self.time_model is not None else WallClock()
            # in simulation, the registry a sampler reads learns who took part (a deployment's
            # gateway records that itself); with device time, so does a participation count
            if self.time_model is not None:
                participation = ParticipationCounts.of_size(self.pool.num_clients)
            driven = coordinator if self.deployed else recording(
                coordinator, self.sampler, [participation] if participation is not None else [])
            reason = drive(driven, self.pool, state, clock,
                           stage_states=self._stage_states, task_seconds=self.time_model,
                           on_commit=committed, on_abort=abandoned)
            stopped = "" if reason == "done" else reason
            state = final["state"]
            if stopped and pending and pending[-1][1] is None and pending[-1][0].round > 0:
                # the run ends early: evaluate the model it ends with
                rec, _ = pending.pop()
                submit(rec, state.params)
            emit(block_all=True)
        finally:
            evaluator.shutdown(wait=True, cancel_futures=True)
        wall = time.perf_counter() - t0
        extra: dict = {}
        if participation is not None:
            extra["sim_hours"] = self.clock.now() / 3600.0
            extra["sim_hours_per_wall_hour"] = self.clock.now() / wall if wall else math.nan
            extra["clients_trained"] = int((participation.counts > 0).sum())
            extra["dropouts"] = sum(r.rejected.get("offline", 0) for r in records)
        return RunResult(records=records, state=state, spec=self.spec,
                         startup_seconds=self.startup_seconds, wall_seconds=wall,
                         engine=self.engine, stopped=stopped, extra=extra,
                         stage_states=coordinator.stage_states,
                         timeline=timeline.rows if timeline is not None else [],
                         participation=participation.counts if participation is not None else None)
