"""Cost of one local SGD step per cohort size: the fused engine against the reference loop.

For k = 1, 2, 5, 10, 20 clients of 640 Fashion-MNIST examples each (20 steps of batch 32 on
the 2NN), one process, one PyTorch thread, it times ``CohortTrainer.train`` with the
``fused`` engine and with the ``sequential`` engine (``shoal.training.train_local``, one
client after another with autograd: the bare-loop baseline), best of ``--repeats``, and
prints per k the milliseconds per batched step, per client-step, and their ratio.

    .venv/bin/python benchmarks/bench_cohort_step.py
    .venv/bin/python benchmarks/bench_cohort_step.py --sizes 10 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from shoal import seeds
from shoal.data import load_fashion_mnist
from shoal.models import build_model
from shoal.sim.cohort import CohortTrainer
from shoal.training import LocalTrainConfig

EXAMPLES = 640  # 20 batches of 32
FLOPS_PER_EXAMPLE = 2 * 2 * (784 * 200 + 200 * 200 + 200 * 10) + 2 * (200 * 200 + 200 * 10)


def best_time(trainer: CohortTrainer, params: np.ndarray, clients: list[np.ndarray],
              cfg: LocalTrainConfig, repeats: int) -> float:
    best = float("inf")
    for r in range(repeats + 1):  # the first call warms buffers up and is not counted
        rngs = [seeds.generator(0, "train", r, c) for c in range(len(clients))]
        t = time.perf_counter()
        trainer.train(params, clients, cfg, rngs)
        if r:
            best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 5, 10, 20])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    train, _ = load_fashion_mnist()
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    engines = {name: CohortTrainer(build_model("mlp2nn", 784, 10, seed=0), x, y, engine=name)
               for name in ("fused", "sequential")}
    params = engines["fused"].flat_module.get()
    cfg = LocalTrainConfig()
    steps = EXAMPLES // cfg.batch_size
    rng = np.random.default_rng(0)
    for k in args.sizes:
        clients = [rng.choice(len(y), EXAMPLES, replace=False) for _ in range(k)]
        ms = {name: best_time(t, params, clients, cfg, args.repeats) / steps * 1e3
              for name, t in engines.items()}
        print(json.dumps({
            "bench": "cohort_step", "clients": k,
            "fused_ms_per_step": round(ms["fused"], 3),
            "fused_ms_per_client_step": round(ms["fused"] / k, 3),
            "sequential_ms_per_client_step": round(ms["sequential"] / k, 3),
            "speedup": round(ms["sequential"] / ms["fused"], 2),
            "fused_gflops": round(k * cfg.batch_size * FLOPS_PER_EXAMPLE / ms["fused"] / 1e6, 1),
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
