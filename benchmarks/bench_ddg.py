"""Distributed DP inside SecAgg+ against central DP at the same noise multiplier, on config S.

Config S (Fashion-MNIST, 100 clients, Dirichlet 0.5, 10 per round, 30 rounds, the 2NN). For
each noise multiplier z this prints one JSON line per arm, all in one run on the same data:

* ``central``: the server clips to C and adds a discrete Gaussian N_Z of std zC to the sum
  (no secure aggregation);
* ``distributed``: SecAgg+ with the rotated 16-bit ring, each of the 10 clients adding a
  discrete Gaussian share (the distributed discrete Gaussian, Kairouz, Liu & Steinke 2021),
  h = 10;

and, once, the non-private baselines: plain FedAvg, SecAgg+ with today's fixed point, and
SecAgg+ with the 8-bit rotated ring (compression only), with the bytes of one masked upload.
Each line has epsilon at delta = 1e-5 from the run's own accountant, the final accuracy and
the mean of the last five rounds; the comparison is the difference against the central arm
of the same z (and the compressed ring against the fixed point).

``--launch`` runs the distributed and central arms with ``shoal launch`` instead (real
device processes over gRPC with TLS) at the sizes given (``--clients``, ``--per-round``,
``--rounds``; keep them small on a shared machine).

    .venv/bin/python benchmarks/bench_ddg.py
    .venv/bin/python benchmarks/bench_ddg.py --noise 1.0 --clip 0.5 --rounds 30
    .venv/bin/python benchmarks/bench_ddg.py --launch --clients 20 --per-round 10 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

DELTA = 1e-5


def arms(z: float, clip: float) -> dict[str, dict]:
    dp = {"privacy.noise_multiplier": z, "privacy.clip_norm": clip, "privacy.delta": DELTA}
    return {
        "central": {**dp, "privacy.placement": "central"},
        "distributed": {**dp, "privacy.placement": "distributed",
                        "secure_aggregation.enabled": True,
                        "secure_aggregation.encoding": "rotated"},
    }


BASELINES = {
    "none": {},
    "secagg_fixed_point": {"secure_aggregation.enabled": True},
    "secagg_rotated_8bit": {"secure_aggregation.enabled": True,
                            "secure_aggregation.encoding": "rotated",
                            "secure_aggregation.norm_clip": 2.0},
}


def simulate(args: argparse.Namespace) -> None:
    from shoal.build import load_data
    from shoal.config import load_config
    from shoal.experiment import Experiment

    base = {"rounds": args.rounds, "seed": args.seed}
    data = load_data(load_config(None, base))
    runs = [(name, None, o) for name, o in BASELINES.items()] + \
        [(name, z, o) for z in args.noise for name, o in arms(z, args.clip).items()]
    for name, z, overrides in runs:
        t0 = time.perf_counter()
        result = Experiment(load_config(None, {**base, **overrides}), data).run()
        s, last = result.summary(), result.records[-1].privacy
        print(json.dumps({
            "bench": "ddg", "carrier": "simulation", "arm": name, "noise_multiplier": z,
            "clip_norm": args.clip if z else None, "rounds": s["rounds"],
            "epsilon": round(s["epsilon"], 4) if "epsilon" in s else None, "delta": DELTA,
            "final_accuracy": s["final_accuracy"],
            "mean_accuracy_last5": round(s["mean_accuracy_last5"], 4),
            "upload_bytes": last.get("secagg_upload_bytes"),
            "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


def launch(args: argparse.Namespace) -> None:
    for z in args.noise:
        for name, overrides in arms(z, args.clip).items():
            if name not in args.arms:
                continue
            sets = {**overrides, "deploy.over_selection": 1.0, "deploy.min_fraction": 1.0,
                    "secure_aggregation.roster_wait_s": 20.0,
                    "secure_aggregation.stage_timeout_s": 10.0}
            argv = [sys.executable, "-m", "shoal.cli", "launch", "--clients",
                    str(args.clients), "--per-round", str(args.per_round), "--rounds",
                    str(args.rounds), "--seed", str(args.seed), "--json", "-q",
                    "--no-dashboard"]
            for k, v in sets.items():
                argv += ["--set", f"{k}={json.dumps(v)}"]
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                proc = subprocess.run(argv + ["--out", args.out or tmp], capture_output=True,
                                      text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if proc.returncode != 0:
                print(json.dumps({"bench": "ddg", "carrier": "launch", "arm": name,
                                  "noise_multiplier": z, "error": proc.stderr[-2000:]}),
                      flush=True)
                continue
            s = json.loads(proc.stdout)
            print(json.dumps({
                "bench": "ddg", "carrier": "launch", "arm": name, "noise_multiplier": z,
                "clip_norm": args.clip, "clients": args.clients, "per_round": args.per_round,
                "rounds": s["rounds"], "epsilon": s.get("epsilon"), "delta": DELTA,
                "final_accuracy": s["final_accuracy"],
                "mean_accuracy_last5": s.get("mean_accuracy_last5"),
                "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--noise", nargs="+", type=float, default=[0.5, 1.0])
    ap.add_argument("--clip", type=float, default=0.5, help="clip norm C")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--launch", action="store_true",
                    help="shoal launch (device processes over gRPC) instead of simulation")
    ap.add_argument("--clients", type=int, default=20, help="--launch: data.clients")
    ap.add_argument("--per-round", type=int, default=10, help="--launch: sampling.per_round")
    ap.add_argument("--arms", nargs="+", default=["central", "distributed"],
                    help="--launch: which arms to run")
    ap.add_argument("--out", default=None,
                    help="--launch: keep the run directories here (default: discarded)")
    args = ap.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    (launch if args.launch else simulate)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
