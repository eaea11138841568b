"""Error feedback (client state across rounds) and delta-encoded model downloads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.codec import (
    Chain,
    Download,
    ErrorFeedback,
    Float16,
    ModelHistory,
    RandomK,
    Sign,
    StochasticQuantize,
    TopK,
    Zstd,
    decode_download,
    download_from_bytes,
    download_to_bytes,
    encode_download,
    feedback_step,
    to_bytes,
)
from shoal.errors import CodecError, ConfigError

EF_CHAINS = [
    Chain([TopK(fraction=0.05)]),
    Chain([TopK(k=3), StochasticQuantize(bits=4, block=8), Zstd()]),
    Chain([Sign()]),
    Chain([RandomK(fraction=0.2)]),
    Chain([StochasticQuantize(bits=2, block=16)]),
]


# --- error feedback ----------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    chain_i=st.integers(0, len(EF_CHAINS) - 1),
    d=st.integers(1, 120),
    rounds=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_error_feedback_conserves_mass(chain_i: int, d: int, rounds: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ef = ErrorFeedback(EF_CHAINS[chain_i])
    total_x = np.zeros(d)
    total_sent = np.zeros(d)
    for _ in range(rounds):
        x = (rng.standard_normal(d) * rng.uniform(0.01, 10)).astype(np.float32)
        total_x += x
        total_sent += ef.decode(ef.encode(x, rng))
    residual = ef.residual
    assert residual is not None and residual.dtype == np.float32
    scale = max(1.0, float(np.abs(total_x).max()), float(np.abs(total_sent).max()))
    assert np.allclose(total_sent + residual, total_x, rtol=0, atol=1e-5 * scale * rounds)


def test_ef_signsgd_by_hand() -> None:
    x1 = np.array([1.0, -3.0, 0.5, 0.0], np.float32)
    x2 = np.array([0.5, 1.0, -1.0, 2.0], np.float32)
    ef, rng = ErrorFeedback(Chain([Sign()])), np.random.default_rng(0)
    sent1 = ef.decode(ef.encode(x1, rng))
    assert np.allclose(sent1, [1.125, -1.125, 1.125, 1.125])  # ‖x1‖₁/4 = 1.125; sign(0) → +
    e1 = x1 - sent1
    assert np.allclose(ef.residual, e1)
    p2 = x2 + e1  # [0.375, -0.875, -1.625, 0.875]
    sent2 = ef.decode(ef.encode(x2, rng))
    assert np.allclose(sent2, np.abs(p2).mean() * np.sign(p2))
    assert np.allclose(ef.residual, p2 - sent2)


def test_lossless_chain_leaves_no_residual() -> None:
    ef = ErrorFeedback(Chain([Zstd()]))
    x = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    ef.encode(x, np.random.default_rng(1))
    assert np.array_equal(ef.residual, np.zeros(50, np.float32))


def test_state_persists_and_restores_exactly() -> None:
    chain = Chain([TopK(k=4), StochasticQuantize(bits=4, block=8)])
    xs = np.random.default_rng(2).standard_normal((4, 30)).astype(np.float32)
    live = ErrorFeedback(chain)
    for t in range(2):
        live.encode(xs[t], np.random.default_rng(t))
    saved = live.state()
    restored = ErrorFeedback(Chain.from_spec(saved["chain"]))
    restored.load_state({"chain": saved["chain"], "residual": np.array(saved["residual"])})
    for t in range(2, 4):
        a = live.decode(live.encode(xs[t], np.random.default_rng(t)))
        b = restored.decode(restored.encode(xs[t], np.random.default_rng(t)))
        assert np.array_equal(a, b)
    assert np.array_equal(live.residual, restored.residual)


def test_state_is_checked() -> None:
    ef = ErrorFeedback(Chain([Sign()]))
    with pytest.raises(CodecError, match="chain"):
        ef.load_state({"chain": Chain([Float16()]).spec, "residual": None})
    with pytest.raises(CodecError, match="chain"):
        ef.load_state({"chain": [["sign", {"block": 3}]], "residual": None})
    with pytest.raises(CodecError, match="chain"):
        ef.load_state({"residual": None})
    with pytest.raises(CodecError, match="non-finite"):
        ef.load_state({"chain": ef.chain.spec, "residual": np.array([np.nan], np.float32)})
    with pytest.raises(CodecError, match="float32"):
        ef.load_state({"chain": ef.chain.spec, "residual": [1.0]})
    ef.load_state({"chain": ef.chain.spec, "residual": np.ones(3, np.float32)})
    with pytest.raises(CodecError, match="residual has 3 entries"):
        ef.encode(np.ones(4, np.float32), np.random.default_rng(0))


def test_failed_encode_keeps_the_residual() -> None:
    ef = ErrorFeedback(Chain([TopK(k=1)]))
    ef.encode(np.array([1.0, 2.0], np.float32), np.random.default_rng(0))
    before = ef.residual
    with pytest.raises(CodecError):
        ef.encode(np.array([np.inf, 0.0], np.float32), np.random.default_rng(0))
    assert np.array_equal(ef.residual, before)
    ef.reset()
    assert ef.residual is None


def test_feedback_step_is_pure() -> None:
    chain = Chain([TopK(k=1)])
    residual = np.array([0.5, 0.0], np.float32)
    x = np.array([0.1, 1.0], np.float32)
    before = (residual.copy(), x.copy())
    enc, new = feedback_step(chain, residual, x, np.random.default_rng(0))
    assert np.array_equal(residual, before[0]) and np.array_equal(x, before[1])
    assert np.allclose(chain.decode(enc), [0.0, 1.0]) and np.allclose(new, [0.6, 0.0])


# --- delta downloads ---------------------------------------------------------------------


def models(d: int = 64, n: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    out = [rng.standard_normal(d).astype(np.float32)]
    for _ in range(n - 1):
        out.append((out[-1] + 0.01 * rng.standard_normal(d)).astype(np.float32))
    return out


def test_delta_round_trip_is_exact_up_to_float_rounding() -> None:
    ms = models()
    dl = encode_download(ms[5], 5, (3, ms[3]), Chain([Zstd()]), max_staleness=2, rng=np.random.default_rng(0))
    assert dl.is_delta and dl.base_version == 3 and dl.version == 5
    got = decode_download(dl, (3, ms[3]))
    assert np.all(np.abs(got - ms[5]) <= np.spacing(np.maximum(np.abs(ms[5]), np.abs(ms[3]))))
    again = decode_download(download_from_bytes(download_to_bytes(dl), max_elements=64), (3, ms[3]))
    assert np.array_equal(again, got)


def test_delta_compresses_better_than_full() -> None:
    ms = models(d=4096)
    rng = np.random.default_rng(0)
    chain = Chain([StochasticQuantize(bits=8), Zstd()])
    full = encode_download(ms[1], 1, None, chain, 3, rng=rng)
    delta = encode_download(ms[1], 1, (0, ms[0]), chain, 3, rng=rng)
    assert not full.is_delta and delta.is_delta
    err_full = np.abs(decode_download(full, None) - ms[1]).max()
    err_delta = np.abs(decode_download(delta, (0, ms[0])) - ms[1]).max()
    assert err_delta < err_full / 50  # the delta's range is ~100× smaller, so is its step


@pytest.mark.parametrize(
    "base_version, base_len, max_staleness, expect_delta",
    [
        (None, 64, 2, False),  # device version unknown
        (3, 64, 2, True),  # 2 behind, at the limit
        (2, 64, 2, False),  # 3 behind: too stale
        (5, 64, 2, True),  # same version: an all-zero delta
        (6, 64, 2, False),  # device claims a version from the future
        (4, 63, 2, False),  # different model size
    ],
)
def test_download_fallback_rules(base_version, base_len, max_staleness, expect_delta) -> None:
    ms = models()
    base = None if base_version is None else (base_version, np.resize(ms[min(base_version, 5)], base_len))
    dl = encode_download(ms[5], 5, base, Chain([]), max_staleness, rng=np.random.default_rng(0))
    assert dl.is_delta == expect_delta
    held = base if expect_delta else None
    assert np.allclose(decode_download(dl, held), ms[5], atol=1e-6)


def test_decoder_refuses_a_delta_against_another_base() -> None:
    ms = models()
    dl = encode_download(ms[5], 5, (4, ms[4]), Chain([]), 2, rng=np.random.default_rng(0))
    with pytest.raises(CodecError, match="version 4, but version 3 is held"):
        decode_download(dl, (3, ms[3]))
    with pytest.raises(CodecError, match="no model is held"):
        decode_download(dl, None)
    with pytest.raises(CodecError, match="elements"):
        decode_download(dl, (4, ms[4][:10]))
    full = encode_download(ms[5], 5, None, Chain([]), 2, rng=np.random.default_rng(0))
    assert np.array_equal(decode_download(full, (1, ms[1][:3])), ms[5])  # held ignored


def test_download_bytes_versions_are_validated() -> None:
    ms = models()
    enc = Chain([]).encode(ms[0], np.random.default_rng(0))
    for ctx in ({"version": 2, "base_version": 3}, {"version": 2}, {"version": -1, "base_version": -1}):
        with pytest.raises(CodecError, match="version"):
            download_from_bytes(to_bytes(enc, context=ctx), max_elements=64)
    ok = download_from_bytes(download_to_bytes(Download(7, None, enc)), max_elements=64)
    assert ok.version == 7 and ok.base_version is None


def test_encode_download_validates_arguments() -> None:
    ms = models()
    with pytest.raises(ConfigError, match="max_staleness"):
        encode_download(ms[1], 1, None, Chain([]), -1, rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="new_version"):
        encode_download(ms[1], -1, None, Chain([]), 1, rng=np.random.default_rng(0))
    bad = ms[1].copy()
    bad[0] = np.nan
    with pytest.raises(CodecError, match="non-finite"):
        encode_download(bad, 1, None, Chain([]), 1, rng=np.random.default_rng(0))


def test_history_keeps_a_bounded_window() -> None:
    ms = models()
    h = ModelHistory(capacity=3)
    for v, m in enumerate(ms):
        h = h.push(v, m)
    assert [v for v, _ in h.versions] == [3, 4, 5]
    assert h.get(2) is None and np.array_equal(h.get(4)[1], ms[4])
    ms[4][:] = 0  # the history holds copies
    assert not np.array_equal(h.get(4)[1], ms[4])
    with pytest.raises(ConfigError, match="not newer"):
        h.push(5, ms[5])
    with pytest.raises(ConfigError, match="capacity"):
        ModelHistory(capacity=0)
