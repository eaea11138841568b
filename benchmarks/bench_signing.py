"""Cost of signing a model and of a device verifying it, per scheme, against hashing alone.

For each scheme (Ed25519, ML-DSA-65, the hybrid of both) and each model size (the 2NN's
199,210 parameters, and ``--big`` parameters), median of ``--repeats`` calls after one
warm-up, one JSON line each:

* ``sign_ms``: :meth:`Signer.sign_model` -- the float32 bytes, their SHA-256, the header and
  its signature (what the operator pays per committed version);
* ``verify_ms``: :func:`verify_artifact` -- header checks, signature, SHA-256 of the bytes
  (what a device pays per download);
* ``hash_ms``: the baseline, SHA-256 of the model's bytes alone, and the ratios
  ``sign_over_hash`` / ``verify_over_hash``: what the signature adds beyond the digest a
  device would compute anyway;
* ``signature_bytes`` and ``public_key_bytes``: what travels beside the model / is
  provisioned on the device.

    .venv/bin/python benchmarks/bench_signing.py
    .venv/bin/python benchmarks/bench_signing.py --repeats 51 --big 10000000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from collections.abc import Callable

import numpy as np

from shoal.lifecycle.signing import Signer, model_bytes, served_namespace, verify_artifact

NAMESPACE = served_namespace("0123456789abcdef0123456789abcdef")  # a store id's length
from shoal.privacy import crypto


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--big", type=int, default=2_000_000, help="parameters of the large model")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    for size in (199_210, args.big):
        params = rng.standard_normal(size).astype(np.float32)
        payload = model_bytes(params)
        hash_ms = median_ms(lambda: hashlib.sha256(model_bytes(params)).digest(),
                            args.repeats)
        for scheme in crypto.SIGNATURE_SCHEMES:
            signer = Signer(crypto.generate_signing_key(scheme))
            signed = signer.sign_model(params, 1, NAMESPACE)
            sign_ms = median_ms(lambda: signer.sign_model(params, 1, NAMESPACE), args.repeats)
            verify_ms = median_ms(lambda: verify_artifact(signer.trusted, "model",
                                                          model_bytes(params), signed,
                                                          namespace=NAMESPACE),
                                  args.repeats)
            print(json.dumps({"bench": "signing", "scheme": scheme, "params": size,
                              "model_bytes": len(payload), "sign_ms": round(sign_ms, 3),
                              "verify_ms": round(verify_ms, 3), "hash_ms": round(hash_ms, 3),
                              "sign_over_hash": round(sign_ms / hash_ms, 2),
                              "verify_over_hash": round(verify_ms / hash_ms, 2),
                              "signature_bytes": len(signed.signature),
                              "header_bytes": len(signed.header),
                              "public_key_bytes": len(signer.key.public)}), flush=True)


if __name__ == "__main__":
    main()
