"""The Ray backend's cost: the same runs trained in process and by Ray actors, in one run.

For config S (100 clients, 10 per round, 30 rounds) and config L (1000 clients, 100 per
round, 30 rounds) this runs

* ``local``   -- in-process training as ``shoal run`` does it (``sim.threads`` automatic:
  1 thread for S, every core for L);
* ``local1``  -- in-process with one PyTorch thread: the exact baseline (Ray's actors train
  with one thread each, and training's floats depend on the thread count);
* ``ray``     -- ``sim.backend = "ray"`` on a local Ray started once (``ray.init``), one
  actor per core.

Variants alternate, ``--repeats`` times. Each prints a JSON line: start-up (building the
experiment; for Ray that includes starting its actors), seconds per round (training and
central evaluation, which all variants share), final accuracy, and for Ray the largest
absolute difference of its final model from ``local1``'s (0 means bit-identical). A summary
line per workload gives Ray's overhead per round against both in-process variants, as a
difference and a ratio.

    .venv/bin/python benchmarks/bench_ray.py                 # S and L, 1 repeat
    .venv/bin/python benchmarks/bench_ray.py --workloads S --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

WORKLOADS = {
    "S": {"rounds": 30, "data.clients": 100, "sampling.per_round": 10},
    "L": {"rounds": 30, "data.clients": 1000, "sampling.per_round": 100},
}
VARIANTS = {"local": {}, "local1": {"sim.threads": 1}, "ray": {"sim.backend": "ray"}}


def run(cfg, data) -> tuple[dict, np.ndarray]:
    from shoal.experiment import Experiment

    t0 = time.perf_counter()
    exp = Experiment(cfg, data)
    startup = time.perf_counter() - t0
    try:
        result = exp.run()
    finally:
        exp.close()
    rounds = result.state.version
    return {"startup_s": round(startup, 3),
            "per_round_s": round(result.wall_seconds / rounds, 4),
            "final_accuracy": result.summary()["final_accuracy"]}, result.state.params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["S", "L"], choices=list(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import os

    import ray

    from shoal.build import load_data
    from shoal.config import load_config

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    print(json.dumps({"bench": "ray_init", "seconds": round(time.perf_counter() - t0, 2),
                      "cpus": os.cpu_count()}), flush=True)
    try:
        for name in args.workloads:
            base = load_config(None, {**WORKLOADS[name], "seed": args.seed})
            data = load_data(base)
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for rep in range(args.repeats):
                exact = None
                for variant, extra in VARIANTS.items():
                    out, params = run(base.with_overrides(extra), data)
                    if variant == "local1":
                        exact = params
                    if variant == "ray" and exact is not None:
                        out["max_abs_diff_vs_local1"] = float(np.abs(params - exact).max())
                    times[variant].append(out["per_round_s"])
                    print(json.dumps({"bench": "ray_backend", "workload": name,
                                      "variant": variant, "repeat": rep, **out}), flush=True)
            med = {v: statistics.median(t) for v, t in times.items()}
            print(json.dumps({
                "bench": "ray_backend_summary", "workload": name,
                "per_round_s": {v: round(t, 4) for v, t in med.items()},
                "ray_overhead_per_round_s_vs_local1": round(med["ray"] - med["local1"], 4),
                "ray_overhead_per_round_s_vs_local": round(med["ray"] - med["local"], 4),
                "ray_over_local1": round(med["ray"] / med["local1"], 3),
                "ray_over_local": round(med["ray"] / med["local"], 3)}), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
