"""Deployment DP noise: what a cryptographically secure, gridded release costs.

For a model of D parameters (default 1,000,000), times (median of --repeats) of:

* ``pcg64_float32`` -- numpy's PCG64 ``standard_normal`` in float32 (the baseline: the old
  deployment noise, fast but neither a CSPRNG nor free of floating-point structure);
* ``csprng_normal`` -- :class:`shoal.privacy.csprng.CryptoRandom` Box-Muller normals;
* ``gridded_release`` -- the whole deployed release: the sum put on the exact grid plus
  discrete Gaussian noise from the CSPRNG (:func:`shoal.privacy.discrete_gaussian.gridded_release`).

Prints one JSON line per variant with seconds, values per second and the ratio to the
baseline.

    .venv/bin/python benchmarks/bench_noise.py --dim 1000000 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from shoal.privacy.csprng import CryptoRandom
from shoal.privacy.discrete_gaussian import gridded_release


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    d = args.dim
    pcg = np.random.default_rng(0)
    crypto = CryptoRandom()
    total = np.random.default_rng(1).normal(0, 1, d)
    variants = {
        "pcg64_float32": lambda: pcg.standard_normal(d, dtype=np.float32),
        "csprng_normal": lambda: crypto.standard_normal(d),
        "gridded_release": lambda: gridded_release(total, 1.0, 1.0, crypto),
    }
    base = None
    for name, fn in variants.items():
        s = timed(fn, args.repeats)
        base = base or s
        print(json.dumps({"bench": "noise", "variant": name, "dim": d, "seconds": round(s, 4),
                          "values_per_s": round(d / s), "ratio_to_pcg64": round(s / base, 2)}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
