"""A simulated federated training run, assembled from a :class:`~shoal.config.Config`.

:class:`Experiment` wires the pieces together -- data and partition, model, the in-process
client pool, the strategy and the coordinator -- and :meth:`Experiment.run` drives rounds,
reporting each :class:`~shoal.coordinator.RoundRecord` to a callback (the CLI's progress
bar). Writing files is the caller's business (:mod:`shoal.rundir`).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from shoal import seeds
from shoal.config import Config
from shoal.codec import Chain
from shoal.coordinator import (ClientPool, Coordinator, PoissonSampler, RoundRecord, Sampler,
                               UniformSampler)
from shoal.data import FederatedData, load_fashion_mnist
from shoal.data.partition import partition
from shoal.data.synthetic import make_synthetic
from shoal.errors import ConfigError, ShoalError
from shoal.frameworks.torch import FlatModule
from shoal.models import build_model
from shoal.params import ParamSpec
from shoal.sim.cohort import CohortTrainer
from shoal.sim.pool import InProcessPool
from shoal.store import Checkpoint
from shoal.strategy import ServerState, Strategy, make_strategy
from shoal.training import LocalTrainConfig, evaluate
from shoal.uplink import Downlink, Uplink

__all__ = ["Experiment", "RunResult", "load_data", "strategy_from_config", "privacy_from_config",
           "peak_rss_mb"]

#: A round in which no client had data is re-sampled at most this many times.
MAX_ATTEMPTS = 5


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def auto_threads(cfg: Config) -> int:
    """PyTorch threads for ``sim.threads = 0``.

    Small cohorts train as small batched matmuls that do not speed up on a second thread;
    there one thread trains while the other core evaluates the previous round's model
    (config S: 2.7 s against 3.9 s with two threads). Large cohorts (config L) gain from
    every core (2.1 s against 2.6 s).
    """
    cores = os.cpu_count() or 1
    return 1 if expected_cohort(cfg) < 32 else cores


def _unpredictable(*_: int) -> np.random.Generator:
    """A fresh generator from ``os.urandom``, whatever the round: deployed DP noise and
    cohorts, which nobody holding the config may recompute."""
    from shoal.privacy.dp import secure_generator

    return secure_generator()


class _InLine:
    """The part of an executor :meth:`Experiment.run` uses, running each call at once."""

    def submit(self, fn: Callable, *args) -> Future:
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


def load_data(cfg: Config) -> FederatedData:
    """The training set split into clients, and the central test set, per ``cfg["data"]``."""
    d = cfg["data"]
    if d["dataset"] == "synthetic":
        return make_synthetic(d["synthetic_alpha"], d["synthetic_beta"],
                              num_clients=d["clients"],
                              rng=seeds.generator(d["partition_seed"], "synthetic"),
                              iid=d["synthetic_iid"])
    train, test = load_fashion_mnist(d["path"] or None, flatten=True)
    parts = partition(train.y, d["clients"], d["partition"], alpha=d["alpha"],
                      shards_per_client=d["shards_per_client"], seed=d["partition_seed"])
    return FederatedData(train=train, test=test, client_indices=tuple(parts))


def strategy_from_config(cfg: Config) -> Strategy:
    s = cfg["strategy"]
    name = s["name"]
    if name == "fedavg":
        return make_strategy(name, server_lr=s["server_lr"])
    if name == "fedprox":
        return make_strategy(name, mu=s["mu"], server_lr=s["server_lr"])
    return make_strategy(name, server_lr=s["server_lr"], beta1=s["beta1"], beta2=s["beta2"],
                         tau=s["tau"])


def sampler_from_config(cfg: Config) -> Sampler:
    s = cfg["sampling"]
    return PoissonSampler(s["q"]) if s["method"] == "poisson" else UniformSampler(s["per_round"])


def expected_cohort(cfg: Config) -> float:
    s = cfg["sampling"]
    return s["q"] * cfg["data"]["clients"] if s["method"] == "poisson" else s["per_round"]


def privacy_from_config(cfg: Config, *, deployed: bool = False):
    """``(aggregation, local_dp)`` for ``cfg["privacy"]``; ``(None, None)`` without DP.

    Central noise comes from the run's seeded stream in simulation (reproducible runs), and
    from :func:`~shoal.privacy.dp.secure_generator` (``os.urandom``) when ``deployed``: noise
    that anyone holding the config could recompute would protect nothing.
    """
    p = cfg["privacy"]
    if p["placement"] == "none":
        return None, None
    from shoal.privacy import AdaptiveClipping, CentralDP, LocalDP, RoundEvent
    from shoal.privacy.rounds import BudgetPolicy, DPAggregation

    s = cfg["sampling"]
    z = p["noise_multiplier"]
    budget = BudgetPolicy(p["epsilon_budget"], p["delta"])
    if p["placement"] == "local":
        local = LocalDP(noise_multiplier=z, clip_norm=p["clip_norm"])
        return DPAggregation("local", RoundEvent.local(z), budget, p["accountant"]), local
    if s["method"] == "poisson":
        event = RoundEvent.poisson(s["q"], z)
    else:
        event = RoundEvent.fixed_size(s["per_round"], cfg["data"]["clients"], z)
    adaptive = None
    if p["adaptive_clipping"]:
        adaptive = AdaptiveClipping(target_quantile=p["target_quantile"],
                                    learning_rate=p["clip_learning_rate"],
                                    count_noise_std=p["count_noise_std"] or None)
    central = CentralDP(noise_multiplier=z, clip_norm=p["clip_norm"],
                        expected_clients=expected_cohort(cfg), adaptive=adaptive)
    seed = cfg.seed
    rng_for_round = _unpredictable if deployed else (
        lambda r: seeds.generator(seed, "dp", r))
    return DPAggregation("central", event, budget, p["accountant"],
                         rng_for_round=rng_for_round, central=central), None


def secagg_from_config(cfg: Config):
    """The secure-aggregation plug for ``cfg["secure_aggregation"]``, or None."""
    s = cfg["secure_aggregation"]
    if not s["enabled"]:
        return None
    from shoal.privacy.secagg_rounds import SecAggAggregation

    seed = cfg.seed
    return SecAggAggregation(clip=s["clip"], value_bits=s["value_bits"],
                             max_weight=s["max_weight"], neighbours=s["neighbours"],
                             threshold=s["threshold"], dropout=s["dropout"],
                             corrupt_rate=s["corrupt_rate"],
                             rng_for_round=lambda r: seeds.generator(seed, "secagg", r))


@dataclass
class RunResult:
    """The outcome of :meth:`Experiment.run`."""

    records: list[RoundRecord]
    state: ServerState
    spec: ParamSpec
    startup_seconds: float
    wall_seconds: float  # the rounds only; the summary adds start-up
    engine: str
    stopped: str = ""
    extra: dict = field(default_factory=dict)

    def evaluated(self) -> list[RoundRecord]:
        return [r for r in self.records if "accuracy" in r.eval]

    def summary(self) -> dict:
        """The run's headline numbers (what ``shoal run --json`` prints)."""
        evals = self.evaluated()
        last = evals[-1].eval if evals else {}
        tail = [r.eval["accuracy"] for r in evals if r.round > 0][-5:]
        updates = sum(r.accepted for r in self.records)
        train_seconds = sum(r.seconds for r in self.records if r.round > 0)
        trained = [r for r in self.records if r.round > 0]
        privacy = [r.privacy for r in trained if "epsilon" in r.privacy]
        extra = dict(self.extra)
        if privacy:
            extra["epsilon"] = privacy[-1]["epsilon"]
        if self.stopped:
            extra["stopped"] = self.stopped
        return {
            "final_accuracy": last.get("accuracy", math.nan),
            "final_loss": last.get("loss", math.nan),
            "mean_accuracy_last5": float(np.mean(tail)) if tail else math.nan,
            "initial_accuracy": evals[0].eval["accuracy"] if evals else math.nan,
            "rounds": self.state.round,
            "client_updates": updates,
            "updates_per_second": updates / train_seconds if train_seconds else math.nan,
            "wall_seconds": self.startup_seconds + self.wall_seconds,
            "startup_seconds": self.startup_seconds,
            "train_seconds": self.wall_seconds,
            "peak_rss_mb": peak_rss_mb(),
            "engine": self.engine,
            "num_params": self.spec.size,
            "bytes_up_per_round": float(np.mean([r.bytes_up for r in trained])) if trained
            else 0.0,
            "bytes_down_per_round": float(np.mean([r.bytes_down for r in trained])) if trained
            else 0.0,
            **extra,
        }


class Experiment:
    """Everything a simulated run needs, built once (this is the run's start-up cost).

    Args:
        cfg: a validated configuration.
        data: already-loaded data to use instead of loading per ``cfg`` (benchmarks and
            tests share one copy across runs).
    """

    def __init__(self, cfg: Config, data: FederatedData | None = None, *,
                 pool: ClientPool | None = None, sampler: Sampler | None = None) -> None:
        """Args:
            cfg: a validated configuration.
            data: already-loaded data (benchmarks and tests share one copy across runs).
            pool, sampler: another carrier for the clients (the gRPC aggregator's device
                pool); by default virtual clients in this process, sampled per ``cfg``.
        """
        t0 = time.perf_counter()
        self.cfg = cfg
        #: PyTorch intra-op threads of this run. The setting is per OS thread (OpenMP): a
        #: new thread starts with one per core, so every thread the run starts sets it too.
        self.threads = cfg["sim"]["threads"] or auto_threads(cfg)
        torch.set_num_threads(self.threads)
        self.data = data if data is not None else load_data(cfg)
        train, test = self.data.train, self.data.test
        in_features = int(np.prod(train.x.shape[1:]))
        name = cfg["model"]["name"]
        build = lambda: build_model(name, in_features, train.num_classes, cfg.seed)  # noqa: E731
        self.eval_model = FlatModule(build())
        self.spec = self.eval_model.spec
        deployed = pool is not None
        self.privacy, local_dp = privacy_from_config(cfg, deployed=deployed)
        if pool is None:
            trainer = CohortTrainer(build(), torch.from_numpy(train.x),
                                    torch.from_numpy(train.y), engine=cfg["sim"]["engine"])
            self.engine = trainer.engine
            local = LocalTrainConfig(epochs=cfg["client"]["epochs"],
                                     batch_size=cfg["client"]["batch_size"],
                                     lr=cfg["client"]["lr"])
            comp = cfg["compression"]
            uplink = Uplink(self.spec.size, Chain.parse(comp["upload"]),
                            comp["error_feedback"], local_dp)
            downlink = Downlink(self.spec.size, comp["download"],
                                Chain.parse(comp["download_codec"],
                                            "compression.download_codec"),
                                comp["max_staleness"])
            pool = InProcessPool(trainer, self.data.client_indices, local, seed=cfg.seed,
                                 uplink=uplink, downlink=downlink)
        else:
            self.engine = "devices"
        self.pool = pool
        self.strategy = strategy_from_config(cfg)
        x_test, y_test = torch.from_numpy(test.x), torch.from_numpy(test.y)
        self.coordinator = Coordinator(
            self.strategy, self.pool, sampler or sampler_from_config(cfg), seed=cfg.seed,
            evaluate=lambda params: evaluate(self.eval_model, params, x_test, y_test),
            aggregation=self.privacy or (None if getattr(pool, "aggregates_securely", False)
                                         else secagg_from_config(cfg)),
            sample_rng=_unpredictable if deployed and self.privacy is not None else None)
        if self.privacy is not None and cfg["privacy"]["on_budget"] == "refuse":
            self.privacy.check_plan(cfg.rounds)
        self.initial_params = self.eval_model.get()
        self.startup_seconds = time.perf_counter() - t0

    def checkpoint(self, state: ServerState) -> Checkpoint:
        """Everything needed to resume this run after ``state``: the model, the strategy
        state, the round, the seed, the resolved config and the privacy ledger."""
        meta: dict = {"config": self.cfg.to_dict(), "model": self.cfg["model"]["name"],
                      "strategy": self.cfg["strategy"]["name"]}
        if self.privacy is not None:
            meta["privacy"] = self.privacy.state_dict()
        return Checkpoint(state=state, spec=self.spec, seed=self.cfg.seed, meta=meta)

    def restore(self, ckpt: Checkpoint) -> ServerState:
        """The state to pass to :meth:`run` to continue from ``ckpt``.

        Resuming is exact: cohorts and local batch orders are keyed by (seed, round, client),
        so rounds r+1.. see the same clients and batches as an uninterrupted run.

        Raises:
            ConfigError: the checkpoint belongs to another model or seed, or the run keeps
                client-side state a checkpoint does not hold (error-feedback residuals).
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
        if self.privacy is not None:
            saved = ckpt.meta.get("privacy")
            if saved is None:
                raise ConfigError("the checkpoint has no privacy ledger, so the epsilon "
                                  "already spent is unknown; refusing to resume with DP",
                                  key="privacy.placement")
            self.privacy.load_state_dict(saved)
        return ckpt.state

    def run(self, on_round: Callable[[RoundRecord], None] | None = None,
            state: ServerState | None = None,
            on_commit: Callable[[ServerState, RoundRecord], None] | None = None) -> RunResult:
        """Run ``cfg.rounds`` rounds (from ``state`` if given, else from the initial model).

        Central evaluation of round r's model runs on a background thread while round r + 1
        trains (each committed model is immutable, so this is safe) when training leaves a
        core for it (remote devices, or fewer training threads than cores); when in-process
        training uses every core, evaluation runs between rounds with every core instead
        (config L: 1.27 s against 1.53 s overlapped; config S: 3.2 s overlapped against
        4.4 s in line). Records reach ``on_round`` in round order as their evaluations
        finish. ``on_commit(state, record)``
        runs right after each committed round, before the next one starts.

        Raises:
            ShoalError: a round could not commit after :data:`MAX_ATTEMPTS` fresh cohorts
                (every sampled client had no data).
        """
        with _numpy_blas_single_threaded():
            return self._run(on_round, state, on_commit)

    def _run(self, on_round: Callable[[RoundRecord], None] | None, state: ServerState | None,
             on_commit: Callable[[ServerState, RoundRecord], None] | None) -> RunResult:
        t0 = time.perf_counter()
        every = self.cfg["eval"]["every"]
        records: list[RoundRecord] = []
        cores = os.cpu_count() or 1
        remote = self.engine == "devices"
        # with remote clients the cores are idle while a round runs: evaluate with all of them
        evaluator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-eval",
                                       initializer=torch.set_num_threads,
                                       initargs=(cores if remote else self.threads,)) \
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

        def submit(rec: RoundRecord, params: np.ndarray | None) -> None:
            fut = evaluator.submit(self.coordinator.evaluate, params) \
                if params is not None and self.coordinator.evaluate is not None else None
            pending.append((rec, fut))
            emit(block_all=False)

        try:
            if state is None:
                state = self.strategy.init(self.initial_params)
                submit(RoundRecord(round=0), state.params)
            stopped = ""
            while state.round < self.cfg.rounds:
                rnd = state.round + 1
                if self.privacy is not None and not self.privacy.next_round_allowed():
                    stopped = (f"privacy budget: round {rnd} would exceed epsilon "
                               f"{self.cfg['privacy']['epsilon_budget']:g}")
                    break
                for attempt in range(MAX_ATTEMPTS):
                    state, rec = self.coordinator.run_round(state, evaluate=False,
                                                            attempt=attempt)
                    if rec.committed:
                        break
                else:
                    why = (f"secure aggregation aborted ({self.coordinator.last_abort})"
                           if rec.rejected.get("aggregation_aborted")
                           else "no sampled client had data")
                    raise ShoalError(f"round {rnd} did not commit after {MAX_ATTEMPTS} "
                                     f"cohorts: {why}")
                if on_commit is not None:
                    on_commit(state, rec)  # e.g. a crash-safe commit to the model store
                do_eval = rnd % every == 0 or rnd == self.cfg.rounds
                submit(rec, state.params if do_eval else None)
            if stopped and pending and pending[-1][1] is None and pending[-1][0].round > 0:
                # the run ends early: evaluate the model it ends with
                rec, _ = pending.pop()
                submit(rec, state.params)
            emit(block_all=True)
        finally:
            evaluator.shutdown(wait=True, cancel_futures=True)
        wall = time.perf_counter() - t0
        return RunResult(records=records, state=state, spec=self.spec,
                         startup_seconds=self.startup_seconds, wall_seconds=wall,
                         engine=self.engine, stopped=stopped)
