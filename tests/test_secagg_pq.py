"""Post-quantum hybrid SecAgg+: X25519 and ML-KEM-768 pairwise keys.

What must hold: the same sums as classical SecAgg+ under dropouts; every pairwise mask depends
on the KEM secret (knowing every X25519 secret no longer unmasks an input, while it does in a
classical round: the oracle is the client's own input); and the cost of the dropout rule that
hybrid keys bring (a survivor vanishing during unmasking next to a dropped client aborts)."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.errors import ProtocolError
from shoal.privacy import crypto
from shoal.privacy.secagg_client import SecAggClient
from shoal.privacy.secagg_driver import SecAggConfig, run_secagg_ring, run_secagg_round
from shoal.privacy.secagg_encoding import FixedPoint, ring_mask
from shoal.privacy.secagg_messages import (KeyAdvertisement, SecAggAborted, SecAggParams, Stage,
                                           UnmaskingShares)
from shoal.privacy.secagg_server import SecAggServer
from shoal.privacy.secagg_session import MASK_INFO, pair_bytes, share_ciphertext_bytes

ENC = FixedPoint(clip=1.0, value_bits=16, max_weight=8)


def inputs(n: int, d: int = 40):
    rng = np.random.default_rng(3)
    return {i: rng.uniform(-1, 1, d) for i in range(n)}


@pytest.mark.parametrize("drop", [None, Stage.SETUP, Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS,
                                  Stage.MASKED_INPUT])
def test_hybrid_rounds_sum_exactly_what_classical_rounds_sum(drop):
    xs = inputs(9)
    w = {i: 1 + i % 4 for i in xs}
    out = {}
    for pq in (False, True):
        cfg = SecAggConfig(ENC, None, 5, post_quantum=pq)
        res = run_secagg_round(xs, w, cfg, {drop: {2, 6}} if drop else None,
                               np.random.default_rng(1))  # same quantization either way
        out[pq] = res
    assert out[True].included == out[False].included
    np.testing.assert_array_equal(out[True].mean, out[False].mean)  # the ring sum is exact


def test_messages_carry_the_kem_key_and_ciphertexts():
    inbox: list = []
    cfg = SecAggConfig(ENC, None, 3, post_quantum=True)
    run_secagg_round(inputs(5), None, cfg, None, np.random.default_rng(0), server_inbox=inbox)
    adverts = [m for m in inbox if isinstance(m, KeyAdvertisement)]
    assert len(adverts) == 5 and all(len(a.kem_public) == crypto.KEM_PUBLIC_BYTES
                                     for a in adverts)
    params = cfg.params_for(5, 40)
    size = share_ciphertext_bytes(params)
    assert size == share_ciphertext_bytes(SecAggConfig(ENC).params_for(5, 40)) \
        + crypto.KEM_CIPHERTEXT_BYTES
    shares = [m for m in inbox if type(m).__name__ == "EncryptedShares"]
    assert all(len(ct) == size for m in shares for ct in m.ciphertexts.values())


def _run_keeping_secrets(pq: bool, n: int = 4, d: int = 16):
    """A round driven by hand, keeping each client's X25519 mask key and self-mask seed (read
    before the machine wipes them) and its masked input."""
    params = SecAggParams(neighbours=n - 1, threshold=2, bits=20, length=d, post_quantum=pq)
    rng = np.random.default_rng(5)
    x = {i: rng.integers(0, 2**20, d, dtype=np.uint64).astype(np.uint32) for i in range(n)}
    server = SecAggServer(params, range(n))
    clients = {i: SecAggClient(i, x[i]) for i in range(n)}
    outgoing = {i: server.setup() for i in clients}
    secrets: dict[int, tuple[bytes, bytes, bytes]] = {}
    masked = {}
    for _ in range(4):
        for i in sorted(outgoing):
            c = clients[i]
            if c.stage is Stage.SHARE_KEYS:
                secrets[i] = (c._mask_key.private, c._self_seed, c._mask_key.public)
            reply = c.handle(outgoing[i])
            if type(reply).__name__ == "MaskedInput":
                masked[i] = reply.masked
            server.receive(reply)
        outgoing = server.advance()
    return params, x, secrets, masked, server


@pytest.mark.parametrize("pq", [False, True])
def test_only_the_hybrid_round_resists_an_adversary_holding_every_x25519_secret(pq):
    params, x, secrets, masked, server = _run_keeping_secrets(pq)
    u = 0
    session = server.session
    y = masked[u].astype(np.uint64)
    y -= crypto.prg_uint(secrets[u][1], params.length, params.bits)  # the self-mask
    for v in secrets:
        if v == u:
            continue
        seed = crypto.agree(secrets[u][0], secrets[v][2], salt=session,
                            info=MASK_INFO + pair_bytes(u, v))
        mask = crypto.prg_uint(seed, params.length, params.bits).astype(np.uint64)
        y = y - mask if u > v else y + mask
    recovered = (y & np.uint64(ring_mask(params.bits))).astype(np.uint32)
    # classical: X25519 secrets unmask the input; hybrid: they do not (ML-KEM still holds)
    assert np.array_equal(recovered, x[u]) is (not pq)
    assert server.stage is Stage.DONE  # and the round itself unmasked the sum either way


def test_a_survivor_vanishing_during_unmasking_next_to_a_dropout_aborts_only_hybrid_rounds():
    vecs = {i: np.full(8, i + 1, dtype=np.uint32) for i in range(6)}
    drops = {Stage.SHARE_KEYS: {1}, Stage.MASKED_INPUT: {4}}  # 4 is in, but never unmasks
    classical = SecAggParams(neighbours=5, threshold=3, bits=20, length=8)
    total, included = run_secagg_ring(vecs, classical, drops)
    assert included == frozenset({0, 2, 3, 4, 5})
    assert total.tolist() == [sum(i + 1 for i in included)] * 8
    hybrid = SecAggParams(neighbours=5, threshold=3, bits=20, length=8, post_quantum=True)
    with pytest.raises(SecAggAborted, match="post-quantum pair key"):
        run_secagg_ring(vecs, hybrid, drops)


def test_malformed_hybrid_messages_are_refused():
    params = SecAggParams(neighbours=2, threshold=2, bits=16, length=4, post_quantum=True)
    server = SecAggServer(params, range(3))
    session = server.session
    kp = crypto.generate_keypair()
    with pytest.raises(ProtocolError, match="ML-KEM"):
        server.receive(KeyAdvertisement(session, 0, kp.public, crypto.generate_keypair().public))
    classical = SecAggServer(SecAggParams(neighbours=2, threshold=2, bits=16, length=4),
                             range(3))
    with pytest.raises(ProtocolError, match="not post-quantum"):
        classical.receive(KeyAdvertisement(classical.session, 0, kp.public,
                                           crypto.generate_keypair().public,
                                           crypto.kem_keypair().public))
    with pytest.raises(ProtocolError):
        crypto.kem_encapsulate(b"\0" * 10)


def test_hybrid_unmasking_replies_must_carry_exactly_the_dropped_pair_keys():
    vecs = {i: np.full(4, 1, dtype=np.uint32) for i in range(4)}
    params = SecAggParams(neighbours=3, threshold=2, bits=16, length=4, post_quantum=True)
    inbox: list = []
    run_secagg_ring(vecs, params, {Stage.SHARE_KEYS: {3}}, server_inbox=inbox)
    replies = [m for m in inbox if isinstance(m, UnmaskingShares)]
    assert replies and all(set(r.pair_kem_keys) == {3} for r in replies)
    assert all(len(k) == 32 for r in replies for k in r.pair_kem_keys.values())
