"""SecAgg / SecAgg+ state machines: exact sums under dropouts, aborts below the threshold, the
server's view, tampering and replay, uniformity of masked inputs, and refusal of bad messages."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from scipy import stats

from shoal.errors import ConfigError, ProtocolError, UpdateRejected
from shoal.privacy import shamir
from shoal.privacy.secagg_client import SecAggClient
from shoal.privacy.secagg_driver import SecAggConfig, run_secagg_ring, run_secagg_round
from shoal.privacy.secagg_encoding import FixedPoint, ring_dtype
from shoal.privacy.secagg_graph import harary_graph
from shoal.privacy.secagg_messages import (
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    SecAggAborted,
    SecAggParams,
    ShareDelivery,
    Stage,
    UnmaskingShares,
    UnmaskRequest,
)
from shoal.privacy.secagg_server import SecAggServer

DROP_STAGES = [Stage.SETUP, Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT]


def _vectors(ids, bits, d, seed):
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 1 << bits, d, dtype=ring_dtype(bits)) for i in ids}


def _plain_sum(vectors, ids, bits):
    # arbitrary-precision oracle, independent of the uint wraparound the protocol uses
    total = sum(vectors[i].astype(object) for i in ids) % (1 << bits)
    return np.asarray(total, dtype=np.uint64)


def _expected(ids, nbrs, t, drop_after):
    """Who ends up in the sum, or None if the round must abort (the spec, restated)."""
    u1 = set(ids) - drop_after.get(Stage.SETUP, set())
    u2 = u1 - drop_after.get(Stage.ADVERTISE_KEYS, set())
    u3 = u2 - drop_after.get(Stage.SHARE_KEYS, set())
    u5 = u3 - drop_after.get(Stage.MASKED_INPUT, set())
    needed = u3 | {u for u in u2 - u3 if nbrs[u] & u3}

    def ok(owners, live):
        return bool(live) and all(len(nbrs[u] & live) >= t for u in owners)

    if ok(u1, u1) and ok(u2, u2) and ok(needed, u3) and ok(needed, u5):
        return u3
    return None


def _revealed(inbox):
    b_owners, s_owners = set(), set()
    for msg in inbox:
        if isinstance(msg, UnmaskingShares):
            b_owners |= set(msg.self_mask_shares)
            s_owners |= set(msg.mask_key_shares)
    return b_owners, s_owners


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_sum_is_exact_or_round_aborts_exactly_below_threshold(data: st.DataObject) -> None:
    n = data.draw(st.integers(3, 9), label="n")
    complete = n < 5 or data.draw(st.booleans(), label="complete")
    k = n - 1 if complete else 2 * data.draw(st.integers(1, (n - 2) // 2), label="half")
    t = data.draw(st.integers(2, k), label="t")
    bits = data.draw(st.sampled_from([1, 8, 31, 32, 33, 64]), label="bits")
    d = data.draw(st.integers(1, 12), label="d")
    ids = sorted(data.draw(st.sets(st.integers(0, 10**6), min_size=n, max_size=n), label="ids"))
    fate = {i: data.draw(st.sampled_from([None] * 8 + DROP_STAGES)) for i in ids}
    drop_after = {s: {i for i, f in fate.items() if f is s} for s in DROP_STAGES}
    seed = data.draw(st.binary(min_size=32, max_size=32), label="graph_seed")
    vectors = _vectors(ids, bits, d, data.draw(st.integers(0, 2**32 - 1), label="seed"))
    params = SecAggParams(neighbours=k, threshold=t, bits=bits, length=d)

    g = harary_graph(n, k, seed)
    nbrs = {ids[i]: {ids[j] for j in g.neighbours(i)} for i in range(n)}
    expected = _expected(ids, nbrs, t, drop_after)
    inbox: list = []
    event("aborted" if expected is None else "completed")
    if expected is None:
        with pytest.raises(SecAggAborted):
            run_secagg_ring(vectors, params, drop_after, server_inbox=inbox, graph_seed=seed)
    else:
        total, included = run_secagg_ring(
            vectors, params, drop_after, server_inbox=inbox, graph_seed=seed
        )
        assert included == expected
        np.testing.assert_array_equal(total, _plain_sum(vectors, included, bits))
    # the server never holds both kinds of share of any client
    b_owners, s_owners = _revealed(inbox)
    assert not b_owners & s_owners
    sent_input = {m.sender for m in inbox if isinstance(m, MaskedInput)}
    assert b_owners <= sent_input and not s_owners & sent_input


def _setup_round(ids, k, t, bits=16, d=6, seed=0, session=None):
    params = SecAggParams(neighbours=k, threshold=t, bits=bits, length=d)
    vectors = _vectors(ids, bits, d, seed)
    server = SecAggServer(params, ids, session=session)
    clients = {i: SecAggClient(i, vectors[i]) for i in ids}
    return server, clients, vectors, {i: server.setup() for i in ids}


def _step(server, clients, outgoing, alive=None):
    for cid in sorted(outgoing):
        if alive is None or cid in alive:
            server.receive(clients[cid].handle(outgoing[cid]))
    return server.advance()


def test_complete_and_harary_graphs_recover_dropouts_at_every_stage() -> None:
    ids = list(range(1, 13))
    drop = {Stage.ADVERTISE_KEYS: {2}, Stage.SHARE_KEYS: {5, 9}, Stage.MASKED_INPUT: {11}}
    # t is low enough that no neighbourhood can fall below it, whatever the random graph
    for k, t in ((11, 5), (6, 2)):
        vectors = _vectors(ids, 20, 50, seed=k)
        params = SecAggParams(neighbours=k, threshold=t, bits=20, length=50)
        total, included = run_secagg_ring(vectors, params, drop)
        assert included == set(ids) - {2, 5, 9}
        np.testing.assert_array_equal(total, _plain_sum(vectors, included, 20))


def test_abort_below_threshold_reveals_nothing() -> None:
    ids = [1, 2, 3, 4]
    server, clients, _, out = _setup_round(ids, k=3, t=3)
    out = _step(server, clients, out)
    out = _step(server, clients, out)
    out = _step(server, clients, out)  # all four masked inputs are in
    for cid in (1, 2):  # 3 and 4 vanish before unmasking: only 2 shares per secret
        server.receive(clients[cid].handle(out[cid]))
    with pytest.raises(SecAggAborted) as err:
        server.advance()
    assert err.value.stage is Stage.UNMASKING and err.value.clients
    assert server.stage is Stage.ABORTED
    with pytest.raises(ProtocolError, match="no aggregate"):
        server.aggregate
    with pytest.raises(ProtocolError):
        server.advance()
    with pytest.raises(ProtocolError):
        server.receive(clients[3].handle(out[3]))


def test_corrupted_mask_key_share_aborts_instead_of_a_wrong_sum() -> None:
    ids = [1, 2, 3, 4, 5]
    server, clients, _, out = _setup_round(ids, k=4, t=3)
    out = _step(server, clients, out)
    out = _step(server, clients, out)
    out = _step(server, clients, out, alive={1, 2, 3, 4})  # 5 drops after sharing keys
    replies = {cid: clients[cid].handle(out[cid]) for cid in (1, 2, 3, 4)}
    y = int.from_bytes(replies[2].mask_key_shares[5], "big")
    wrong = ((y + 1) % shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big")
    replies[2] = dataclasses.replace(replies[2], mask_key_shares={5: wrong})
    for r in replies.values():
        server.receive(r)
    with pytest.raises(SecAggAborted, match="unmasking"):
        server.advance()
    assert server.stage is Stage.ABORTED
    with pytest.raises(ProtocolError, match="no aggregate"):
        server.aggregate


def test_abort_early_when_too_few_advertise() -> None:
    ids = [1, 2, 3, 4]
    server, clients, _, out = _setup_round(ids, k=3, t=3)
    with pytest.raises(SecAggAborted, match="fewer than t=3"):
        _step(server, clients, out, alive={1, 2, 3})
    assert isinstance(SecAggAborted("x", stage=Stage.SETUP), ProtocolError)


def test_client_refuses_to_reveal_both_shares_of_one_peer() -> None:
    ids = [1, 2, 3, 4, 5]
    server, clients, _, out = _setup_round(ids, k=4, t=2)
    out = _step(server, clients, out)
    out = _step(server, clients, out)
    out = _step(server, clients, out, alive={1, 2, 3, 4})  # 5 drops after sharing
    honest = out[1]
    assert honest.dropped == {5} and honest.survivors == {2, 3, 4}
    greedy = UnmaskRequest(honest.session, frozenset({2, 3, 4, 5}), frozenset({5}))
    with pytest.raises(ProtocolError, match="both"):
        clients[1].handle(greedy)
    assert clients[1].stage is Stage.MASKED_INPUT  # unchanged: the honest request still works
    reply = clients[1].handle(honest)
    assert set(reply.self_mask_shares) == {2, 3, 4} and set(reply.mask_key_shares) == {5}
    with pytest.raises(ProtocolError, match="cannot accept"):  # no second request
        clients[1].handle(UnmaskRequest(honest.session, frozenset(), frozenset({2})))


def test_tampered_share_is_detected_and_changes_nothing() -> None:
    ids = [1, 2, 3, 4]
    server, clients, _, out = _setup_round(ids, k=3, t=2)
    out = _step(server, clients, out)
    replies = {cid: clients[cid].handle(out[cid]) for cid in ids}
    for r in replies.values():
        server.receive(r)
    out = server.advance()
    good = out[2]
    bad_ct = bytearray(good.ciphertexts[1])
    bad_ct[20] ^= 0x80
    tampered = ShareDelivery(good.session, {**good.ciphertexts, 1: bytes(bad_ct)})
    with pytest.raises(ProtocolError, match="authentication"):
        clients[2].handle(tampered)
    assert clients[2].stage is Stage.SHARE_KEYS
    assert isinstance(clients[2].handle(good), MaskedInput)


def test_share_replayed_to_another_pair_is_detected() -> None:
    ids = [1, 2, 3, 4]
    server, clients, _, out = _setup_round(ids, k=3, t=2)
    out = _step(server, clients, out)
    out = _step(server, clients, out)
    to_2, to_3 = out[2], out[3]
    # 1's share for 2 forwarded to 3 as if 1 had sent it to 3
    with pytest.raises(ProtocolError):
        clients[3].handle(ShareDelivery(to_3.session, {**to_3.ciphertexts, 1: to_2.ciphertexts[1]}))
    # reflection: 1's share for 2 sent back to 1 as if 2 had sent it; the pair key is the same
    # both ways, so only the associated data (sender, recipient) catches this
    to_1 = out[1]
    with pytest.raises(ProtocolError, match="authentication"):
        clients[1].handle(ShareDelivery(to_1.session, {**to_1.ciphertexts, 2: to_2.ciphertexts[1]}))


def test_share_and_messages_replayed_from_another_round_are_detected() -> None:
    ids = [1, 2, 3]
    old_server, old_clients, _, out = _setup_round(ids, k=2, t=2)
    old_keys = _step(old_server, old_clients, out)
    old_delivery = _step(old_server, old_clients, old_keys)
    server, clients, _, out = _setup_round(ids, k=2, t=2)
    with pytest.raises(ProtocolError, match="session"):  # a stale message to the new server
        server.receive(KeyAdvertisement(old_server.session, 1, b"a" * 32, b"b" * 32))
    keys = _step(server, clients, out)
    delivery = _step(server, clients, keys)
    with pytest.raises(ProtocolError, match="session"):  # a stale message to a new client
        clients[2].handle(old_delivery[2])
    stale = old_delivery[2].ciphertexts[1]
    replayed = ShareDelivery(delivery[2].session, {**delivery[2].ciphertexts, 1: stale})
    with pytest.raises(ProtocolError, match="authentication"):
        clients[2].handle(replayed)


def test_masked_input_is_uniform_on_a_small_ring() -> None:
    ids, bits, d = [1, 2, 3], 8, 256 * 100
    params = SecAggParams(neighbours=2, threshold=2, bits=bits, length=d)
    constant = np.full(d, 7, dtype=np.uint32)
    inbox: list = []
    total, _ = run_secagg_ring({i: constant for i in ids}, params, server_inbox=inbox)
    np.testing.assert_array_equal(total, np.full(d, 21))
    masked = [m.masked for m in inbox if isinstance(m, MaskedInput)]
    assert len(masked) == 3
    for y in masked:
        assert stats.chisquare(np.bincount(y, minlength=256)).pvalue > 1e-6
    assert stats.chisquare(np.bincount(constant, minlength=256)).pvalue < 1e-6  # the test can fail
    assert (masked[0] != masked[1]).mean() > 0.9


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(4, 7),
    d=st.integers(1, 10),
    harary=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_weighted_mean_matches_float_mean_within_quantization(n, d, harary, seed) -> None:
    rng = np.random.default_rng(seed)
    enc = FixedPoint(clip=2.0, value_bits=12, max_weight=50)
    config = SecAggConfig(enc, neighbours=2 if harary else None, threshold=2)
    inputs = {i: rng.normal(size=d).astype(np.float32) for i in range(n)}
    weights = {i: int(rng.integers(1, 51)) for i in range(n)}
    drop = {Stage.SHARE_KEYS: {0}} if not harary else {}
    result = run_secagg_round(inputs, weights, config, drop, rng)
    inc = sorted(result.included)
    assert inc == [i for i in range(n) if i not in drop.get(Stage.SHARE_KEYS, ())]
    w = np.array([weights[i] for i in inc])
    x = np.clip(np.array([inputs[i] for i in inc], dtype=np.float64), -2.0, 2.0)
    assert result.total_weight == w.sum()
    assert np.abs(result.mean - (w[:, None] * x).sum(0) / w.sum()).max() <= enc.step * (1 + 1e-9)


def test_server_refuses_out_of_order_duplicate_unknown_and_malformed() -> None:
    ids = [10, 20, 30, 40]
    server, clients, vectors, out = _setup_round(ids, k=3, t=2, bits=16, d=5)
    adverts = {cid: clients[cid].handle(out[cid]) for cid in ids}
    with pytest.raises(ProtocolError, match="cannot accept"):
        server.receive(EncryptedShares(server.session, 10, {}))
    server.receive(adverts[10])
    with pytest.raises(ProtocolError, match="duplicate"):
        server.receive(adverts[10])
    with pytest.raises(ProtocolError, match="unknown client"):
        server.receive(dataclasses.replace(adverts[20], sender=99))
    for cid in (20, 30):
        server.receive(adverts[cid])
    keys = server.advance()  # 40 missed the deadline
    with pytest.raises(ProtocolError, match="cannot accept"):  # late advertisement
        server.receive(adverts[40])
    shares = {cid: clients[cid].handle(keys[cid]) for cid in (10, 20, 30)}
    with pytest.raises(ProtocolError, match="recipient set"):
        server.receive(dataclasses.replace(shares[10], ciphertexts={}))
    for r in shares.values():
        server.receive(r)
    delivery = server.advance()
    masked = {cid: clients[cid].handle(delivery[cid]) for cid in (10, 20, 30)}
    with pytest.raises(ProtocolError, match="may not send"):  # 40 never shared keys
        server.receive(MaskedInput(server.session, 40, vectors[40]))
    with pytest.raises(ProtocolError, match="uint32"):
        server.receive(dataclasses.replace(masked[10], masked=masked[10].masked[:-1]))
    too_big = masked[10].masked.copy()
    too_big[0] = 1 << 16
    with pytest.raises(ProtocolError, match="outside"):
        server.receive(dataclasses.replace(masked[10], masked=too_big))
    for r in masked.values():
        server.receive(r)
    requests = server.advance()
    replies = {cid: clients[cid].handle(requests[cid]) for cid in (10, 20, 30)}
    extra = dict(replies[10].self_mask_shares)
    extra[40] = next(iter(extra.values()))
    with pytest.raises(ProtocolError, match="do not match"):
        server.receive(dataclasses.replace(replies[10], self_mask_shares=extra))
    for r in replies.values():
        server.receive(r)
    assert server.advance() == {}
    # every refusal above left the round intact
    np.testing.assert_array_equal(server.aggregate, _plain_sum(vectors, [10, 20, 30], 16))
    assert server.included == {10, 20, 30}


def test_client_refuses_out_of_order_duplicate_and_foreign_messages() -> None:
    ids = list(range(8))
    server, clients, _, out = _setup_round(ids, k=2, t=2)
    with pytest.raises(ProtocolError, match="cannot accept"):
        clients[0].handle(UnmaskRequest(server.session, frozenset(), frozenset()))
    clients[0].handle(out[0])
    with pytest.raises(ProtocolError, match="cannot accept"):  # a second setup: keys are per round
        clients[0].handle(out[0])
    for cid in ids[1:]:
        server.receive(clients[cid].handle(out[cid]))
    server.receive(KeyAdvertisement(server.session, 0, b"\x01" * 32, b"\x02" * 32))
    keys = server.advance()
    directory = keys[0]
    outsider = next(i for i in ids if i not in directory.keys and i != 0)
    fake_keys = (b"\x03" * 32, b"\x04" * 32)
    forged = dataclasses.replace(directory, keys={**directory.keys, outsider: fake_keys})
    with pytest.raises(ProtocolError, match="non-neighbours"):
        clients[0].handle(forged)
    stranger = SecAggClient(1000, np.zeros(6, dtype=np.uint32))
    with pytest.raises(ProtocolError, match="not on the roster"):
        stranger.handle(out[0])


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_any_delivery_order_with_duplicates_and_stale_messages(data: st.DataObject) -> None:
    n = data.draw(st.integers(4, 7), label="n")
    ids = list(range(100, 100 + n))
    server, clients, vectors, out = _setup_round(ids, k=n - 1, t=2, bits=12, d=4)
    previous: list = []
    for _ in range(4):
        order = data.draw(st.permutations(sorted(out)), label="order")
        replies = [clients[cid].handle(out[cid]) for cid in order]
        delivered: list = []
        for reply in replies:
            server.receive(reply)
            delivered.append(reply)
            if data.draw(st.booleans(), label="inject"):
                junk = data.draw(st.sampled_from(delivered + previous), label="junk")
                with pytest.raises(ProtocolError):
                    server.receive(junk)  # a duplicate, or a late message from the last stage
        previous = delivered
        out = server.advance()
    np.testing.assert_array_equal(server.aggregate, _plain_sum(vectors, ids, 12))


def test_round_driver_refuses_ragged_inputs_and_missing_weights() -> None:
    config = SecAggConfig(FixedPoint(clip=1.0, max_weight=5))
    rng = np.random.default_rng(0)
    with pytest.raises(UpdateRejected, match="1-D"):
        run_secagg_round({0: np.zeros(3), 1: np.zeros(4), 2: np.zeros(3)}, None, config, None, rng)
    with pytest.raises(ConfigError, match="weights"):
        run_secagg_round({i: np.zeros(3) for i in range(3)}, {0: 1, 1: 1}, config, None, rng)
    result = run_secagg_round({i: np.full(3, 0.5) for i in range(3)}, None, config, None, rng)
    np.testing.assert_allclose(result.mean, 0.5, atol=config.encoding.step)
    assert result.total_weight == 3 and result.included == {0, 1, 2}
