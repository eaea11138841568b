"""``summation.norms_above``, the validation's ``max_norm`` check, against an exact oracle.

The oracle sums the squares with ``math.fsum`` in float64: a float32 value squared is exact
in float64 (24 + 24 bits < 53), and fsum rounds the sum once, so it is the exact squared
norm up to one rounding -- independent of the BLAS dot the function tries first and of the
einsum it falls back on.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shoal.summation
from shoal.pipeline import Validation, validate_rows
from shoal.summation import norms_above


def exact_sq(row: np.ndarray) -> float:
    return math.fsum(float(x) * float(x) for x in row)


def oracle(rows: np.ndarray, bound: float) -> np.ndarray:
    return np.array([exact_sq(r) > float(bound) ** 2 for r in rows])


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3000), k=st.sampled_from([1, 2, 3, 9, 20]),
       scale=st.sampled_from([1e-30, 1e-20, 1e-3, 1.0, 1e3, 1e18, 3e19]),
       rel=st.sampled_from([-1e-2, -1e-6, -1e-9, 1e-9, 1e-6, 1e-2, 1.0]))
def test_agrees_with_the_exact_sum_near_and_far_from_the_bound(seed, n, k, scale, rel):
    rng = np.random.default_rng(seed)
    rows = (rng.standard_normal((k, n)) * scale).astype(np.float32)
    # the bound a hair from the first row's exact norm, where float32 rounding would decide
    # wrongly if the function trusted it there (exactly at it, float64's last bit decides)
    bound = math.sqrt(exact_sq(rows[0])) * (1 + rel) or 1e-40
    assert norms_above(rows, bound).tolist() == oracle(rows, bound).tolist()


def test_a_model_sized_row_on_either_side_of_its_own_norm():
    rng = np.random.default_rng(3)
    row = (rng.standard_normal(199_210) * 1e-3).astype(np.float32)[np.newaxis]
    norm = math.sqrt(exact_sq(row[0]))
    for rel, above in [(-1e-12, True), (-1e-7, True), (1e-7, False), (1e-12, False),
                       (-0.5, True), (0.5, False)]:
        assert norms_above(row, norm * (1 + rel))[0] == above, rel


def test_squares_that_overflow_float32_are_summed_in_float64():
    row = np.full((1, 8), 1e20, np.float32)  # each square, 1e40, is inf in float32
    norm = math.sqrt(exact_sq(row[0]))        # 2.83e20
    assert norms_above(row, norm * 0.999)[0] and not norms_above(row, norm * 1.001)[0]


def test_tiny_values_whose_squares_underflow_float32():
    row = np.full((1, 100), 1e-22, np.float32)  # squares 1e-44: subnormal or zero in float32
    norm = math.sqrt(exact_sq(row[0]))          # 1e-21
    assert norms_above(row, norm * 0.999)[0] and not norms_above(row, norm * 1.001)[0]


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_types_are_summed_exactly(dtype):
    rows = np.array([[3.0, 4.0], [0.5, 0.5]], dtype)
    assert norms_above(rows, 5.0).tolist() == [False, False]
    assert norms_above(rows, 4.999).tolist() == [True, False]


def test_a_nan_row_is_not_above_and_validation_refuses_it_as_non_finite():
    rows = np.array([[np.nan, 1.0], [3.0, 4.0]], np.float32)
    assert norms_above(rows, 1.0).tolist() == [False, True]
    keep, refused = validate_rows(rows, np.array([1, 1]), 2, Validation(max_norm=1.0))
    assert keep.tolist() == [False, False]
    assert {r.reason: r.rows.tolist() for r in refused} == {
        "non_finite": [True, False], "norm_too_large": [False, True]}
    assert "L2 norm 5 exceeds max_norm = 1.0" in next(
        r.detail for r in refused if r.reason == "norm_too_large")


def test_float32_decides_far_from_the_bound_and_float64_only_near_it(monkeypatch):
    # the fast path is taken where the proven bound allows it, and only there
    exact = []
    real = shoal.summation._exact_sq_norms
    monkeypatch.setattr(shoal.summation, "_exact_sq_norms",
                        lambda rows: exact.append(len(rows)) or real(rows))
    rng = np.random.default_rng(5)
    rows = (rng.standard_normal((3, 199_210)) * 1e-3).astype(np.float32)
    norms = [math.sqrt(exact_sq(r)) for r in rows]
    # 1.02 and 0.98 are outside the band (g = 0.0119 for 199,210 elements); 1.001 inside
    bound = norms[0] * 1.02
    assert norms_above(rows[:1], bound).tolist() == [False] and exact == []
    assert norms_above(rows[:1], norms[0] * 0.98).tolist() == [True] and exact == []
    assert norms_above(rows[:1], norms[0] * 1.001).tolist() == [False] and exact == [1]
    assert norms_above(rows[:1], norms[0] * 0.999).tolist() == [True] and exact == [1, 1]


@pytest.mark.parametrize("bound", [1e154, 1e200, 1e300, float(np.finfo(np.float64).max)])
def test_a_huge_bound_refuses_nothing_finite(bound):
    rows = np.array([[3.0e38, 3.0e38], [1.0, 2.0]], np.float32)
    assert norms_above(rows, bound).tolist() == [False, False]
    keep, refused = validate_rows(rows, np.array([1, 1]), 2, Validation(max_norm=bound))
    assert keep.tolist() == [True, True] and refused == []
