"""Hyperscale simulation on one small machine: a million devices that come and go, in
simulated time.

Parts (``--parts``), each printing JSON lines, each run in its own spawned process so its
peak RSS is its own:

* ``throughput`` -- cohort training at 1,000 clients (a cohort of the 1M generated
  Fashion-MNIST population, trained by the in-process pool exactly as the simulator does),
  against this machine's two-thread float32 GEMM floor measured in the same process between
  repeats: ``train_over_floor`` = time / (real examples x training FLOPs / GEMM peak).
* ``million`` -- ``shoal run --population 1000000 --per-round 1000 --trace mobile`` with
  FedScale's rule (ask 1,300, keep the first 1,000, deadline 60 s: ``sim.round_rules =
  deploy``), 2NN, for Fashion-MNIST (examples drawn with replacement from a per-client
  Dirichlet(0.5) mix) and Synthetic(1, 1): wall seconds per round, simulated hours per wall
  hour, peak RSS, accuracy; the training inside the run against the GEMM floor; then the same
  run (fewer rounds) twice to check the timeline and the final model repeat exactly.
* ``ten_million`` -- ten million devices, selection and timing alone: the mobile trace for
  10M devices, the real coordinator and discrete-event loop, and a pool that does no training
  (a 16-parameter model whose updates are zeros; example counts and transfer sizes as for the
  2NN): per-round selection time (``OnlineSampler``, among the devices online at the
  simulated time), wall per round, peak RSS.
* ``sync_vs_buffered`` -- one realistic trace (mobile, 100,000 clients), the same number of
  client updates: sync rounds (ask 130, keep the first 100) against FedBuff (130 in flight, a
  step every 10 updates), seeds 0-2; simulated hours to a target accuracy and both curves
  (``--plot``).

    .venv/bin/python benchmarks/bench_hyperscale.py                       # everything
    .venv/bin/python benchmarks/bench_hyperscale.py --parts million --rounds 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sim import in_child, matmul_peak_gflops  # noqa: E402

PARTS = ("throughput", "million", "ten_million", "sync_vs_buffered")
GENERATED = {"data.population": "generated", "sim.time_model": "trace", "sim.trace": "mobile",
             "sim.round_rules": "deploy"}


def train_flops(widths: list[int]) -> int:
    """FLOPs of one training example through an MLP of these layer widths (e.g. the 2NN:
    784, 200, 200, 10): the forward pass (2 x MACs), the weight gradients (the same again)
    and the input gradients of every layer but the first. The 2NN on Fashion-MNIST:
    ``bench_sim.TRAIN_FLOPS``."""
    macs = [a * b for a, b in zip(widths, widths[1:])]
    return 4 * sum(macs) + 2 * sum(macs[1:])


def _widths(exp) -> list[int]:
    """The layer widths of the run's MLP, from its parameter spec (weights are (out, in))."""
    shapes = [t.shape for t in exp.spec.tensors if len(t.shape) == 2]
    return [shapes[0][1], *(s[0] for s in shapes)]


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _emit(**kw) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in kw.items()}),
          flush=True)


# ---------------------------------------------------------------------------- throughput


def run_throughput(clients: int, cohort: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from shoal.config import load_config
    from shoal.events import TrainTask
    from shoal.experiment import Experiment

    cfg = load_config(None, {"data.clients": clients, "data.population": "generated",
                             "sampling.per_round": cohort})
    exp = Experiment(cfg)
    torch.set_num_threads(exp.threads)
    pool = exp.pool
    rng = np.random.default_rng(0)
    rows = []
    for rep in range(repeats):
        ids = np.sort(rng.choice(clients, cohort, replace=False))
        task = TrainTask(task_id=rep + 1, version=0, params=exp.initial_params, round=rep + 1)
        peak = matmul_peak_gflops(2)
        examples = 0
        t = time.perf_counter()
        for batch in pool.train_group([task] * cohort, ids, np.zeros(cohort, np.int64)):
            examples += int(batch.num_examples.sum())
        seconds = time.perf_counter() - t
        floor = examples * train_flops(_widths(exp)) / (peak * 1e9)
        rows.append({"seconds": seconds, "examples": examples, "peak_gflops": peak,
                     "floor_s": floor, "train_over_floor": seconds / floor})
    return {"repeats": rows, "peak_rss_mb": _rss_mb(), "chunk": pool.chunk,
            "threads": exp.threads}


# ---------------------------------------------------------------------------- a million


def _params_digest(params) -> str:
    return hashlib.sha256(params.tobytes()).hexdigest()[:16]


def run_million(dataset: str, clients: int, per_round: int, rounds: int, seed: int) -> dict:
    import numpy as np

    from shoal.config import load_config
    from shoal.experiment import Experiment

    cfg = load_config(None, {**GENERATED, "data.dataset": dataset, "data.clients": clients,
                             "sampling.per_round": per_round, "rounds": rounds, "seed": seed})
    exp = Experiment(cfg)
    spent = {"train_s": 0.0, "examples": 0}
    real = exp.pool.train_group

    def timed(tasks, ids, down):
        t = time.perf_counter()
        for batch in real(tasks, ids, down):
            spent["train_s"] += time.perf_counter() - t
            spent["examples"] += int(batch.num_examples.sum())
            yield batch
            t = time.perf_counter()

    exp.pool.train_group = timed  # type: ignore[method-assign]
    peak = matmul_peak_gflops(2)
    result = exp.run()
    s = result.summary()
    per_round = [b.wall_seconds - a.wall_seconds
                 for a, b in zip(result.timeline, result.timeline[1:])]
    floor = spent["examples"] * train_flops(_widths(exp)) / (peak * 1e9)
    return {"dataset": dataset, "clients": clients, "per_round": cfg["sampling"]["per_round"],
            "rounds": s["rounds"], "startup_s": s["startup_seconds"],
            "train_s": s["train_seconds"], "wall_s_per_round": s["train_seconds"] / s["rounds"],
            "wall_s_per_round_median": statistics.median(per_round) if per_round else math.nan,
            "sim_hours": s["sim_hours"], "sim_hours_per_wall_hour": s["sim_hours_per_wall_hour"],
            "peak_rss_mb": s["peak_rss_mb"], "final_accuracy": s["final_accuracy"],
            "client_updates": s["client_updates"], "clients_trained": s["clients_trained"],
            "dropouts": s["dropouts"], "trained_examples": spent["examples"],
            "training_s_in_run": spent["train_s"], "peak_gflops": peak,
            "training_over_floor": spent["train_s"] / floor if floor else math.nan,
            "timeline": [[r.sim_seconds, r.wall_seconds] for r in result.timeline],
            "digest": _params_digest(result.state.params),
            "mean_params": float(np.mean(result.state.params))}


# ---------------------------------------------------------------------------- ten million


class TimingOnlyPool:
    """Clients that do no training: every update is zeros of a 16-parameter model, example
    counts follow the generated population's size law, and transfers are sized as for the
    2NN (so the device timeline is the one a training run would have)."""

    def __init__(self, clients: int, model_bytes: int, seed: int = 0) -> None:
        from shoal.data.population import client_sizes

        self.sizes = client_sizes(clients, 60, 0.5, seed)
        self.model_bytes = model_bytes
        self.chunk = 4096

    @property
    def num_clients(self) -> int:
        return int(self.sizes.size)

    def example_counts(self, ids):
        return self.sizes[ids].astype("int64")

    def download(self, task, ids):
        import numpy as np

        return np.full(len(ids), self.model_bytes, np.int64)

    def upload_bytes(self, ids):
        return self.download(None, ids)

    def train_group(self, tasks, ids, down):
        import numpy as np

        from shoal.events import UpdateBatch

        ids = np.asarray(ids, np.int64)
        yield UpdateBatch(ids, np.zeros((ids.size, 16), np.float32), self.example_counts(ids),
                          {"upload_bytes": self.upload_bytes(ids), "download_bytes": down},
                          tasks[0].version)

    def train(self, task, ids):
        return self.train_group([task] * len(ids), ids, self.download(task, ids))


def run_ten_million(clients: int, per_round: int, rounds: int) -> dict:
    import numpy as np

    from shoal.clock import SimClock
    from shoal.coordinator import Coordinator
    from shoal.policy import SyncPolicy
    from shoal.runner import drive
    from shoal.sampling import OnlineSampler
    from shoal.sim.devices import TracedDevices, mobile
    from shoal.strategy import FedAvg
    from shoal.uplink import raw_wire_size

    t0 = time.perf_counter()
    trace = mobile(clients, seed=0)
    build_s = time.perf_counter() - t0
    clock = SimClock(3600.0 * 20)  # 20:00 UTC: Europe going online, Asia in the morning
    sampler = OnlineSampler(trace.availability, per_round, clock.now)
    picks: list[float] = []
    real = sampler.sample

    def timed_sample(n, rng, count=None):
        t = time.perf_counter()
        out = real(n, rng, count)
        picks.append(time.perf_counter() - t)
        return out

    object.__setattr__(sampler, "sample", timed_sample)
    pool = TimingOnlyPool(clients, raw_wire_size(199_210))
    policy = SyncPolicy(target=per_round, over_selection=1.3, deadline_s=60.0,
                        min_fraction=0.8, idle_wait_s=60.0)
    coord = Coordinator(FedAvg(), clients, sampler, seed=0, policy=policy, steps=rounds)
    commits = []
    t1 = time.perf_counter()
    drive(coord, pool, FedAvg().init(np.zeros(16, np.float32)), clock,
          task_seconds=TracedDevices(trace),
          on_commit=lambda st, rec: commits.append((clock.now(), time.perf_counter(), rec)))
    wall = time.perf_counter() - t1
    sim = commits[-1][0] - 3600.0 * 20
    return {"clients": clients, "per_round": per_round, "rounds": len(commits),
            "trace_build_s": build_s, "trace_mb": trace.nbytes / 2**20,
            "selection_ms_median": 1000 * statistics.median(picks),
            "selection_ms_max": 1000 * max(picks), "wall_s_per_round": wall / len(commits),
            "sim_s_per_round": sim / len(commits), "sim_hours_per_wall_hour": sim / wall,
            "dropouts": sum(r.rejected.get("offline", 0) for _, _, r in commits),
            "accepted": sum(r.accepted for _, _, r in commits), "peak_rss_mb": _rss_mb()}


# ---------------------------------------------------------------------------- sync vs buffered


def run_policy(policy: str, seed: int, clients: int, updates: int, every: int) -> dict:
    from shoal.config import load_config
    from shoal.experiment import Experiment

    common = {**GENERATED, "data.clients": clients, "seed": seed}
    if policy == "sync":  # FedScale's rule: ask 130, keep the first 100
        over = {"sampling.per_round": 100, "rounds": updates // 100, "deploy.target": 100,
                "deploy.over_selection": 1.3, "deploy.deadline_s": 600.0}
    else:  # FedBuff: 130 in flight, a server step every 10 updates
        over = {"round.policy": "buffered", "round.concurrency": 130,
                "round.buffer_size": 10, "rounds": updates // 10, "eval.every": every,
                "deploy.deadline_s": 600.0}
    result = Experiment(load_config(None, {**common, **over})).run()
    s = result.summary()
    return {"policy": policy, "seed": seed, "final_accuracy": s["final_accuracy"],
            "client_updates": s["client_updates"], "sim_hours": s["sim_hours"],
            "wall_s": s["wall_seconds"], "dropouts": s["dropouts"],
            "curve": [[r.sim_seconds / 3600.0, r.accuracy] for r in result.timeline
                      if math.isfinite(r.accuracy)]}


def _first_at(curve: list, target: float) -> float:
    return next((h for h, a in curve if a >= target), math.inf)


def sync_vs_buffered(args) -> None:
    runs = []
    for seed in args.seeds:
        for policy in ("sync", "buffered"):
            r = in_child("bench_hyperscale:run_policy", policy, seed, args.svb_clients,
                         args.updates, args.buffered_eval_every)
            r["hours_to_target"] = _first_at(r["curve"], args.target)
            _emit(bench="sync_vs_buffered", target=args.target,
                  **{k: v for k, v in r.items() if k != "curve"})
            runs.append(r)
    summary = {}
    for policy in ("sync", "buffered"):
        hs = [r["hours_to_target"] for r in runs if r["policy"] == policy]
        summary[policy] = statistics.mean(hs) if all(map(math.isfinite, hs)) else math.inf
    _emit(bench="sync_vs_buffered_summary", target=args.target, updates=args.updates,
          clients=args.svb_clients, sync_hours_to_target=summary["sync"],
          buffered_hours_to_target=summary["buffered"],
          speedup=summary["sync"] / summary["buffered"] if summary["buffered"] else math.nan)
    if args.plot:
        _plot(runs, args.target, args.plot)


def _plot(runs: list, target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"sync": "tab:blue", "buffered": "tab:orange"}
    for r in runs:
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, color=colours[r["policy"]], alpha=0.8, lw=1,
                label=f"{r['policy']}" if r["seed"] == runs[0]["seed"] else None)
    ax.axhline(target, ls="--", color="gray", lw=1, label=f"target {target:g}")
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("test accuracy")
    ax.set_title("sync (130 asked, first 100 kept) vs FedBuff (130 in flight, K = 10);\n"
                 "mobile trace, 100,000 clients, seeds " + ", ".join(
                     str(s) for s in sorted({r["seed"] for r in runs})))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--clients", type=int, default=1_000_000)
    ap.add_argument("--per-round", type=int, default=1000, dest="per_round")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--datasets", nargs="+", default=["fashion-mnist", "synthetic"])
    ap.add_argument("--big", type=int, default=10_000_000, help="ten_million: devices")
    ap.add_argument("--big-rounds", type=int, default=100, dest="big_rounds")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--svb-clients", type=int, default=100_000, dest="svb_clients")
    ap.add_argument("--updates", type=int, default=6000)
    ap.add_argument("--buffered-eval-every", type=int, default=10,
                    dest="buffered_eval_every")
    ap.add_argument("--target", type=float, default=0.65)
    ap.add_argument("--plot", default="", help="sync_vs_buffered: write the curves here")
    args = ap.parse_args(argv)

    if "throughput" in args.parts:
        r = in_child("bench_hyperscale:run_throughput", args.clients, args.per_round,
                     args.repeats)
        for i, row in enumerate(r["repeats"]):
            _emit(bench="throughput", repeat=i, **row)
        _emit(bench="throughput_summary", clients_per_cohort=args.per_round,
              chunk=r["chunk"], threads=r["threads"],
              train_over_floor_median=statistics.median(
                  x["train_over_floor"] for x in r["repeats"]),
              train_over_floor_best=min(x["train_over_floor"] for x in r["repeats"]),
              peak_rss_mb=r["peak_rss_mb"])
    if "million" in args.parts:
        for dataset in args.datasets:
            r = in_child("bench_hyperscale:run_million", dataset, args.clients,
                         args.per_round, args.rounds, 0)
            _emit(bench="million", **{k: v for k, v in r.items() if k != "timeline"})
        # same seed, same timeline and model: a shorter run, twice
        a, b = (in_child("bench_hyperscale:run_million", args.datasets[0], args.clients,
                         args.per_round, 3, 7) for _ in range(2))
        _emit(bench="million_repeat", dataset=args.datasets[0], rounds=3,
              same_sim_timeline=[t[0] for t in a["timeline"]] == [t[0] for t in b["timeline"]],
              same_model=a["digest"] == b["digest"], digest=a["digest"])
    if "ten_million" in args.parts:
        r = in_child("bench_hyperscale:run_ten_million", args.big, args.per_round,
                     args.big_rounds)
        _emit(bench="ten_million", **r)
    if "sync_vs_buffered" in args.parts:
        sync_vs_buffered(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
