"""Privacy against utility: DP-FedAvg on Fashion-MNIST with 1,000 clients and q = 0.1.

Every client joins each round independently with probability q = 0.1 (Poisson sampling, the
event the accountant composes), 100 clients per round on average, the 2NN, 1 local epoch.
For each noise multiplier z and each placement (central: the server clips to C and adds
N(0, (zC)^2) to the sum; local: every client clips and noises its own update) this prints
one JSON line with epsilon at delta = 1e-5 after the run (dp-accounting, RDP) and the final
and last-five-rounds mean test accuracy, plus the non-private baseline on the same clients.

    .venv/bin/python benchmarks/bench_privacy.py
    .venv/bin/python benchmarks/bench_privacy.py --rounds 50 --noise 0.5 1 2 --clip 0.5
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--noise", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    ap.add_argument("--clip", type=float, default=0.5, help="clip norm C")
    ap.add_argument("--placements", nargs="+", default=["central", "local"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)

    from shoal.config import load_config
    from shoal.build import load_data
    from shoal.experiment import Experiment

    base = {"rounds": args.rounds, "seed": args.seed, "data.clients": 1000,
            "sampling.method": "poisson", "sampling.q": 0.1}
    data = load_data(load_config(None, base))
    settings = [("none", None)] + [(p, z) for p in args.placements for z in args.noise]
    for placement, z in settings:
        overrides = dict(base)
        if placement != "none":
            overrides |= {"privacy.placement": placement, "privacy.noise_multiplier": z,
                          "privacy.clip_norm": args.clip, "privacy.delta": 1e-5}
        t0 = time.perf_counter()
        s = Experiment(load_config(None, overrides), data).run().summary()
        print(json.dumps({
            "bench": "privacy", "placement": placement, "noise_multiplier": z,
            "clip_norm": None if z is None else args.clip, "q": 0.1, "clients": 1000,
            "rounds": s["rounds"], "delta": 1e-5,
            "epsilon": round(s["epsilon"], 3) if "epsilon" in s else None,
            "final_accuracy": s["final_accuracy"],
            "mean_accuracy_last5": round(s["mean_accuracy_last5"], 4),
            "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
