"""HierFAVG against flat FedAvg on config L with 10 edges: accuracy against global rounds
and the bytes that reach the global server, in one run.

Config L: 1000 clients (Dirichlet alpha = 0.5), 100 per round, the 2NN. Variants:

* ``flat``   -- FedAvg, every device uploads to the global server;
* ``hier1``  -- 10 edges (consistent hashing), one edge round per global round: the edges
  only fold, so the model is flat FedAvg's (the largest difference is printed);
* ``hier2``, ``hier5`` -- HierFAVG (Liu et al., ICC 2020): each edge averages its devices
  2 or 5 times per global round (devices train 2 or 5 times as often).

Each variant prints one JSON line per evaluated global round (accuracy, bytes into the global
server so far, device updates so far) and a summary line: final accuracy, global ingress per
round, its ratio to flat, the global rounds to reach ``--target`` accuracy, and wall seconds.

    .venv/bin/python benchmarks/bench_hierarchy.py                  # 15 rounds, 4 variants
    .venv/bin/python benchmarks/bench_hierarchy.py --rounds 5 --variants flat hier2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

CONFIG_L = {"data.clients": 1000, "sampling.per_round": 100}
VARIANTS = {
    "flat": {},
    "hier1": {"hierarchy.edges": 10, "hierarchy.edge_rounds": 1},
    "hier2": {"hierarchy.edges": 10, "hierarchy.edge_rounds": 2},
    "hier5": {"hierarchy.edges": 10, "hierarchy.edge_rounds": 5},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)

    from shoal.build import load_data
    from shoal.config import load_config
    from shoal.experiment import Experiment

    base = {"rounds": args.rounds, "seed": args.seed, **CONFIG_L}
    data = load_data(load_config(None, base))
    finals: dict[str, np.ndarray] = {}
    flat_ingress = None
    for name in args.variants:
        cfg = load_config(None, {**base, **VARIANTS[name]})
        t0 = time.perf_counter()
        exp = Experiment(cfg, data)
        result = exp.run()
        wall = time.perf_counter() - t0
        finals[name] = result.state.params
        ingress = updates = 0
        reached = None
        edge_rounds = cfg["hierarchy"]["edge_rounds"] if cfg["hierarchy"]["edges"] else 1
        for rec in result.records:
            ingress += rec.bytes_up
            # computed, not counted: each accepted device trained once per edge round
            updates += rec.accepted * edge_rounds
            acc = rec.eval.get("accuracy")
            if reached is None and acc is not None and acc >= args.target:
                reached = rec.round
            print(json.dumps({"bench": "hierarchy", "variant": name, "round": rec.round,
                              "accuracy": acc, "global_ingress_bytes": ingress,
                              "device_updates_computed": updates}), flush=True)
        per_round = ingress / max(1, result.state.version)
        flat_ingress = per_round if name == "flat" else flat_ingress
        line = {"bench": "hierarchy", "variant": name, "summary": True,
                "final_accuracy": result.summary()["final_accuracy"],
                "global_ingress_per_round": per_round,
                "ingress_vs_flat": per_round / flat_ingress if flat_ingress else None,
                "rounds_to_target": reached, "target": args.target,
                "wall_seconds": round(wall, 1)}
        if name != "flat" and "flat" in finals and VARIANTS[name].get(
                "hierarchy.edge_rounds") == 1:
            line["max_abs_diff_vs_flat"] = float(np.abs(finals[name] - finals["flat"]).max())
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
