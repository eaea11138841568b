"""Post-quantum hybrid SecAgg+ (X25519 + ML-KEM-768) over real loopback gRPC, 10 devices.

The devices advertise ML-KEM keys, encapsulate to each neighbour, and reveal the ML-KEM half
of a dropped neighbour's pair key in Unmasking; the server relays what it cannot read. The
oracle: the example-weighted mean of the included devices' updates clipped to the fixed
point's range, computed here, within the fixed point's quantization; and the classical round
over the same devices, whose bytes on the wire the hybrid one exceeds by the ML-KEM material.
"""

from __future__ import annotations

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from secure_devices import N, delta_of, one_round, serve_carrier  # noqa: E402
from shoal.build import secagg_from_config  # noqa: E402
from shoal.config import load_config  # noqa: E402
from shoal.deploy import check_deployable  # noqa: E402
from shoal.pipeline import Pipeline  # noqa: E402
from shoal.privacy.crypto import KEM_CIPHERTEXT_BYTES, KEM_PUBLIC_BYTES  # noqa: E402

DIM = 300
RANGE = 1.0  # the fixed point's per-coordinate clip


def config(post_quantum: bool):
    return load_config(None, {
        "data.dataset": "synthetic", "data.clients": N, "model.name": "logreg",
        "sampling.per_round": N, "secure_aggregation.enabled": True,
        "secure_aggregation.clip": RANGE, "secure_aggregation.post_quantum": post_quantum})


def secure_round(tmp_path, post_quantum: bool, vanish: dict[str, str], *, target: int):
    """One round of the N devices on a fresh aggregator: ``(state, record, device stats)``."""
    where = tmp_path / ("hybrid" if post_quantum else "classical")
    where.mkdir()
    port, stop, carrier, devices = serve_carrier(where, secagg_from_config(config(post_quantum)),
                                                 DIM)
    try:
        return one_round(port, carrier, devices, Pipeline(), vanish, dim=DIM, target=target)
    finally:
        stop()


def test_a_hybrid_round_over_grpc_sums_like_a_classical_one(tmp_path):
    cfg = config(True)
    check_deployable(cfg, tls=False)  # deployable now
    vanish = {"dev-3": "share_keys",  # excluded: its pair keys' ML-KEM halves are revealed
              "dev-6": "advertise_keys"}  # excluded before any key was shared
    models, sent = {}, {}
    for pq in (True, False):
        state, rec, stats = secure_round(tmp_path, pq, vanish, target=N - 2)
        assert rec.committed and rec.accepted == N - 2, rec
        models[pq] = state.params
        sent[pq] = np.mean([stats[f"dev-{i}"].bytes_up for i in (0, 1, 2, 4, 5, 7, 8, 9)])
    included = [i for i in range(N) if i not in (3, 6)]
    weights = np.array([7 + i for i in included], dtype=np.float64)  # the devices' examples
    updates = np.array([np.clip(delta_of(i, DIM), -RANGE, RANGE) for i in included])
    expected = weights @ updates / weights.sum()
    enc = secagg_from_config(cfg).encoding
    step = 2 * RANGE / enc.levels  # one quantization step
    for pq in (True, False):
        np.testing.assert_allclose(models[pq], expected, atol=step, rtol=0)
    assert np.abs(models[True] - expected).max() > 0  # quantized, not the oracle itself
    # the hybrid round carries, per device, its ML-KEM key and one encapsulation per
    # neighbour that advertised (the complete graph of 10, one silent: 8), on top of the
    # classical round's messages
    extra = sent[True] - sent[False]
    assert extra >= KEM_PUBLIC_BYTES + (N - 2) * KEM_CIPHERTEXT_BYTES
    assert extra < 2 * (KEM_PUBLIC_BYTES + (N - 2) * KEM_CIPHERTEXT_BYTES)


def test_a_survivor_vanishing_in_unmasking_next_to_a_dropout_aborts_a_hybrid_round(tmp_path):
    """The hybrid protocol's documented price: no Shamir share rebuilds the ML-KEM half of a
    pair key, so when dev-3 drops before its input and dev-5 (its neighbour, whose input is
    in) vanishes before revealing that half, the round cannot remove dev-3's masks and aborts
    without revealing anything; a classical round survives the same dropouts."""
    vanish = {"dev-3": "share_keys", "dev-5": "masked_input"}
    outcomes = {}
    for pq in (True, False):
        state, rec, stats = secure_round(tmp_path, pq, vanish, target=N - 1)
        outcomes[pq] = rec.committed
        if pq:
            assert not state.params.any()
            assert sum(s.secagg.get("aborted", 0) for s in stats.values()) == N - 2
    assert outcomes == {True: False, False: True}


def test_a_deployment_refuses_hybrid_shares_too_large_for_one_message():
    """A device seals one ML-KEM ciphertext and its shares per neighbour into one ShareKeys
    message, and the aggregator receives nothing above MAX_RECEIVE_BYTES: the complete graph
    of 300 devices fits classically (~106 bytes a neighbour), not hybrid (~1.2 KB); SecAgg+
    neighbourhoods of 1,000 devices fit either way."""
    from shoal.errors import ConfigError

    def cfg(pq: bool, n: int, k: int):
        return load_config(None, {
            "secure_aggregation.enabled": True, "secure_aggregation.post_quantum": pq,
            "secure_aggregation.neighbours": k, "sampling.per_round": n, "data.clients": n,
            "deploy.over_selection": 1.0})

    check_deployable(cfg(False, 300, -1), tls=False)
    check_deployable(cfg(True, 250, -1), tls=False)
    check_deployable(cfg(True, 1000, 0), tls=False)
    with pytest.raises(ConfigError, match="exceed") as exc:
        check_deployable(cfg(True, 300, -1), tls=False)
    assert exc.value.key == "secure_aggregation.neighbours"
