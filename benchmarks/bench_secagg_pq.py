"""Post-quantum hybrid SecAgg+: what ML-KEM-768 next to X25519 costs per client.

Runs whole in-process SecAgg+ rounds (the real client and server machines; every client in one
process, so the time is the sum over clients) for n clients with k neighbours from the
SecAgg+ parameter search, classical and hybrid interleaved in the same run, and prints per
client: the protocol time (round time / n), the bytes a client sends and receives for keys and
shares, and the hybrid's overhead over the classical round.

    .venv/bin/python benchmarks/bench_secagg_pq.py --clients 100 1000 --dim 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from shoal.privacy import crypto
from shoal.privacy.secagg_driver import run_secagg_ring
from shoal.privacy.secagg_graph import secagg_parameters
from shoal.privacy.secagg_messages import EncryptedShares, KeyAdvertisement, SecAggParams


def one_round(n: int, k: int, t: int, d: int, pq: bool) -> tuple[float, float]:
    params = SecAggParams(neighbours=k, threshold=t, bits=32, length=d, post_quantum=pq)
    vecs = {i: np.full(d, i, dtype=np.uint32) for i in range(n)}
    inbox: list = []
    start = time.perf_counter()
    result = run_secagg_ring(vecs, params, None, server_inbox=inbox)
    elapsed = time.perf_counter() - start
    assert result[1] == frozenset(range(n))
    sent = 0
    for m in inbox:
        if isinstance(m, KeyAdvertisement):
            sent += len(m.enc_public) + len(m.mask_public) + len(m.kem_public)
        elif isinstance(m, EncryptedShares):
            sent += sum(len(c) for c in m.ciphertexts.values())
    return elapsed / n, sent / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    for n in args.clients:
        k, t = secagg_parameters(n, 0.05, 0.05)
        times: dict[bool, list[float]] = {False: [], True: []}
        sent: dict[bool, float] = {}
        for _ in range(args.repeats):
            for pq in (False, True):
                s, b = one_round(n, k, t, args.dim, pq)
                times[pq].append(s)
                sent[pq] = b
        c, h = statistics.median(times[False]), statistics.median(times[True])
        print(json.dumps({
            "bench": "secagg_pq", "clients": n, "neighbours": k, "threshold": t,
            "dim": args.dim, "classical_s_per_client": round(c, 5),
            "hybrid_s_per_client": round(h, 5), "overhead_s_per_client": round(h - c, 5),
            "classical_key_bytes_sent_per_client": round(sent[False]),
            "hybrid_key_bytes_sent_per_client": round(sent[True]),
            "extra_bytes_per_client": round(sent[True] - sent[False]),
            "kem_public_bytes": crypto.KEM_PUBLIC_BYTES,
            "kem_ciphertext_bytes": crypto.KEM_CIPHERTEXT_BYTES}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
