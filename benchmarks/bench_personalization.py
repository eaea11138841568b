"""Per-client accuracy of personalization against global FedAvg, on Fashion-MNIST with
exactly two classes per client (the regime of Collins et al. 2021).

100 clients (``--clients``), 10 per round (``--per-round``), ``--rounds`` rounds of each
method on the 2NN (784-200-200-10), local training 1 epoch, batch 32, SGD lr 0.05; each
client's test split holds test images of its own two classes
(:func:`shoal.scenarios.personalization.two_class_split`). Methods: global FedAvg (the
baseline of the ratios), FedAvg fine-tuned locally for 1 and 5 epochs, FedPer, FedRep (head
``--head-epochs``, body 1 epoch) and Ditto (``--lam``). One JSON line per method and seed:
per-client accuracy (mean, 10th percentile, median), the paired mean gain over global FedAvg
in points, the size of the aggregated vector, wall seconds.

    .venv/bin/python benchmarks/bench_personalization.py
    .venv/bin/python benchmarks/bench_personalization.py --rounds 50 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from shoal.data import load_fashion_mnist
from shoal.personalization import PersonalSettings
from shoal.scenarios.personalization import run_personalized, two_class_split
from shoal.training import LocalTrainConfig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--head-epochs", type=int, default=10)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=["fedavg", "fedper", "fedrep", "ditto"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train, test = load_fashion_mnist(os.environ.get("SHOAL_FASHION_MNIST") or None,
                                     flatten=True)
    for seed in args.seeds:
        parts, tparts, _ = two_class_split(train.y, test.y, args.clients, 10, seed)
        base = None
        for method in args.methods:
            settings = PersonalSettings(method, head_epochs=args.head_epochs, lam=args.lam)
            results = run_personalized(settings, train, test, parts, tparts,
                                       rounds=args.rounds, per_round=args.per_round,
                                       seed=seed, config=LocalTrainConfig(),
                                       finetune_epochs=(0, 1, 5))
            for r in results:
                if r.name == "fedavg":
                    base = r.accuracy
                gain = None if base is None else round(100 * float(np.mean(r.accuracy - base)),
                                                       2)
                print(json.dumps({
                    "bench": "personalization", "method": r.name, "seed": seed,
                    "clients": args.clients, "rounds": args.rounds,
                    "mean_accuracy": round(float(r.accuracy.mean()), 4),
                    "p10_accuracy": round(float(np.percentile(r.accuracy, 10)), 4),
                    "median_accuracy": round(float(np.median(r.accuracy)), 4),
                    "gain_vs_fedavg_points": gain, "aggregated_size": r.shared_size,
                    "seconds": round(r.seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
