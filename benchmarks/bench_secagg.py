"""Cost of one SecAgg+ round (Bell et al., CCS 2020) in shoal: client and server time per stage,
uplink bytes per client and the expansion over a plain float32 update.

Prints one JSON line per configuration. ``client_ms`` is the mean per-client time of each
protocol step (``client_total_ms`` adds the fixed-point encoding, ``client_encode_ms``);
``round_cpu_s`` is all clients plus the server, i.e. what one simulated round costs.
Every client really runs the protocol (keys, shares, AES-CTR masks), one after another in
this process; all clients share one encoded input vector so memory stays O(d), and each masked
vector is folded into the server's running sum as soon as it is produced. Clients in the dropout fraction vanish right after ShareKeys, the costliest case
for the server (their pairwise masks must be recomputed), as in Bonawitz et al.'s benchmarks.

Examples::

    python benchmarks/bench_secagg.py --n 20 --d 199210 --dropout 0.1
    python benchmarks/bench_secagg.py --n 20 --d 199210 --dropout 0 --k 12 --t 7   # Flower's setup

Reference point (docs/references.md, section "Measurements on this machine"): Flower's SecAgg+
(Beutel et al., "Flower: A Friendly Federated Learning Research Framework", 2020) with 20
clients, the 2NN (199,210 parameters), 13 shares and threshold 7 adds about 2 s per round on
this kind of machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict

import numpy as np

from shoal.privacy import shamir
from shoal.privacy.secagg_client import SecAggClient
from shoal.privacy.secagg_encoding import FixedPoint, ring_mask
from shoal.privacy.secagg_graph import secagg_parameters
from shoal.privacy.secagg_messages import (
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    SecAggParams,
    Stage,
    UnmaskingShares,
)
from shoal.privacy.secagg_server import SecAggServer

_STAGES = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING)
_ID = 8  # bytes per client id on the wire


def _wire_bytes(msg: object, bits: int) -> tuple[int, int]:
    """(bytes as held in memory, bytes with ring entries bit-packed) of one client message."""
    head = 16 + _ID  # session + sender
    if isinstance(msg, KeyAdvertisement):
        n = head + len(msg.enc_public) + len(msg.mask_public)
        return n, n
    if isinstance(msg, EncryptedShares):
        n = head + sum(_ID + len(ct) for ct in msg.ciphertexts.values())
        return n, n
    if isinstance(msg, MaskedInput):
        return head + msg.masked.nbytes, head + math.ceil(msg.masked.size * bits / 8)
    if isinstance(msg, UnmaskingShares):
        k = len(msg.self_mask_shares) + len(msg.mask_key_shares)
        n = head + k * (_ID + shamir.SHARE_BYTES)
        return n, n
    raise TypeError(type(msg))


def run_config(
    n: int,
    d: int,
    dropout: float,
    *,
    k: int | None,
    t: int | None,
    corrupt_rate: float,
    value_bits: int,
    max_weight: int,
    seed: int,
) -> dict[str, object]:
    """Run one round with every client in this process; return the JSON row."""
    rng = np.random.default_rng(seed)
    design_dropout = max(dropout, 0.05)
    if k is None or t is None:
        k_found, t_found = secagg_parameters(n, design_dropout, corrupt_rate)
        k, t = k if k is not None else k_found, t if t is not None else t_found
    encoding = FixedPoint(clip=1.0, value_bits=value_bits, max_weight=max_weight)
    bits = encoding.ring_bits(n)
    params = SecAggParams(neighbours=k, threshold=t, bits=bits, length=d + 1)

    update = (rng.standard_normal(d) * 0.05).astype(np.float32)
    encode_s = math.inf
    for _ in range(3):  # the first call pays page faults a running client would not
        t0 = time.perf_counter()
        vector = encoding.encode(update, max_weight, bits, rng)
        encode_s = min(encode_s, time.perf_counter() - t0)

    ids = list(range(n))
    dropped = set(rng.choice(n, size=round(dropout * n), replace=False).tolist())
    server = SecAggServer(params, ids)
    clients = {i: SecAggClient(i, vector) for i in ids}
    client_s: dict[Stage, list[float]] = defaultdict(list)
    server_s: dict[str, float] = defaultdict(float)
    sent = defaultdict(lambda: [0, 0])
    outgoing = {i: server.setup() for i in ids}
    for stage in _STAGES:
        for cid in sorted(outgoing):
            if stage is Stage.MASKED_INPUT and cid in dropped:
                continue  # vanished after ShareKeys
            t0 = time.perf_counter()
            reply = clients[cid].handle(outgoing[cid])
            client_s[stage].append(time.perf_counter() - t0)
            mem, packed = _wire_bytes(reply, bits)
            sent[cid][0] += mem
            sent[cid][1] += packed
            t0 = time.perf_counter()
            server.receive(reply)
            server_s[stage.value] += time.perf_counter() - t0
            del reply
        t0 = time.perf_counter()
        outgoing = server.advance()
        server_s[stage.value] += time.perf_counter() - t0

    survivors = server.included
    expected = (vector.astype(np.uint64) * np.uint64(len(survivors))) & np.uint64(ring_mask(bits))
    correct = bool(np.array_equal(server.aggregate.astype(np.uint64), expected))
    full = [sent[c] for c in ids if c not in dropped]
    mem_bytes = float(np.mean([s[0] for s in full]))
    packed_bytes = float(np.mean([s[1] for s in full]))
    plain = 4 * d
    client_ms = {s.value: 1e3 * float(np.mean(v)) for s, v in client_s.items()}
    server_total = sum(server_s.values())
    all_clients_s = sum(sum(v) for v in client_s.values()) + encode_s * (n - len(dropped))
    return {
        "bench": "secagg",
        "n": n,
        "d": d,
        "dropout": dropout,
        "dropped": len(dropped),
        "k": k,
        "t": t,
        "ring_bits": bits,
        "client_ms": {s: round(v, 3) for s, v in client_ms.items()},
        "client_encode_ms": round(1e3 * encode_s, 3),
        "client_total_ms": round(sum(client_ms.values()) + 1e3 * encode_s, 3),
        "client_max_masking_ms": round(1e3 * max(client_s[Stage.MASKED_INPUT]), 3),
        "server_ms": {s: round(1e3 * v, 3) for s, v in server_s.items()},
        "server_total_ms": round(1e3 * server_total, 3),
        "round_cpu_s": round(all_clients_s + server_total, 4),
        "uplink_bytes_per_client": round(mem_bytes),
        "expansion": round(mem_bytes / plain, 4),
        "uplink_bytes_packed": round(packed_bytes),
        "expansion_packed": round(packed_bytes / plain, 4),
        "correct": correct,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[20, 100, 500, 1000])
    ap.add_argument("--d", type=int, nargs="+", default=[199_210, 1_000_000])
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--k", type=int, default=None, help="neighbours (default: parameter finder)")
    ap.add_argument("--t", type=int, default=None, help="threshold (default: parameter finder)")
    ap.add_argument("--corrupt-rate", type=float, default=0.05)
    ap.add_argument("--value-bits", type=int, default=16)
    ap.add_argument("--max-weight", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    common = dict(
        corrupt_rate=args.corrupt_rate,
        value_bits=args.value_bits,
        max_weight=args.max_weight,
        seed=args.seed,
    )
    run_config(5, 1000, 0.0, k=None, t=None, **common)  # warm-up: imports, caches, allocator
    for n in args.n:
        for d in args.d:
            for dropout in args.dropout:
                row = run_config(n, d, dropout, k=args.k, t=args.t, **common)
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
