"""Numeric core of shoal.codec: error bounds, unbiasedness, bit layouts, chain rules, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import shoal.codec as codec
from shoal.codec import (
    BFloat16,
    Chain,
    Float16,
    RandomK,
    Sign,
    StochasticQuantize,
    TopK,
    Zstd,
)
from shoal.codec.quantize import pack_codes, unpack_codes
from shoal.codec.sparsify import INDEX_BITMAP, INDEX_GAP16, INDEX_GAP32, decode_indices, encode_indices
from shoal.errors import CodecError, ConfigError

SETTINGS = settings(max_examples=25, deadline=None)


def vectors(min_size: int = 0, max_size: int = 300, bound: float = 1e4) -> st.SearchStrategy[np.ndarray]:
    b = float(np.float32(bound))
    return hnp.arrays(
        np.float32,
        st.integers(min_size, max_size),
        elements=st.floats(-b, b, width=32, allow_nan=False, allow_infinity=False),
    )


def roundtrip(chain: Chain, x: np.ndarray, seed: int = 0) -> np.ndarray:
    return chain.decode(chain.encode(x, np.random.default_rng(seed)))


ALL_CHAINS = [
    Chain([]),
    Chain([Float16()]),
    Chain([BFloat16()]),
    Chain([StochasticQuantize(bits=8)]),
    Chain([StochasticQuantize(bits=4, block=16)]),
    Chain([StochasticQuantize(bits=2, block=9, scale="absmax")]),
    Chain([Sign()]),
    Chain([Sign(block=9)]),
    Chain([TopK(fraction=0.1)]),
    Chain([RandomK(k=3)]),
    Chain([TopK(fraction=0.3), StochasticQuantize(bits=4, block=8), Zstd()]),
    Chain([RandomK(fraction=0.5, unbiased=False), BFloat16(), Zstd(level=1)]),
    Chain([Zstd()]),
]


# --- casts -------------------------------------------------------------------------------


@SETTINGS
@given(
    mags=hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(2.0**-14, 65504.0)),
    signs=st.integers(0, 2**32 - 1),
)
def test_fp16_relative_error_in_normal_range(mags: np.ndarray, signs: int) -> None:
    x = (mags * np.where(np.random.default_rng(signs).random(mags.size) < 0.5, -1, 1)).astype(np.float32)
    y = roundtrip(Chain([Float16()]), x)
    assert y.dtype == np.float32
    assert np.all(np.abs(y.astype(np.float64) - x) <= 2.0**-11 * np.abs(x.astype(np.float64)))


def test_fp16_refuses_values_beyond_its_range() -> None:
    with pytest.raises(CodecError, match="float16"):
        Chain([Float16()]).encode(np.array([1.0, 7e4], np.float32), np.random.default_rng(0))


@SETTINGS
@given(vectors(1, 300, bound=3e38))
def test_bf16_matches_torch_round_to_nearest_even(x: np.ndarray) -> None:
    oracle = torch.from_numpy(x.copy()).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(roundtrip(Chain([BFloat16()]), x), oracle)
    normal = np.abs(x) >= np.finfo(np.float32).tiny
    err = np.abs(roundtrip(Chain([BFloat16()]), x).astype(np.float64) - x)
    assert np.all(err[normal] <= 2.0**-8 * np.abs(x[normal].astype(np.float64)))


def test_bf16_ties_round_to_even_by_hand() -> None:
    ulp = 2.0**-7  # bfloat16 spacing in [1, 2)
    x = np.array([1 + ulp / 2, 1 + 1.5 * ulp, -(1 + ulp / 2), 1 + 0.51 * ulp], np.float32)
    expected = np.array([1.0, 1 + 2 * ulp, -1.0, 1 + ulp], np.float32)
    assert np.array_equal(roundtrip(Chain([BFloat16()]), x), expected)


def test_bf16_refuses_values_rounding_to_infinity() -> None:
    with pytest.raises(CodecError, match="infinity"):
        Chain([BFloat16()]).encode(np.array([np.finfo(np.float32).max], np.float32), np.random.default_rng(0))


# --- stochastic quantization -------------------------------------------------------------


def block_steps(x: np.ndarray, bits: int, block: int, scale: str) -> np.ndarray:
    """Per-element quantization step, computed block by block in float64 (test oracle)."""
    steps = np.empty(x.size)
    for start in range(0, x.size, block):
        b = x[start : start + block].astype(np.float64)
        rng_ = b.max() - b.min() if scale == "minmax" else 2 * np.abs(b).max()
        steps[start : start + block] = rng_ / (2**bits - 1)
    return steps


@SETTINGS
@given(
    x=vectors(0, 300),
    bits=st.sampled_from([2, 4, 8]),
    block=st.integers(8, 70),
    scale=st.sampled_from(["minmax", "absmax"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantizer_error_below_one_step_and_payload_is_packed(
    x: np.ndarray, bits: int, block: int, scale: str, seed: int
) -> None:
    chain = Chain([StochasticQuantize(bits=bits, block=block, scale=scale)])
    e = chain.encode(x, np.random.default_rng(seed))
    assert e.fields["codes"].nbytes == math.ceil(x.size * bits / 8)
    assert e.fields["step"].size == math.ceil(x.size / block)
    y = chain.decode(e)
    assert y.shape == x.shape and y.dtype == np.float32
    steps = block_steps(x, bits, block, scale)
    slack = 1e-5 * (np.abs(x).max() if x.size else 0) + 1e-30
    assert np.all(np.abs(y.astype(np.float64) - x) <= steps * (1 + 1e-5) + slack)


@settings(max_examples=12, deadline=None)
@given(
    x=vectors(8, 48, bound=100.0),
    bits=st.sampled_from([2, 4, 8]),
    scale=st.sampled_from(["minmax", "absmax"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantizer_is_unbiased(x: np.ndarray, bits: int, scale: str, seed: int) -> None:
    # n copies of x, one block each: n independent quantizations with identical scales.
    n = 4000
    chain = Chain([StochasticQuantize(bits=bits, block=x.size, scale=scale)])
    y = roundtrip(chain, np.tile(x, n), seed).reshape(n, x.size).astype(np.float64)
    step = block_steps(x, bits, x.size, scale)
    # Var ≤ step²/4 per draw; 6 standard errors of the mean plus float32 rounding.
    tol = 6 * (step / 2) / math.sqrt(n) + 1e-5 * (step + np.abs(x))
    assert np.all(np.abs(y.mean(axis=0) - x) <= tol)


def test_quantizer_constant_blocks_and_zero_vector_decode_exactly() -> None:
    x = np.concatenate([np.full(256, 0.37), np.zeros(256), np.full(10, -2.5)]).astype(np.float32)
    for bits in (2, 4, 8):
        for scale in ("minmax", "absmax"):
            y = roundtrip(Chain([StochasticQuantize(bits=bits, block=256, scale=scale)]), x)
            if scale == "minmax":
                assert np.array_equal(y, x)
            else:  # absmax levels are ±m·(2j/L − 1): a constant block decodes exactly only if 0
                assert np.array_equal(y[256:512], x[256:512])


def test_bit_packing_layout_by_hand() -> None:
    assert pack_codes(np.array([1, 2, 3, 0, 3], np.uint8), 2).tolist() == [0b00111001, 0b00000011]
    assert pack_codes(np.array([0x1, 0xA, 0x5], np.uint8), 4).tolist() == [0xA1, 0x05]
    codes = np.random.default_rng(0).integers(0, 16, 101).astype(np.uint8)
    assert np.array_equal(unpack_codes(pack_codes(codes, 4), 4, 101), codes)


def test_four_bit_payload_costs_half_a_byte_per_value() -> None:
    x = np.random.default_rng(1).standard_normal(199_210).astype(np.float32)
    e = Chain([StochasticQuantize(bits=4, block=256)]).encode(x, np.random.default_rng(0))
    blocks = math.ceil(x.size / 256)
    assert e.nbytes == math.ceil(x.size / 2) + 2 * 4 * blocks


# --- sign --------------------------------------------------------------------------------


@SETTINGS
@given(x=vectors(0, 200), block=st.one_of(st.none(), st.integers(8, 50)))
def test_sign_is_l1_scale_times_sign(x: np.ndarray, block: int | None) -> None:
    y = roundtrip(Chain([Sign(block=block)]), x)
    expected = np.empty(x.size)
    step = block or max(x.size, 1)
    for start in range(0, x.size, step):
        b = x[start : start + step].astype(np.float64)
        expected[start : start + step] = np.abs(b).mean() * np.where(b >= 0, 1.0, -1.0)
    # relative error is meaningless below float32's normal range: a scale of 7e-46 (the mean
    # of 0 and 1e-45, which Hypothesis found) can only come out as 0 or 1.4e-45 in float32
    tiny = 2 * float(np.finfo(np.float32).smallest_subnormal)
    assert np.allclose(y, expected, rtol=1e-5, atol=tiny)


def test_sign_payload_is_one_bit_per_value() -> None:
    e = Chain([Sign()]).encode(np.ones(1001, np.float32), np.random.default_rng(0))
    assert e.fields["signs"].nbytes == 126 and e.fields["scale"].size == 1


# --- sparsification ----------------------------------------------------------------------


@SETTINGS
@given(x=vectors(0, 300), fraction=st.floats(0.001, 1.0))
def test_topk_keeps_the_largest_magnitudes(x: np.ndarray, fraction: float) -> None:
    y = roundtrip(Chain([TopK(fraction=fraction)]), x)
    k = min(x.size, max(1, math.ceil(fraction * x.size))) if x.size else 0
    kept = np.zeros(x.size, bool)
    kept[np.flatnonzero(y)] = True
    assert np.array_equal(y[kept], x[kept]) and np.all(y[~kept] == 0)
    # Exactly k positions were sent (some may hold zeros); their magnitudes dominate the rest.
    e = Chain([TopK(fraction=fraction)]).encode(x, np.random.default_rng(0))
    assert e.count == k
    sent = np.zeros(x.size, bool)
    sent[decode_indices(e.meta["index_format"], e.fields["indices"], x.size, k, stage="t")] = True
    if 0 < k < x.size:
        assert np.abs(x[sent]).min() >= np.abs(x[~sent]).max()


def test_randk_is_unbiased() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal(40).astype(np.float32)
    chain, n, k = Chain([RandomK(k=8)]), 3000, 8
    ys = np.stack([chain.decode(chain.encode(x, rng)) for _ in range(n)]).astype(np.float64)
    assert np.all(np.count_nonzero(ys, axis=1) <= k)
    # Each draw is (d/k)·x_i with probability k/d, else 0: variance x_i²(d/k − 1).
    se = np.abs(x) * math.sqrt((40 / k - 1) / n)
    assert np.all(np.abs(ys.mean(axis=0) - x) <= 6 * se + 1e-6)
    biased = Chain([RandomK(k=8, unbiased=False)])
    yb = biased.decode(biased.encode(x, rng))
    assert set(np.flatnonzero(yb)) <= set(range(40)) and np.all(np.isin(yb[yb != 0], x))


def test_index_encoding_picks_the_smallest_form() -> None:
    fmt, arr = encode_indices(np.array([1, 3, 4]), 100)  # gaps 1,1,0: 6 bytes < 13-byte bitmap
    assert fmt == INDEX_GAP16 and arr.dtype == np.dtype("<u2") and arr.tolist() == [1, 1, 0]
    fmt, arr = encode_indices(np.arange(10), 16)  # 2-byte bitmap < 20 bytes of gaps
    assert fmt == INDEX_BITMAP and arr.tolist() == [0xFF, 0x03]
    fmt, arr = encode_indices(np.array([0, 150_000]), 199_210)  # gap 149,999 needs uint32
    assert fmt == INDEX_GAP32 and arr.tolist() == [0, 149_999]
    for idx, d in [(np.array([1, 3, 4]), 100), (np.arange(10), 16), (np.array([0, 150_000]), 199_210)]:
        fmt, arr = encode_indices(idx, d)
        assert np.array_equal(decode_indices(fmt, arr, d, idx.size, stage="t"), idx)


def test_topk_one_percent_of_2nn_uses_uint16_gaps() -> None:
    x = np.random.default_rng(3).standard_normal(199_210).astype(np.float32)
    e = Chain([TopK(fraction=0.01)]).encode(x, np.random.default_rng(0))
    assert e.count == 1993 and e.meta["index_format"] == INDEX_GAP16
    assert e.nbytes == 1993 * (2 + 4)


# --- chains ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stages, match",
    [
        ([Zstd(), StochasticQuantize()], "zstd"),
        ([TopK(k=1), RandomK(k=2)], "at most one sparsify"),
        ([Float16(), StochasticQuantize()], "at most one value"),
        ([StochasticQuantize(), TopK(k=1)], "cannot follow"),
        ([Zstd(), Zstd()], "at most one entropy"),
        (["zstd"], "not a codec stage"),
    ],
)
def test_nonsensical_chains_are_refused(stages: list, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Chain(stages)


@pytest.mark.parametrize(
    "make",
    [
        lambda: StochasticQuantize(bits=3),
        lambda: StochasticQuantize(block=0),
        lambda: StochasticQuantize(block=7),
        lambda: StochasticQuantize(scale="max"),
        lambda: TopK(),
        lambda: TopK(fraction=0.0),
        lambda: TopK(fraction=1.5),
        lambda: TopK(fraction=0.1, k=3),
        lambda: RandomK(k=0),
        lambda: Sign(block=7),
        lambda: Zstd(level=0),
        lambda: Chain.from_spec([["gzip", {}]]),
        lambda: Chain.from_spec([["quantize", {"bitz": 8}]]),
    ],
)
def test_bad_parameters_are_config_errors(make) -> None:
    with pytest.raises(ConfigError):
        make()


def test_spec_round_trips_and_registry_is_complete() -> None:
    for chain in ALL_CHAINS:
        assert Chain.from_spec(chain.spec) == chain
    config_shape = [{"codec": "topk", "fraction": 0.01}, {"codec": "quantize", "bits": 4}, {"codec": "zstd"}]
    assert Chain.from_spec(config_shape) == Chain([TopK(fraction=0.01), StochasticQuantize(bits=4), Zstd()])
    assert set(codec.STAGES) == {"topk", "randk", "fp16", "bf16", "quantize", "sign", "zstd"}
    assert all(hasattr(codec, name) for name in codec.__all__)


@settings(max_examples=15, deadline=None)
@given(x=vectors(0, 200), seed=st.integers(0, 2**32 - 1))
def test_every_chain_round_trips_to_a_float32_vector_of_the_same_length(x: np.ndarray, seed: int) -> None:
    for chain in ALL_CHAINS:
        e = chain.encode(x, np.random.default_rng(seed))
        y = codec.decode(e)
        assert y.shape == x.shape and y.dtype == np.float32 and y.flags.writeable
    assert np.array_equal(roundtrip(Chain([]), x), x)
    assert np.array_equal(roundtrip(Chain([Zstd()]), x), x)


def test_topk_then_q8_then_zstd_errs_only_by_a_step_on_kept_coordinates() -> None:
    x = np.random.default_rng(5).standard_normal(5000).astype(np.float32)
    chain = Chain([TopK(fraction=0.05), StochasticQuantize(bits=8, block=64), Zstd(level=3)])
    e = chain.encode(x, np.random.default_rng(1))
    y = chain.decode(e)
    exact = roundtrip(Chain([TopK(fraction=0.05)]), x)
    kept = exact != 0
    assert np.all(y[~kept] == 0)
    kept_values = x[kept]
    steps = block_steps(kept_values, 8, 64, "minmax")
    assert np.all(np.abs(y[kept] - kept_values) <= steps * (1 + 1e-5))
    assert set(e.fields) == {"zstd"}


@pytest.mark.parametrize("chain", ALL_CHAINS, ids=lambda c: "+".join(n for n, _ in c.spec) or "raw")
def test_edge_vectors(chain: Chain) -> None:
    rng = np.random.default_rng(0)
    assert roundtrip(chain, np.zeros(0, np.float32)).shape == (0,)
    assert np.array_equal(roundtrip(chain, np.zeros(37, np.float32)), np.zeros(37, np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones(10, np.float32)
        x[4] = bad
        with pytest.raises(CodecError, match="non-finite"):
            chain.encode(x, rng)
    with pytest.raises(CodecError, match="1-D"):
        chain.encode(np.ones((2, 3), np.float32), rng)
    with pytest.raises(CodecError, match="floating"):
        chain.encode(np.ones(3, np.int64), rng)


def test_encode_does_not_alias_or_modify_the_input() -> None:
    x = np.arange(10, dtype=np.float32)
    before = x.copy()
    for chain in ALL_CHAINS:
        y = roundtrip(chain, x)
        y[:] = -1
        assert np.array_equal(x, before)
