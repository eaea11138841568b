"""Secure aggregation over real gRPC: what SecAgg+ adds to a deployed round.

One process: the aggregator (``AggregatorService`` on loopback, the coordinator's
``GrpcCarrier``) and N ``DeviceClient`` runtimes in threads. Rounds alternate between plain
FedAvg uploads and SecAgg+ (same devices, same model size, same round engine), so both see the
same machine state; every device takes part in every round. Local training is a fixed
precomputed update, so the difference between the two is the protocol's own cost: key
exchange, share encryption, mask expansion, the masked upload, unmasking, and the extra
round trips. Prints one JSON line per configuration with the median round time of each
kind, the overhead and the bytes per device per round. ``--protocol ckks`` measures CKKS
instead (devices encrypt, the aggregator adds ciphertexts, a key holder process decrypts the
sum; ``--k``/``--t`` do not apply).

Reference (docs/references.md, section "Measurements on this machine"): Flower 1.42's SecAgg+
(Beutel et al., "Flower: A Friendly Federated Learning Research Framework", 2020) with 20
clients, the 2NN (199,210 parameters), 13 shares (k = 12 neighbours) and threshold 7 took 4.1 s
per round against 2.1 s without it on this machine: about 2 s of overhead.

    .venv/bin/python benchmarks/bench_secagg_grpc.py --n 20 --d 199210 --k 12 --t 7 --pairs 7
    .venv/bin/python benchmarks/bench_secagg_grpc.py --protocol ckks --n 10 --pairs 3
"""

from __future__ import annotations

import functools

import argparse
import json
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from shoal.device_ckks import CkksSetup
from shoal.key_service import KeyService
from shoal.policy import SyncPolicy
from shoal.privacy.he import CkksParams
from shoal.runner import run_round
from shoal.sampling import UniformSampler
from shoal.privacy.secagg_rounds import SecAggAggregation
from shoal.registry import SQLiteRegistry
from shoal.strategy import FedAvg
from shoal.transport.auth import Keyring
from shoal.transport.tokens import issue_token
from shoal.transport.client import DeviceClient
from shoal.transport.device_api import TrainResult
from shoal.transport.carrier import GrpcCarrier
from shoal.transport.server import AggregatorService, AggregatorSettings, serve

SECRET = b"b" * 32


def run(n: int, d: int, k: int, t: int, pairs: int, workdir: Path, *, value_bits: int,
        max_weight: int, protocol: str = "secagg") -> dict:
    settings = AggregatorSettings(roster_wait_s=30.0, stage_timeout_s=30.0, long_poll_s=2.0,
                                  checkin_interval_s=0.02, idle_retry_s=0.02,
                                  rate_per_s=1000.0, burst=1000.0)
    service = AggregatorService(settings, Keyring.single(SECRET), d, "bench",
                                lambda: SQLiteRegistry(workdir / "registry.db"))
    port, stop_server = serve(service)
    devices = [f"dev-{i:03d}" for i in range(n)]
    registry = SQLiteRegistry(workdir / "registry.db")
    for dev in devices:
        registry.enroll(dev, now=time.time())
    keys = None
    if protocol == "ckks":
        keys = KeyService(CkksParams())
        secure = CkksSetup(keys.params, keys.context, clip=0.5, max_weight=max_weight,
                           decrypt=keys.decrypt)
    else:
        secure = SecAggAggregation(clip=0.5, value_bits=value_bits, max_weight=max_weight,
                                   neighbours=k, threshold=t, dropout=0.0, corrupt_rate=0.05,
                                   rng_for_round=np.random.default_rng)
    plain_pool = GrpcCarrier(service, devices, poll_s=0.01)
    secure_pool = GrpcCarrier(service, devices, poll_s=0.01, secure=secure)
    # every device, every round: target n, no over-selection, nothing may be missing
    policy = SyncPolicy(target=n, deadline_s=120.0, min_fraction=1.0, max_attempts=1)
    stop = threading.Event()
    clients: list[DeviceClient] = []

    def device(i: int, dev: str) -> None:
        update = np.random.default_rng(i).normal(0, 0.01, d).astype(np.float32)

        def train(params, settings, rnd):
            return TrainResult(update, 600, {"loss": 0.5})

        token = issue_token(SECRET, dev, now=time.time(), ttl_seconds=3600)
        with DeviceClient(f"127.0.0.1:{port}", token, dev, root_certificates=None,
                          train=train, min_wait_s=0.0, max_backoff_s=0.2) as client:
            clients.append(client)
            client.run(stop=stop)

    threads = [threading.Thread(target=device, args=(i, dev), daemon=True)
               for i, dev in enumerate(devices)]
    for th in threads:
        th.start()
    times: dict[str, list[float]] = {"plain": [], "secure": []}
    bytes_per_device: dict[str, list[float]] = {"plain": [], "secure": []}
    up_per_device: dict[str, list[float]] = {"plain": [], "secure": []}
    state = FedAvg().init(np.zeros(d, np.float32))
    coords = {kind: functools.partial(run_round, FedAvg(), pool, UniformSampler(n), seed=0,
                                      policy=policy)
              for kind, pool in (("plain", plain_pool), ("secure", secure_pool))}
    try:
        # one warm-up round of each kind (connections, first downloads), then the pairs
        for r in range(pairs + 1):
            for kind in ("plain", "secure") if r % 2 == 0 else ("secure", "plain"):
                start = time.perf_counter()
                state, rec = coords[kind](state)
                elapsed = time.perf_counter() - start
                if not rec.committed:
                    raise RuntimeError(f"{kind} round {rec.round} did not commit: {rec}")
                if r > 0:
                    times[kind].append(elapsed)
                    bytes_per_device[kind].append((rec.bytes_up + rec.bytes_down) / n)
                    up_per_device[kind].append(rec.bytes_up / n)
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=30)
        stop_server()
        if keys is not None:
            keys.close()
    plain, sec = statistics.median(times["plain"]), statistics.median(times["secure"])
    return {
        "bench": f"{protocol}_grpc", "n": n, "d": d, "pairs": pairs, "max_weight": max_weight,
        **({"k": k, "t": t, "value_bits": value_bits,
            "ring_bits": secure.config_for(n).params_for(n, d).bits}
           if isinstance(secure, SecAggAggregation) else {}),
        "plain_round_s": round(plain, 3), "secure_round_s": round(sec, 3),
        "overhead_s": round(sec - plain, 3),
        "overhead_vs_flower_2s": round(2.0 / max(sec - plain, 1e-3), 1),
        "plain_mb_per_device": round(statistics.median(bytes_per_device["plain"]) / 1e6, 3),
        "secure_mb_per_device": round(statistics.median(bytes_per_device["secure"]) / 1e6, 3),
        "plain_up_bytes_per_device": round(statistics.median(up_per_device["plain"])),
        "secure_up_bytes_per_device": round(statistics.median(up_per_device["secure"])),
        "secure_rounds_s": [round(x, 3) for x in times["secure"]],
        "plain_rounds_s": [round(x, 3) for x in times["plain"]],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="devices (all take part every round)")
    ap.add_argument("--d", type=int, default=199_210, help="model length")
    ap.add_argument("--k", type=int, default=12, help="SecAgg+ neighbours (-1: complete graph)")
    ap.add_argument("--t", type=int, default=7, help="Shamir threshold")
    ap.add_argument("--pairs", type=int, default=7, help="measured (plain, secure) pairs")
    ap.add_argument("--value-bits", type=int, default=16)
    ap.add_argument("--max-weight", type=int, default=1024)
    ap.add_argument("--protocol", choices=("secagg", "ckks"), default="secagg")
    args = ap.parse_args(argv)
    logging.getLogger("shoal").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(args.n, args.d, args.k, args.t, args.pairs, Path(tmp),
                             value_bits=args.value_bits, max_weight=args.max_weight,
                             protocol=args.protocol)),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
