"""What verifying a signed model costs a device end to end: ``GetModel`` over gRPC on loopback
with the operator's key against the same fetch without verification, per scheme.

A real aggregator serves a model store whose production alternates between two versions of
the 2NN's size (199,210 parameters, or ``--params``); a real ``DeviceClient`` fetches the
served model each time production moves (a full download: the two versions share nothing a
delta could use), first by an untimed device so the server has the payload ready. Median
of ``--repeats`` fetches after two warm-ups, one JSON line per scheme:

* ``fetch_ms``: a verified fetch (stream, reassembly, SHA-256 of the payload, decode,
  signature check of the rebuilt float32 model);
* ``baseline_ms``: the same fetch by a device without a trusted key (no signature check),
  run interleaved with the verified one so both see the same machine;
* ``overhead``: ``fetch_ms / baseline_ms``; ``first_chunk_extra_bytes``: what the signed
  header and signature add to the download.

    .venv/bin/python benchmarks/bench_serving.py
    .venv/bin/python benchmarks/bench_serving.py --repeats 41 --params 2000000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from shoal.lifecycle.signing import SignedArtifact, Signer
from shoal.lifecycle.store_signing import sign_version
from shoal.params import ParamSpec
from shoal.privacy import crypto
from shoal.registry import SQLiteRegistry
from shoal.store import Checkpoint, ModelStore
from shoal.strategy import ServerState
from shoal.transport.auth import Keyring
from shoal.transport.client import DeviceClient
from shoal.transport.device_api import TrainResult
from shoal.transport.server import AggregatorService, AggregatorSettings, serve
from shoal.transport.serving import ModelServing
from shoal.transport.tokens import issue_token

SECRET = b"b" * 32


def run(scheme: str, size: int, repeats: int, root: Path) -> dict:
    signer = Signer(crypto.generate_signing_key(scheme))
    rng = np.random.default_rng(0)
    spec = ParamSpec.from_shapes({"w": (size,)})
    with ModelStore(root / scheme) as store:
        ids = [store.commit(Checkpoint(ServerState(params=rng.standard_normal(size)
                                                   .astype(np.float32), version=1), spec,
                                       seed=0), round=1, metrics={}, now=1.0).id
               for _ in range(2)]
        store.promote(ids[0], now=2.0)
        for v in ids:  # signed where the key is: serving only reads the signatures
            sign_version(store, signer, v)
        service = AggregatorService(AggregatorSettings(), Keyring.single(SECRET), size, "fp",
                                    lambda: SQLiteRegistry(root / f"{scheme}.db"),
                                    serving=ModelServing(store, key=signer.trusted,
                                                         deltas=False))
        port, stop = serve(service)
        clients = {}
        try:
            for name, trusted in (("warm", None), ("verified", signer.trusted),
                                  ("baseline", None)):
                device = f"dev-{name}"
                clients[name] = DeviceClient(
                    f"127.0.0.1:{port}", issue_token(SECRET, device, now=time.time(),
                                                     ttl_seconds=3600), device,
                    root_certificates=None, train=lambda p, s, r: TrainResult(p * 0, 1),
                    trusted_key=trusted, max_model_bytes=16 * size + (1 << 20))
            times: dict[str, list[float]] = {"warm": [], "verified": [], "baseline": []}
            for i in range(repeats + 2):
                store.promote(ids[(i + 1) % 2], now=3.0 + i)  # production moves
                for name, client in clients.items():
                    t0 = time.perf_counter()
                    version, _ = client.fetch_served_model()
                    elapsed = time.perf_counter() - t0
                    assert version == ids[(i + 1) % 2]
                    if i >= 2:
                        times[name].append(elapsed)
            signed = SignedArtifact.from_json(store.get(ids[0]).signatures["model"])
        finally:
            for c in clients.values():
                c.close()
            stop()
    fetch = statistics.median(times["verified"]) * 1e3
    base = statistics.median(times["baseline"]) * 1e3
    return {"bench": "serving", "scheme": scheme, "params": size, "repeats": repeats,
            "fetch_ms": round(fetch, 3), "baseline_ms": round(base, 3),
            "overhead": round(fetch / base, 3),
            "first_chunk_extra_bytes": len(signed.header) + len(signed.signature)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--params", type=int, default=199_210)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in crypto.SIGNATURE_SCHEMES:
            print(json.dumps(run(scheme, args.params, args.repeats, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
