"""Primitives under secure aggregation: key agreement, AEAD, PRG, Shamir, Harary graphs, the
SecAgg+ parameter finder and the fixed-point encoding -- each against an independent oracle
(RFC vectors, hand computations, Google's published parameter table, scipy)."""

from __future__ import annotations

import itertools
from collections import Counter, deque

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from shoal.errors import ConfigError, ProtocolError, UpdateRejected
from shoal.privacy import crypto, shamir
from shoal.privacy.secagg_encoding import FixedPoint, ring_dtype
from shoal.privacy.secagg_graph import harary_graph, hypergeometric_pmf, secagg_parameters

# RFC 7748 §6.1
ALICE_SK = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PK = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_SK = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PK = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED_K = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


# --- key agreement and HKDF ------------------------------------------------------------------


def test_hkdf_matches_rfc5869_case_1() -> None:
    okm = crypto.derive_key(
        bytes([0x0B] * 22), salt=bytes(range(13)), info=bytes(range(0xF0, 0xFA))
    )
    # RFC 5869 A.1 OKM (42 bytes); HKDF output is a prefix-stable stream, so 32 bytes = prefix
    assert okm.hex() == "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"


def test_x25519_matches_rfc7748_and_is_symmetric() -> None:
    assert crypto.public_key_from_private(ALICE_SK) == ALICE_PK
    assert crypto.public_key_from_private(BOB_SK) == BOB_PK
    salt, info = b"session-nonce-16", b"shoal secagg test"
    ab = crypto.agree(ALICE_SK, BOB_PK, salt=salt, info=info)
    assert ab == crypto.agree(BOB_SK, ALICE_PK, salt=salt, info=info)
    assert ab == crypto.derive_key(SHARED_K, salt=salt, info=info)


def test_agreement_is_domain_separated_by_info_and_salt() -> None:
    base = crypto.agree(ALICE_SK, BOB_PK, salt=b"s" * 16, info=b"shoal secagg enc")
    assert base != crypto.agree(ALICE_SK, BOB_PK, salt=b"s" * 16, info=b"shoal secagg mask")
    assert base != crypto.agree(ALICE_SK, BOB_PK, salt=b"t" * 16, info=b"shoal secagg enc")


def test_agreement_refuses_low_order_and_malformed_keys() -> None:
    with pytest.raises(ProtocolError):
        crypto.agree(ALICE_SK, bytes(32), salt=b"", info=b"")  # all-zero shared secret
    with pytest.raises(ProtocolError, match="32 bytes"):
        crypto.agree(ALICE_SK, BOB_PK[:31], salt=b"", info=b"")


def test_fresh_keypairs_are_distinct_and_consistent() -> None:
    a, b = crypto.generate_keypair(), crypto.generate_keypair()
    assert a.public != b.public
    assert crypto.public_key_from_private(a.private) == a.public
    assert a.private.hex() not in repr(a)


# --- authenticated encryption ----------------------------------------------------------------


def test_aead_round_trip_and_tamper_detection() -> None:
    key, ad, msg = crypto.random_bytes(32), b"session|1|2", b"two shamir shares" * 4
    ct = crypto.encrypt(key, msg, ad)
    assert len(ct) == crypto.NONCE_BYTES + len(msg) + crypto.TAG_BYTES
    assert crypto.decrypt(key, ct, ad) == msg
    assert crypto.encrypt(key, msg, ad) != ct  # random nonce
    for pos in (0, crypto.NONCE_BYTES, len(ct) - 1):  # nonce, body, tag
        bad = bytearray(ct)
        bad[pos] ^= 0x01
        with pytest.raises(ProtocolError, match="authentication"):
            crypto.decrypt(key, bytes(bad), ad)
    with pytest.raises(ProtocolError, match="authentication"):
        crypto.decrypt(key, ct, b"session|1|3")  # re-addressed
    with pytest.raises(ProtocolError, match="authentication"):
        crypto.decrypt(crypto.random_bytes(32), ct, ad)
    with pytest.raises(ProtocolError, match="shorter"):
        crypto.decrypt(key, ct[:20], ad)


# --- PRG ---------------------------------------------------------------------------------------


def test_keystream_is_aes_ctr_from_counter_zero() -> None:
    seed = bytes(range(32))
    out = crypto.keystream_into(seed, np.empty(10, dtype=np.uint32))  # 40 bytes, 3 blocks
    counters = b"".join(i.to_bytes(16, "big") for i in range(3))
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor().update(counters)
    assert out.tobytes() == ecb[:40]


def test_prg_is_deterministic_in_range_and_seed_dependent() -> None:
    s1, s2 = crypto.random_bytes(32), crypto.random_bytes(32)
    a = crypto.prg_uint(s1, 1000, 13)
    assert a.dtype == np.uint32 and a.max() < 2**13
    np.testing.assert_array_equal(a, crypto.prg_uint(s1, 1000, 13))
    assert (a != crypto.prg_uint(s2, 1000, 13)).mean() > 0.99
    assert crypto.prg_uint(s1, 10, 40).dtype == np.uint64
    # the low bits of a longer stream are the same stream (reduction is a bit mask)
    np.testing.assert_array_equal(crypto.prg_uint(s1, 1000, 32) & (2**13 - 1), a)


def test_prg_is_uniform_on_a_small_ring() -> None:
    x = crypto.prg_uint(crypto.random_bytes(32), 256 * 200, 8)
    counts = np.bincount(x, minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-6


# --- Shamir ------------------------------------------------------------------------------------


def test_shamir_hand_example() -> None:
    # f(x) = 1234 + 166 x + 94 x^2 mod 1613, evaluated by hand at x = 1..6
    shares = shamir.split_int(1234, 3, range(1, 7), prime=1613, coefficients=[166, 94])
    assert [s.y for s in shares] == [1494, 329, 965, 176, 1188, 775]
    for subset in itertools.combinations(shares, 3):
        assert shamir.interpolate_at_zero(subset, prime=1613) == 1234


def test_t_minus_one_shares_are_equally_consistent_with_every_secret() -> None:
    # Exhaustive on GF(13), t = 3: for each secret, the 169 polynomials map onto the 169 possible
    # pairs of shares bijectively, so 2 shares are equally likely under every secret.
    p, xs = 13, [2, 5, 9]
    for secret in range(p):
        seen = Counter(
            tuple(s.y for s in shamir.split_int(secret, 3, xs, prime=p, coefficients=c)[:2])
            for c in itertools.product(range(p), repeat=2)
        )
        assert len(seen) == p * p and set(seen.values()) == {1}


@settings(max_examples=25, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    t=st.integers(2, 6),
    extra=st.integers(0, 3),
    data=st.data(),
)
def test_shamir_reconstructs_with_t_shares_and_not_with_fewer(
    secret: bytes, t: int, extra: int, data: st.DataObject
) -> None:
    m = t + extra
    xs = data.draw(st.lists(st.integers(1, 1000), min_size=m, max_size=m, unique=True))
    shares = shamir.split_secret(secret, t, xs)
    subset = data.draw(st.permutations(shares)).copy()[:t]
    assert shamir.combine_shares(subset, t) == secret
    assert shamir.combine_shares(shares, t) == secret
    few = subset[: t - 1]
    with pytest.raises(ProtocolError, match=f"need {t} shares"):
        shamir.combine_shares(few, t)
    # interpolating t-1 shares gives an unrelated value ...
    assert shamir.interpolate_at_zero(few) != int.from_bytes(secret, "big")
    # ... and the same t-1 shares, plus one more point, reconstruct any other secret: the
    # degree-(t-1) polynomial through (0, other) and the t-1 shares supplies that point
    other = (int.from_bytes(secret, "big") + 1) % shamir.PRIME
    x_new = max(xs) + 1
    y_new = _lagrange_eval([(0, other), *((s.x, s.y) for s in few)], x_new, shamir.PRIME)
    assert shamir.interpolate_at_zero([*few, shamir.Share(x_new, y_new)]) == other


def _lagrange_eval(points: list[tuple[int, int]], x: int, p: int) -> int:
    total = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num, den = num * (x - xj) % p, den * (xi - xj) % p
        total += yi * num * pow(den, -1, p)
    return total % p


def test_share_serialisation_and_conflicts() -> None:
    (a, b) = shamir.split_secret(bytes(32), 2, [3, 7])
    assert shamir.Share.from_y_bytes(3, a.y_bytes()) == a
    with pytest.raises(ProtocolError):
        shamir.Share.from_y_bytes(3, a.y_bytes()[1:])
    with pytest.raises(ProtocolError, match="not reduced"):
        shamir.Share.from_y_bytes(3, (shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big"))
    with pytest.raises(ProtocolError, match="two different"):
        shamir.combine_shares([a, shamir.Share(3, a.y + 1), b], 2)
    with pytest.raises(ProtocolError, match="distinct"):
        shamir.split_secret(bytes(32), 2, [1, 1])


@pytest.mark.parametrize(("call", "bound"), [
    (lambda: shamir.split_secret(bytes(31), 2, [1, 2]), "32 bytes"),
    (lambda: shamir.split_secret(bytes(32), 3, [1, 2]), r"threshold must be in \[1, 2\]"),
    (lambda: shamir.split_secret(bytes(32), 0, [1, 2]), r"threshold must be in \[1, 2\]"),
    (lambda: shamir.split_int(shamir.PRIME, 1, [1]), r"\[0, prime\)"),
    (lambda: shamir.split_int(5, 3, [1, 2, 3], coefficients=[1]), "threshold - 1 = 2"),
    (lambda: shamir.split_secret(bytes(32), 1, [0]), r"\[1, prime\)"),
    (lambda: crypto.prg_uint(bytes(32), 4, 65), r"bits must be in \[1, 64\]"),
    (lambda: crypto.prg_uint(bytes(32), -1, 8), "length must be >= 0"),
])
def test_out_of_range_arguments_are_protocol_errors_naming_the_bound(call, bound) -> None:
    with pytest.raises(ProtocolError, match=bound):
        call()


# --- Harary graph ------------------------------------------------------------------------------


def test_harary_identity_matches_fcp_example() -> None:
    # FCP's example (degree 5 incl. self, 10 nodes): 0 -> {8, 9, 0, 1, 2}
    g = harary_graph(10, 4, None)
    assert g.neighbours(0) == (1, 2, 8, 9)
    assert g.neighbours(5) == (3, 4, 6, 7)


def _connected(g) -> bool:
    seen, todo = {0}, deque([0])
    while todo:
        for j in g.neighbours(todo.popleft()):
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == g.n


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 40), half=st.integers(1, 19), seed=st.binary(min_size=32, max_size=32))
def test_random_harary_graph_is_regular_symmetric_connected(n: int, half: int, seed: bytes) -> None:
    k = min(2 * half, n - 1)
    g = harary_graph(n, k, seed)
    nbrs = [set(g.neighbours(i)) for i in range(n)]
    assert all(len(s) == k and i not in s for i, s in enumerate(nbrs))
    assert all(i in nbrs[j] for i in range(n) for j in nbrs[i])
    assert _connected(g)
    assert sorted(g.order.tolist()) == list(range(n))
    np.testing.assert_array_equal(harary_graph(n, k, bytes(seed)).order, g.order)


def test_graph_seed_changes_the_labelling_and_bad_degrees_are_refused() -> None:
    a = harary_graph(30, 4, b"\x01" * 32)
    b = harary_graph(30, 4, b"\x02" * 32)
    assert not np.array_equal(a.order, b.order)
    assert harary_graph(6, 5, b"\x01" * 32).complete
    with pytest.raises(ConfigError, match="even"):
        harary_graph(10, 3, None)
    with pytest.raises(ConfigError, match="n-1"):
        harary_graph(10, 10, None)


# --- parameter finder --------------------------------------------------------------------------

# google/federated-compute graph_parameter_finder_test.cc, the finder for Bell et al. (CCS 2020)
# (docs/references.md, section "SecAgg neighbourhoods")
FCP_TABLE = [
    (100, 0.05, 0.05, "semi-honest", 12, 6),
    (1000, 0.05, 0.05, "semi-honest", 30, 17),
    (10_000, 0.05, 0.05, "semi-honest", 34, 20),
    (1_000_000, 0.05, 0.05, "semi-honest", 38, 22),
    (1000, 0.05, 0.05, "semi-malicious", 52, 37),
    (100, 0.33, 0.05, "semi-honest", 34, 29),
    (1000, 0.33, 0.05, "semi-honest", 78, 60),
    (100_000, 0.33, 0.05, "semi-honest", 102, 77),
    (1000, 0.05, 0.33, "semi-honest", 72, 24),
    (1000, 0.33, 0.33, "semi-honest", 286, 150),
    (1_000_000, 0.33, 0.33, "semi-honest", 518, 270),
    (1000, 0.45, 0.45, "semi-honest", 822, 417),
    (1000, 0.3, 0.3, "semi-malicious", 872, 584),
]


@pytest.mark.parametrize(("n", "corrupt", "dropout", "adversary", "k", "t"), FCP_TABLE)
def test_parameters_reproduce_fcp_table(n, corrupt, dropout, adversary, k, t) -> None:
    assert secagg_parameters(n, dropout, corrupt, adversary=adversary) == (k, t)


def test_parameter_finder_infeasible_and_small_populations() -> None:
    with pytest.raises(ConfigError, match="0.9"):
        secagg_parameters(1000, 0.5, 0.5)
    with pytest.raises(ConfigError):
        secagg_parameters(1, 0.0, 0.0)
    assert secagg_parameters(3, 0.0, 0.0) == (2, 2)  # complete graph fallback
    for n in (5, 20, 50):
        k, t = secagg_parameters(n, 0.1, 0.05)
        assert 2 <= t <= k <= n - 1 and (k % 2 == 0 or k == n - 1)


@pytest.mark.parametrize(
    ("total", "marked", "sampled"), [(100, 5, 12), (1000, 950, 30), (50, 30, 49)]
)
def test_hypergeometric_matches_scipy(total: int, marked: int, sampled: int) -> None:
    lo, p = hypergeometric_pmf(total, marked, sampled)
    x = np.arange(lo, lo + len(p))
    oracle = stats.hypergeom(total, marked, sampled).pmf(x)
    np.testing.assert_allclose(p, oracle, rtol=1e-9, atol=1e-300)


# --- fixed-point encoding ----------------------------------------------------------------------


def test_ring_bits_cover_the_sum() -> None:
    # 1000 * 65535 = 65,535,000 < 2^26; 100 * 1000 * 65535 = 6,553,500,000 in [2^32, 2^33)
    assert FixedPoint(clip=1.0, value_bits=16).ring_bits(1000) == 26
    assert FixedPoint(clip=1.0, value_bits=16, max_weight=1000).ring_bits(100) == 33
    assert ring_dtype(32) is np.uint32 and ring_dtype(33) is np.uint64
    with pytest.raises(ConfigError, match="64"):
        FixedPoint(clip=1.0, value_bits=40, max_weight=2**20).ring_bits(2**10)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 30),
    clip=st.floats(0.01, 100.0),
    value_bits=st.integers(4, 24),
    seed=st.integers(0, 2**32 - 1),
)
def test_fixed_point_weighted_mean_within_one_step(n, d, clip, value_bits, seed) -> None:
    rng = np.random.default_rng(seed)
    enc = FixedPoint(clip=clip, value_bits=value_bits, max_weight=500)
    bits = enc.ring_bits(n)
    xs = rng.normal(scale=clip, size=(n, d))
    ws = rng.integers(1, 501, size=n)
    total = np.zeros(d + 1, dtype=ring_dtype(bits))
    for x, w in zip(xs, ws):
        total += enc.encode(x, int(w), bits, rng)
    total &= ring_dtype(bits)((1 << bits) - 1)
    mean, weight = enc.decode(total)
    expected = (ws[:, None] * np.clip(xs, -clip, clip)).sum(0) / ws.sum()
    assert weight == ws.sum()
    assert np.abs(mean - expected).max() <= enc.step * (1 + 1e-9)


def test_stochastic_rounding_is_unbiased() -> None:
    enc = FixedPoint(clip=1.0, value_bits=3)  # coarse grid: step 2/7
    rng = np.random.default_rng(0)
    x = np.full(200_000, 0.1)
    q = enc.encode(x, 1, enc.ring_bits(1), rng)[:-1]
    decoded = q * enc.step - 1.0
    # 0.1 lies between grid points 3 and 4; only those two are ever produced
    np.testing.assert_allclose(np.unique(decoded), [-1 + 3 * enc.step, -1 + 4 * enc.step])
    assert abs(decoded.mean() - 0.1) < 4 * enc.step / np.sqrt(len(x))


def test_encoding_refuses_bad_input() -> None:
    enc = FixedPoint(clip=1.0, max_weight=10)
    rng = np.random.default_rng(0)
    with pytest.raises(UpdateRejected, match="non_finite"):
        enc.encode(np.array([0.0, np.nan]), 1, 32, rng)
    with pytest.raises(ConfigError, match="weight"):
        enc.encode(np.zeros(3), 11, 32, rng)
    with pytest.raises(ConfigError, match="clip"):
        FixedPoint(clip=0.0)
