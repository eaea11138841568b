"""Behaviour of shoal.privacy.dp: clipping, Gaussian noise, the three placements and adaptive
clipping. Oracles: hand computations, scipy's chi-square and half-normal distributions, and
dp-accounting for the budget split."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

import shoal.privacy as privacy
from shoal.errors import PrivacyError, UpdateRejected
from shoal.privacy import dp
from shoal.privacy.central import CentralDP
from shoal.privacy.dp import (
    AdaptiveClipping,
    LocalDP,
    add_gaussian_noise,
    clip_to_norm,
    gaussian_noise,
    next_clip_norm,
    noised_unclipped_fraction,
    update_noise_multiplier,
)

F32_MAX = float(np.finfo(np.float32).max)


def _norm64(x: np.ndarray) -> float:
    return math.sqrt(float(np.sum(x.astype(np.float64) ** 2)))


def _assert_std(sample: np.ndarray, std: float, p: float = 1e-6) -> None:
    """Two-sided chi-square test of the sample variance (known mean 0) at level p."""
    n = sample.size
    ss = float(np.sum(sample.astype(np.float64) ** 2)) / std**2  # ~ chi2(n) if the std is right
    lo, hi = stats.chi2.ppf(p / 2, n), stats.chi2.ppf(1 - p / 2, n)
    assert lo < ss < hi, f"empirical std {math.sqrt(ss / n) * std:.6g} vs expected {std:.6g}"


# --------------------------------------------------------------------------- clipping

float32_vectors = hnp.arrays(
    np.float32,
    st.integers(1, 64),
    elements=st.one_of(
        # includes 0, subnormals and values near float32's max
        st.floats(-F32_MAX, F32_MAX, width=32),
        st.sampled_from([0.0, 1e30, -1e30, 3e38, -3e38, 1e-40]),
    ),
)


@settings(max_examples=200, deadline=None)
@given(x=float32_vectors, clip=st.floats(1e-6, 1e30))
def test_clipped_norm_never_exceeds_c_and_input_untouched(x: np.ndarray, clip: float) -> None:
    before = x.copy()
    clipped, norm, was_clipped = clip_to_norm(x, clip)
    np.testing.assert_array_equal(x, before)
    assert clipped is not x and clipped.dtype == np.float32
    assert np.all(np.isfinite(clipped))
    assert _norm64(clipped) <= clip
    assert norm == pytest.approx(_norm64(x), rel=1e-12)
    assert was_clipped == (norm > clip)
    if not was_clipped:
        np.testing.assert_array_equal(clipped, x)
    else:
        assert _norm64(clipped) == pytest.approx(clip, rel=1e-6)
        # same direction: clipped = s·x with one s in (0, 1)
        nz = x != 0
        ratios = clipped[nz].astype(np.float64) / x[nz]
        big = np.abs(x[nz]) > 1e-30 * norm  # entries that did not underflow
        assert np.allclose(ratios[big], clip / norm, rtol=1e-6)


def test_clip_hand_example_and_zero_vector() -> None:
    clipped, norm, was = clip_to_norm(np.array([3.0, 4.0], dtype=np.float32), 1.0)
    assert norm == 5.0 and was
    np.testing.assert_allclose(clipped, [0.6, 0.8], rtol=1e-6)
    zero = np.zeros(5, dtype=np.float32)
    clipped, norm, was = clip_to_norm(zero, 0.1)
    assert norm == 0.0 and not was and not clipped.any()


def test_clip_huge_float32_values_do_not_overflow() -> None:
    x = np.full(1000, 3e38, dtype=np.float32)  # float32 squares would be inf
    clipped, norm, was = clip_to_norm(x, 2.0)
    assert norm == pytest.approx(3e38 * math.sqrt(1000), rel=1e-6) and was
    assert _norm64(clipped) <= 2.0
    np.testing.assert_allclose(clipped, 2.0 / math.sqrt(1000), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_clip_rejects_non_finite(bad: float) -> None:
    x = np.ones(4, dtype=np.float32)
    x[2] = bad
    with pytest.raises(UpdateRejected) as info:
        clip_to_norm(x, 1.0)
    assert info.value.reason == "non_finite"


@pytest.mark.parametrize("c", [0.0, -1.0, np.nan, np.inf])
def test_clip_rejects_bad_clip_norm(c: float) -> None:
    with pytest.raises(PrivacyError, match="clip_norm"):
        clip_to_norm(np.ones(3, dtype=np.float32), c)


def test_clip_rejects_wrong_shape_and_dtype() -> None:
    with pytest.raises(UpdateRejected) as info:
        clip_to_norm(np.ones((2, 2), dtype=np.float32), 1.0)
    assert info.value.reason == "wrong_shape"
    with pytest.raises(UpdateRejected) as info:
        clip_to_norm(np.ones(3, dtype=np.int64), 1.0)
    assert info.value.reason == "wrong_dtype"


# --------------------------------------------------------------------------- noise


def test_gaussian_noise_std_matches_sigma_c() -> None:
    z, c = 1.3, 0.7
    noise = gaussian_noise(400_000, z * c, np.random.default_rng(1))
    assert noise.dtype == np.float32
    _assert_std(noise, z * c)
    assert abs(float(noise.mean())) < 5 * z * c / math.sqrt(noise.size)


def test_noise_never_mutates_and_same_seed_reproduces() -> None:
    x = np.arange(1000, dtype=np.float32)
    before = x.copy()
    a = add_gaussian_noise(x, 0.5, np.random.default_rng(7))
    b = add_gaussian_noise(x, 0.5, np.random.default_rng(7))
    c = add_gaussian_noise(x, 0.5, np.random.default_rng(8))
    np.testing.assert_array_equal(x, before)
    assert a is not x and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    _assert_std(a - x, 0.5)


def test_zero_std_gives_zeros_and_negative_std_is_refused() -> None:
    assert not gaussian_noise(10, 0.0, np.random.default_rng(0)).any()
    with pytest.raises(PrivacyError, match="std"):
        gaussian_noise(10, -1.0, np.random.default_rng(0))


@pytest.fixture()
def numpy_global_state():
    saved = np.random.get_state()
    yield
    np.random.set_state(saved)


@pytest.mark.usefixtures("numpy_global_state")
def test_central_round_hand_example() -> None:
    # updates of norm 5 and 0.5 with C = 1, m = 4: clipped sum [0.9, 1.2], mean [0.225, 0.3]
    central = CentralDP(noise_multiplier=1e-9, clip_norm=1.0, expected_clients=4)
    acc = central.begin_round(central.init(), 2)
    r1 = acc.add(np.array([3.0, 4.0], dtype=np.float32), client_id="a")
    r2 = acc.add(np.array([0.3, 0.4], dtype=np.float32), client_id="b")
    assert (r1.norm, r1.was_clipped) == (5.0, True)
    assert r2.norm == pytest.approx(0.5) and not r2.was_clipped
    result = acc.finish(np.random.default_rng(0))
    np.testing.assert_allclose(result.mean, [0.225, 0.3], rtol=1e-6)
    assert result.mean.dtype == np.float32
    assert (result.num_updates, result.num_clipped) == (2, 1)
    assert result.state.round == 1 and result.state.clip_norm == 1.0
    assert result.unclipped_fraction is None


def test_central_noise_std_is_sigma_c_over_m() -> None:
    z, c, m = 1.1, 0.5, 20.0
    central = CentralDP(noise_multiplier=z, clip_norm=c, expected_clients=m)
    acc = central.begin_round(central.init(), 200_000)
    acc.add(np.zeros(200_000, dtype=np.float32))
    result = acc.finish(np.random.default_rng(3))
    assert result.noise_std == pytest.approx(z * c / m)
    _assert_std(result.mean, z * c / m)


def test_central_noise_with_adaptive_clipping_uses_the_split_multiplier() -> None:
    # z = 1, m = 100, σ_b = m/20 = 5: z_Δ = (1 − 1/100)^(-1/2) (hand computed: 1.0050378152592121)
    central = CentralDP(
        noise_multiplier=1.0, clip_norm=0.1, expected_clients=100, adaptive=AdaptiveClipping()
    )
    assert central.count_noise_std == 5.0
    assert central.update_noise_multiplier == pytest.approx(1.0050378152592121, rel=1e-12)
    acc = central.begin_round(central.init(), 100_000)
    result = acc.finish(np.random.default_rng(4))
    _assert_std(result.mean, 1.0050378152592121 * 0.1 / 100)
    assert result.unclipped_fraction is not None and 0.0 <= result.unclipped_fraction <= 1.0


def test_streaming_sum_is_order_invariant_and_merge_matches() -> None:
    rng = np.random.default_rng(5)
    updates = [rng.standard_normal(50).astype(np.float32) * s for s in (0.1, 1.0, 5.0, 20.0)]
    central = CentralDP(noise_multiplier=0.8, clip_norm=2.0, expected_clients=4)
    state = central.init()

    def run(order: list[int], split: bool) -> np.ndarray:
        a = central.begin_round(state, 50)
        b = central.begin_round(state, 50) if split else a
        for i, k in enumerate(order):
            (b if i % 2 else a).add(updates[k])
        if split:
            a.merge(b)
        return a.finish(np.random.default_rng(9)).mean

    ref = run([0, 1, 2, 3], False)
    np.testing.assert_allclose(run([3, 1, 0, 2], False), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(run([2, 0, 3, 1], True), ref, rtol=1e-6, atol=1e-7)


def test_rejected_update_changes_nothing() -> None:
    central = CentralDP(noise_multiplier=0.5, clip_norm=1.0, expected_clients=3)
    good = np.ones(6, dtype=np.float32)
    bad = good.copy()
    bad[1] = np.nan

    def run(extra: list[np.ndarray]) -> np.ndarray:
        acc = central.begin_round(central.init(), 6)
        acc.add(good)
        for u in extra:
            with pytest.raises(UpdateRejected) as info:
                acc.add(u, client_id=7)
            assert info.value.client_id == 7
        assert acc.num_updates == 1
        return acc.finish(np.random.default_rng(0)).mean

    np.testing.assert_array_equal(run([bad, np.ones(5, dtype=np.float32)]), run([]))


def test_round_can_be_released_only_once() -> None:
    central = CentralDP(noise_multiplier=0.5, clip_norm=1.0, expected_clients=3)
    acc = central.begin_round(central.init(), 3)
    acc.finish(np.random.default_rng(0))
    with pytest.raises(PrivacyError, match="already finished"):
        acc.finish(np.random.default_rng(0))
    with pytest.raises(PrivacyError, match="already finished"):
        acc.add(np.ones(3, dtype=np.float32))


# --------------------------------------------------------------------------- adaptive clipping


def test_noise_split_formula_and_its_composition() -> None:
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    z, sigma_b = 1.2, 3.0
    z_delta = update_noise_multiplier(z, sigma_b)
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2, rel=1e-12)
    # Independent check: the update sum (z_Δ) composed with the centred count (2σ_b) costs the
    # same as one Gaussian with z, under a Poisson-sampled round.
    def eps(events: list) -> float:
        acc = RdpAccountant(orders=[2, 4, 8, 16, 32])
        acc.compose(dp_event.PoissonSampledDpEvent(1.0, dp_event.ComposedDpEvent(events)), 10)
        return acc.get_epsilon(1e-5)

    two = eps([dp_event.GaussianDpEvent(z_delta), dp_event.GaussianDpEvent(2 * sigma_b)])
    assert two == pytest.approx(eps([dp_event.GaussianDpEvent(z)]), rel=1e-9)


@pytest.mark.parametrize("z, sigma_b", [(10.0, 5.0), (11.0, 5.0)])
def test_count_noise_exceeding_budget_is_refused(z: float, sigma_b: float) -> None:
    with pytest.raises(PrivacyError, match="count_noise_std"):
        update_noise_multiplier(z, sigma_b)
    with pytest.raises(PrivacyError):
        adaptive = AdaptiveClipping(count_noise_std=sigma_b)
        CentralDP(noise_multiplier=z, clip_norm=0.1, expected_clients=100, adaptive=adaptive)


def test_unclipped_fraction_tf_privacy_convention() -> None:
    rng = np.random.default_rng(0)
    # 30 unclipped of 50 arrivals, m = 100: (30 − 25)/100 + 0.5 = 0.55
    assert noised_unclipped_fraction(30, 50, 100, 0.0, rng) == pytest.approx(0.55)
    assert noised_unclipped_fraction(0, 100, 100, 0.0, rng) == 0.0
    assert noised_unclipped_fraction(100, 100, 100, 0.0, rng) == 1.0
    draws = [noised_unclipped_fraction(50, 100, 100, 1e4, rng) for _ in range(50)]
    assert min(draws) == 0.0 and max(draws) == 1.0  # clipped to [0, 1]
    assert next_clip_norm(1.0, 0.7, 0.5, 0.2) == pytest.approx(math.exp(-0.04))


def _simulate(c0: float, gamma: float, rounds: int, seed: int = 0) -> list[float]:
    """Noiseless adaptive clipping on norms |N(0,1)|·10, 100 clients a round.

    The setting of docs/references.md, section "Adaptive clipping".
    """
    rng = np.random.default_rng(seed)
    c, history = c0, []
    for _ in range(rounds):
        norms = np.abs(rng.standard_normal(100)) * 10.0
        b = noised_unclipped_fraction(int(np.sum(norms <= c)), 100, 100, 0.0, rng)
        c = next_clip_norm(c, b, gamma, 0.2)
        history.append(c)
    return history


@pytest.mark.parametrize("gamma", [0.5, 0.9])
@pytest.mark.parametrize("c0", [0.1, 100.0])
def test_adaptive_clip_moves_toward_the_target_quantile(c0: float, gamma: float) -> None:
    target = 10.0 * stats.halfnorm.ppf(gamma)  # 6.745 for the median, 16.45 for 0.9
    history = _simulate(c0, gamma, 200)
    first = np.array([c0] + history[:10])
    steps = np.diff(first)
    if c0 < target:
        assert np.all(steps > 0), "C must grow while it is below the quantile"
    else:
        assert np.all(steps < 0), "C must shrink while it is above the quantile"
    assert history[-1] == pytest.approx(target, rel=0.10)


def test_central_dp_learns_the_median_with_default_count_noise() -> None:
    rng = np.random.default_rng(11)
    central = CentralDP(
        noise_multiplier=1.0, clip_norm=0.1, expected_clients=100, adaptive=AdaptiveClipping()
    )
    state, dim = central.init(), 4
    for _ in range(200):
        acc = central.begin_round(state, dim)
        directions = rng.standard_normal((100, dim))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        norms = np.abs(rng.standard_normal(100)) * 10.0
        for u in (directions * norms[:, None]).astype(np.float32):
            acc.add(u)
        state = acc.finish(rng).state
    assert state.round == 200
    assert state.clip_norm == pytest.approx(10.0 * stats.halfnorm.ppf(0.5), rel=0.2)


# --------------------------------------------------------------------------- local


def test_local_dp_clips_then_adds_sigma_c_noise() -> None:
    local = LocalDP(noise_multiplier=2.0, clip_norm=0.5)
    x = np.full(100_000, 1.0, dtype=np.float32)  # norm 316 → clipped to 0.5
    before = x.copy()
    noised, info = local.privatize(x, np.random.default_rng(2))
    np.testing.assert_array_equal(x, before)
    assert info.was_clipped and info.norm == pytest.approx(math.sqrt(1e5))
    clipped = np.full(100_000, 0.5 / math.sqrt(1e5), dtype=np.float32)
    _assert_std(noised - clipped, 2.0 * 0.5)


def test_public_api_is_reexported() -> None:
    for name in dp.__all__:
        assert getattr(privacy, name) is getattr(dp, name)
        assert name in privacy.__all__
    assert {p.value for p in privacy.Placement} == {"central", "local"}


def test_a_finite_but_huge_update_is_clipped_for_its_norm_not_refused_as_non_finite():
    huge = np.full(4, 1e200)  # squares overflow float64; the values are finite
    clipped, norm, was_clipped = clip_to_norm(huge, 1.0)
    assert was_clipped and norm == pytest.approx(2e200, rel=1e-12)
    assert np.linalg.norm(clipped) <= 1.0 and np.all(clipped > 0)
    with pytest.raises(UpdateRejected) as info:
        clip_to_norm(np.array([1e200, np.nan]), 1.0)
    assert info.value.reason == "non_finite"


def test_an_accumulator_refuses_itself_and_finished_ones():
    dp_ = CentralDP(noise_multiplier=1.0, clip_norm=1.0, expected_clients=2)
    a = dp_.begin_round(dp_.init(), 3)
    b = dp_.begin_round(dp_.init(), 3)
    with pytest.raises(PrivacyError, match="itself"):
        a.merge(a)
    b.add(np.ones(3), client_id=1)
    b.finish(np.random.default_rng(0))
    with pytest.raises(PrivacyError, match="finished"):
        a.merge(b)
