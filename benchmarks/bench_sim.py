"""Simulation speed: shoal against a bare sequential PyTorch loop, in one run.

For each workload (config S, and config L = 1000 clients, 100 per round, 10 rounds) this runs

* ``shoal``  -- ``shoal.sim.experiment.Experiment`` exactly as ``shoal run`` does;
* ``bare``   -- a plain PyTorch script: the same clients (same partition, same per-round
  sample), the same local training (same batch order, SGD lr 0.05, batch 32), weighted
  averaging of state dicts, evaluation after every round -- and no FL machinery. It is run
  with 1 and with 2 PyTorch threads; the faster is the baseline.

Each variant runs in its own spawned process (so its peak RSS is its own), variants
interleaved, ``--repeats`` times. It prints one JSON line per run and one summary line per
workload with the ratio of the bare loop's time to shoal's, the fraction of this machine's
measured two-thread matmul peak that shoal's training reached, and start-up time separately.

    .venv/bin/python benchmarks/bench_sim.py            # S and L, 1 repeat
    .venv/bin/python benchmarks/bench_sim.py --workloads S --repeats 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time

WORKLOADS = {
    "S": {"rounds": 30, "data.clients": 100, "sampling.per_round": 10},
    "L": {"rounds": 10, "data.clients": 1000, "sampling.per_round": 100},
}

# FLOPs per example of the 2NN (784-200-200-10): forward 2*sum(in*out); a training step
# adds the weight gradients (same again) and the input gradients of layers 2 and 3.
_MACS = 784 * 200 + 200 * 200 + 200 * 10
FWD_FLOPS = 2 * _MACS
TRAIN_FLOPS = 2 * FWD_FLOPS + 2 * (200 * 200 + 200 * 10)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_shoal(overrides: dict, seed: int) -> dict:
    from shoal.config import load_config
    from shoal.experiment import Experiment

    cfg = load_config(None, {**overrides, "seed": seed})
    t0 = time.perf_counter()
    exp = Experiment(cfg)
    result = exp.run()
    s = result.summary()
    return {"startup_s": exp.startup_seconds, "train_s": s["train_seconds"],
            "wall_s": time.perf_counter() - t0, "final_accuracy": s["final_accuracy"],
            "client_updates": s["client_updates"],
            "train_examples": int(sum(r.examples for r in result.records)),
            "evaluations": len(result.evaluated()), "peak_rss_mb": _peak_rss_mb()}


def run_bare(overrides: dict, seed: int, threads: int) -> dict:
    """The baseline: what a researcher writes first, one client after another."""
    import copy

    import numpy as np
    import torch
    from torch import nn

    from shoal import seeds
    from shoal.data import load_fashion_mnist
    from shoal.data.partition import partition
    from shoal.training import LocalTrainConfig, batch_plan

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    train, test = load_fashion_mnist()
    n_clients, per_round = overrides["data.clients"], overrides["sampling.per_round"]
    parts = partition(train.y, n_clients, "dirichlet", alpha=0.5, seed=0)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    xt, yt = torch.from_numpy(test.x), torch.from_numpy(test.y)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200),
                          nn.ReLU(), nn.Linear(200, 10))
    cfg = LocalTrainConfig()
    startup = time.perf_counter() - t0

    def evaluate() -> float:
        with torch.no_grad():
            return float((model(xt).argmax(1) == yt).float().mean())

    t1 = time.perf_counter()
    evaluate()
    updates = examples = 0
    acc = float("nan")
    for rnd in range(1, overrides["rounds"] + 1):
        rng = seeds.generator(seed, "sample", rnd)
        cohort = np.sort(rng.choice(n_clients, size=per_round, replace=False))
        global_state = copy.deepcopy(model.state_dict())
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        weight = 0
        for c in cohort:
            idx = parts[c]
            if len(idx) == 0:
                continue
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
            plan = batch_plan(len(idx), cfg, seeds.generator(seed, "train", rnd, int(c)))
            for batch in plan:
                b = torch.from_numpy(idx[batch[batch >= 0]])
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
            for k, v in model.state_dict().items():
                total[k] += v * len(idx)
            weight += len(idx)
            updates += 1
            examples += len(idx)
        model.load_state_dict({k: v / weight for k, v in total.items()})
        acc = evaluate()
    train_s = time.perf_counter() - t1
    return {"startup_s": startup, "train_s": train_s, "wall_s": startup + train_s,
            "final_accuracy": acc, "client_updates": updates, "train_examples": examples,
            "evaluations": overrides["rounds"] + 1, "peak_rss_mb": _peak_rss_mb()}


def matmul_peak_gflops(threads: int = 2) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9)
    return best


def _child(conn, fn_name: str, args: tuple) -> None:
    try:
        if ":" in fn_name:  # "module:function" of another benchmark script
            import importlib

            module, name = fn_name.split(":")
            fn = getattr(importlib.import_module(module), name)
        else:
            fn = globals()[fn_name]
        conn.send(fn(*args))
    except BaseException as exc:  # report, don't hang the parent
        conn.send({"error": repr(exc)})
    conn.close()


def in_child(fn_name: str, *args) -> dict:
    """``fn_name(*args)`` (a function of this script, or ``"module:function"`` of another
    script in benchmarks/) in a fresh spawned process, so its peak RSS is its own."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn_name, args))
    p.start()
    out = parent.recv()
    p.join()
    if isinstance(out, dict) and "error" in out:
        raise RuntimeError(f"{fn_name}{args} failed: {out['error']}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["S", "L"], choices=list(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bare-threads", nargs="+", type=int, default=[1, 2])
    args = ap.parse_args(argv)

    peak = in_child("matmul_peak_gflops", 2)
    print(json.dumps({"bench": "matmul_peak", "threads": 2, "gflops": round(peak, 1)}),
          flush=True)
    for name in args.workloads:
        ov = WORKLOADS[name]
        runs: dict[str, list[dict]] = {}
        for rep in range(args.repeats):
            variants = [("shoal", "run_shoal", (ov, args.seed))]
            variants += [(f"bare_{t}t", "run_bare", (ov, args.seed, t))
                         for t in args.bare_threads]
            if rep % 2:
                variants.reverse()  # interleave so drift in machine load hits both sides
            for label, fn, fargs in variants:
                r = in_child(fn, *fargs)
                r["updates_per_s"] = r["client_updates"] / r["train_s"]
                runs.setdefault(label, []).append(r)
                print(json.dumps({"bench": "sim", "workload": name, "variant": label,
                                  "repeat": rep, **{k: round(v, 4) if isinstance(v, float)
                                                    else v for k, v in r.items()}}),
                      flush=True)
        med = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for label, rs in runs.items()}
        shoal = med["shoal"]
        bare_label = min((lb for lb in med if lb.startswith("bare")),
                         key=lambda lb: med[lb]["wall_s"])
        bare = med[bare_label]
        flops = shoal["train_examples"] * TRAIN_FLOPS + shoal["evaluations"] * 10_000 * FWD_FLOPS
        floor_s = flops / (peak * 1e9)
        print(json.dumps({
            "bench": "sim_summary", "workload": name, "baseline": bare_label,
            "speedup_wall": round(bare["wall_s"] / shoal["wall_s"], 2),
            "speedup_train": round(bare["train_s"] / shoal["train_s"], 2),
            "shoal_wall_s": round(shoal["wall_s"], 2), "shoal_startup_s": round(
                shoal["startup_s"], 2), "shoal_train_s": round(shoal["train_s"], 2),
            "bare_wall_s": round(bare["wall_s"], 2), "bare_train_s": round(bare["train_s"], 2),
            "shoal_updates_per_s": round(shoal["updates_per_s"], 1),
            "bare_updates_per_s": round(bare["updates_per_s"], 1),
            "shoal_accuracy": shoal["final_accuracy"], "bare_accuracy": bare["final_accuracy"],
            "shoal_peak_rss_mb": round(shoal["peak_rss_mb"]),
            "bare_peak_rss_mb": round(bare["peak_rss_mb"]),
            "compute_floor_s": round(floor_s, 2),
            "train_over_floor": round(shoal["train_s"] / floor_s, 2),
            "fraction_of_matmul_peak": round(floor_s / shoal["train_s"], 3),
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
