"""Compression trade-offs on config S: bytes on the wire against accuracy, per codec chain.

For each upload chain this runs config S (the same seeds with and without compression) and
prints one JSON line per (chain, seed) and one summary line per chain: upload and download
bytes per round, the ratio to raw float32 (4 bytes per parameter), the mean test accuracy
over the last five rounds and the final accuracy, their differences from the uncompressed
run with the same seed, and encode / decode throughput (MB of float32 input per second,
through the full wire format) on a 2NN-sized update.

    .venv/bin/python benchmarks/bench_compression.py
    .venv/bin/python benchmarks/bench_compression.py --chains none q8 "topk(0.05)+q8+zstd" --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

DEFAULT_CHAINS = [
    ("none", False), ("fp16", False), ("bf16", False), ("q8", False), ("q8+zstd", False),
    ("q4", False), ("q4+zstd", True), ("q2(1024)+zstd", True), ("sign", True),
    ("topk(0.2)+q2(1024)+zstd", True), ("topk(0.15)+q2+zstd", True),
    ("topk(0.1)+q2+zstd", True), ("topk(0.05)+q8+zstd", True), ("topk(0.01)+q8+zstd", True),
    ("randk(0.1)+q8+zstd", False),
]


def throughput(chain_text: str, error_feedback: bool, dim: int = 199_210) -> dict:
    from shoal.codec import Chain, feedback_step, from_bytes, to_bytes

    chain = Chain.parse(chain_text)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(dim) * 0.01).astype(np.float32)
    enc_t, dec_t = [], []
    residual = None
    for _ in range(7):
        t = time.perf_counter()
        if error_feedback:
            e, residual = feedback_step(chain, residual, x, rng)
        else:
            e = chain.encode(x, rng)
        blob = to_bytes(e)
        enc_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        from_bytes(blob, max_elements=dim)
        dec_t.append(time.perf_counter() - t)
    mb = 4 * dim / 1e6
    return {"encode_mb_s": mb / statistics.median(enc_t),
            "decode_mb_s": mb / statistics.median(dec_t),
            "encode_ms": 1e3 * statistics.median(enc_t),
            "decode_ms": 1e3 * statistics.median(dec_t)}


def run(chain_text: str, error_feedback: bool, seed: int, data) -> dict:
    from shoal.config import load_config
    from shoal.experiment import Experiment

    cfg = load_config(None, {"seed": seed, "compression.upload": chain_text,
                             "compression.error_feedback": error_feedback})
    result = Experiment(cfg, data).run()
    s = result.summary()
    return {"bytes_up": s["bytes_up_per_round"], "bytes_down": s["bytes_down_per_round"],
            "final_accuracy": s["final_accuracy"], "last5": s["mean_accuracy_last5"],
            "train_s": s["train_seconds"], "updates": s["client_updates"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", nargs="+", help="chains to run (error feedback on for "
                    "sparsifiers, sign and <= 4-bit quantizers); default: a standard set")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = ap.parse_args(argv)
    chains = DEFAULT_CHAINS
    if args.chains:
        lossy_ef = ("topk", "randk(", "sign", "q4", "q2")
        chains = [(c, any(c.startswith(p) or p in c for p in lossy_ef)
                   and not c.startswith("randk")) for c in args.chains]
        if ("none", False) not in chains:
            chains.insert(0, ("none", False))

    from shoal.config import load_config
    from shoal.build import load_data

    data = load_data(load_config())
    raw_params = 199_210 * 4
    base: dict[int, dict] = {}
    for chain, ef in chains:
        per_seed = []
        for seed in args.seeds:
            r = run(chain, ef, seed, data)
            if chain == "none":
                base[seed] = r
            r["d_last5"] = r["last5"] - base[seed]["last5"]
            r["d_final"] = r["final_accuracy"] - base[seed]["final_accuracy"]
            per_seed.append(r)
            print(json.dumps({"bench": "compression_run", "chain": chain,
                              "error_feedback": ef, "seed": seed,
                              **{k: round(v, 4) for k, v in r.items()}}), flush=True)
        tp = throughput(chain, ef)
        mean = {k: statistics.mean(r[k] for r in per_seed) for k in per_seed[0]}
        per_update_up = mean["bytes_up"] / (mean["updates"] / 30)
        print(json.dumps({
            "bench": "compression", "chain": chain, "error_feedback": ef,
            "seeds": args.seeds,
            "upload_bytes_per_round": round(mean["bytes_up"]),
            "download_bytes_per_round": round(mean["bytes_down"]),
            "upload_ratio_vs_float32": round(raw_params / per_update_up, 2),
            "mean_last5": round(mean["last5"], 4), "d_last5": round(mean["d_last5"], 4),
            "final_accuracy": round(mean["final_accuracy"], 4),
            "d_final": round(mean["d_final"], 4),
            **{k: round(v, 1) for k, v in tp.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
