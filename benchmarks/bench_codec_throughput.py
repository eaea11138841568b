"""Size, speed and error of shoal.codec chains on a 2NN-sized update (d = 199,210).

Prints one JSON line per chain: wire bytes (header included), ``ratio`` = bytes / (4·d) and
``compression`` = (4·d) / bytes against raw float32, encode and decode throughput in MB/s of
raw float32 (medians over ``--repeats``; encode = chain encode + ``to_bytes``, decode =
validating ``from_bytes``), and the relative L2 error ``‖x − x̂‖ / ‖x‖`` of one round.
Two ``baseline`` lines (bare numpy float16 cast, bare zstd of the raw bytes) give a same-machine
reference: compare ratios, not absolute numbers, on small noisy machines.

    .venv/bin/python benchmarks/bench_codec_throughput.py [--repeats 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import zstandard

from shoal.codec import (
    BFloat16,
    Chain,
    ErrorFeedback,
    Float16,
    RandomK,
    Sign,
    StochasticQuantize,
    TopK,
    Zstd,
    from_bytes,
    to_bytes,
)

D = 199_210  # 2NN: 784·200 + 200 + 200·200 + 200 + 200·10 + 10


def codecs() -> dict[str, Callable[[], Chain | ErrorFeedback]]:
    """Fresh codec per repeat (error feedback carries state)."""
    return {
        "raw": lambda: Chain([]),
        "fp16": lambda: Chain([Float16()]),
        "bf16": lambda: Chain([BFloat16()]),
        "q8": lambda: Chain([StochasticQuantize(bits=8, block=256)]),
        "q4": lambda: Chain([StochasticQuantize(bits=4, block=256)]),
        "q2": lambda: Chain([StochasticQuantize(bits=2, block=256)]),
        "sign1": lambda: Chain([Sign()]),
        "sign1+ef": lambda: ErrorFeedback(Chain([Sign()])),
        "topk1%": lambda: Chain([TopK(fraction=0.01)]),
        "topk1%+ef": lambda: ErrorFeedback(Chain([TopK(fraction=0.01)])),
        "topk1%+q8+zstd": lambda: Chain([TopK(fraction=0.01), StochasticQuantize(bits=8), Zstd(level=3)]),
        "randk1%": lambda: Chain([RandomK(fraction=0.01)]),
        "q8+zstd": lambda: Chain([StochasticQuantize(bits=8), Zstd(level=3)]),
        "zstd": lambda: Chain([Zstd(level=3)]),
    }


def bench_chain(
    name: str, make: Callable[[], Chain | ErrorFeedback], x: np.ndarray, repeats: int, seed: int
) -> dict:
    enc_t, dec_t = [], []
    for r in range(repeats):
        codec = make()
        rng = np.random.default_rng([seed, r])
        t0 = time.perf_counter()
        blob = to_bytes(codec.encode(x, rng))
        t1 = time.perf_counter()
        y = from_bytes(blob, max_elements=x.size)
        t2 = time.perf_counter()
        enc_t.append(t1 - t0)
        dec_t.append(t2 - t1)
        if r == 0:
            size, err = len(blob), float(np.linalg.norm(x - y) / np.linalg.norm(x))
    return row(name, "shoal", size, x.nbytes, enc_t, dec_t, err)


def bench_baselines(x: np.ndarray, repeats: int) -> list[dict]:
    out = []
    enc_t, dec_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        h = x.astype(np.float16).tobytes()
        t1 = time.perf_counter()
        y = np.frombuffer(h, np.float16).astype(np.float32)
        t2 = time.perf_counter()
        enc_t.append(t1 - t0)
        dec_t.append(t2 - t1)
    out.append(row("numpy-fp16-cast", "baseline", len(h), x.nbytes, enc_t, dec_t, rel(x, y)))
    enc_t, dec_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        z = zstandard.ZstdCompressor(level=3).compress(x.tobytes())
        t1 = time.perf_counter()
        y = np.frombuffer(zstandard.ZstdDecompressor().decompress(z), np.float32)
        t2 = time.perf_counter()
        enc_t.append(t1 - t0)
        dec_t.append(t2 - t1)
    out.append(row("zstd-raw-bytes", "baseline", len(z), x.nbytes, enc_t, dec_t, rel(x, y)))
    return out


def rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def row(
    name: str, kind: str, size: int, raw: int, enc_t: list[float], dec_t: list[float], err: float
) -> dict:
    return {
        "bench": "codec_throughput",
        "kind": kind,
        "chain": name,
        "d": raw // 4,
        "bytes": size,
        "ratio": round(size / raw, 5),
        "compression": round(raw / size, 2),
        "encode_MBps": round(raw / 1e6 / statistics.median(enc_t), 1),
        "decode_MBps": round(raw / 1e6 / statistics.median(dec_t), 1),
        "rel_l2_error": round(err, 5),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--d", type=int, default=D)
    args = parser.parse_args(argv)
    # Gaussian-like update, scaled like one epoch of SGD on a 2NN.
    x = (np.random.default_rng(args.seed).standard_normal(args.d) * 1e-2).astype(np.float32)
    for line in bench_baselines(x, args.repeats):
        print(json.dumps(line), flush=True)
    for name, make in codecs().items():
        print(json.dumps(bench_chain(name, make, x, args.repeats, args.seed)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
