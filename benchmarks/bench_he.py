"""Homomorphic (CKKS) aggregation on this machine: what the aggregator, the clients and the
wire pay for adding updates it cannot read.

For a 2NN-sized update (199,210 values) and each ring degree: client encryption time, bytes per
upload (and the ratio to float32), the aggregator's parse-and-add time per upload and uploads per
second, the key holder's decryption of the sum, and the decrypted mean's largest error against
the plain mean; the baseline in the same run is the aggregator adding plain float32 updates
(numpy).

    .venv/bin/python benchmarks/bench_he.py --clients 20 --dim 199210
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from shoal.privacy.he import CkksParams, CkksSum, KeyHolder, encrypt_update, public_context


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--dim", type=int, default=199_210)
    ap.add_argument("--degrees", type=int, nargs="+", default=[4096, 8192])
    args = ap.parse_args(argv)
    n, d = args.clients, args.dim
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.05, 0.05, (n, d)).astype(np.float32)
    w = rng.integers(10, 100, n).astype(np.float64)
    t = time.perf_counter()
    plain = np.zeros(d)
    for row, weight in zip(x, w):
        plain += weight * row
    plain_s = (time.perf_counter() - t) / n
    print(json.dumps({"bench": "he", "variant": "plain_float32", "dim": d,
                      "aggregator_s_per_upload": round(plain_s, 6),
                      "uploads_per_s": round(1 / plain_s), "bytes_per_upload": 4 * d}))
    oracle = plain / w.sum()
    for degree in args.degrees:
        params = CkksParams(poly_modulus_degree=degree)
        holder = KeyHolder(params)
        ctx = public_context(holder.public_context())
        t = time.perf_counter()
        uploads = [encrypt_update(ctx, row, float(weight), clip=1.0, slots=params.slots)
                   for row, weight in zip(x, w)]
        encrypt_s = (time.perf_counter() - t) / n
        acc = CkksSum(ctx, params, d, clip=1.0, max_weight=100)
        t = time.perf_counter()
        for up in uploads:
            acc.add(up)
        add_s = (time.perf_counter() - t) / n
        t = time.perf_counter()
        total, weight = holder.decrypt_sum(acc.result(), d, n, round=1)
        decrypt_s = time.perf_counter() - t
        nbytes = sum(len(c) for c in uploads[0])
        print(json.dumps({
            "bench": "he", "variant": f"ckks_N{degree}", "dim": d, "clients": n,
            "security_bits": params.security_bits, "bytes_per_upload": nbytes,
            "bytes_vs_float32": round(nbytes / (4 * d), 2),
            "client_encrypt_s": round(encrypt_s, 3),
            "aggregator_s_per_upload": round(add_s, 4), "uploads_per_s": round(1 / add_s, 1),
            "slowdown_vs_plain": round(add_s / plain_s, 1), "decrypt_sum_s": round(decrypt_s, 3),
            "max_abs_error_of_mean": float(np.abs(total / weight - oracle).max())}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
