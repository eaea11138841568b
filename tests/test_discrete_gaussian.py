"""The discrete Gaussian and the gridded release against exact oracles: the sampler's
histogram against the exact pmf (chi-square), the release on an exact power-of-two grid with
the noise the accountant was promised."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from shoal.errors import PrivacyError
from shoal.privacy.central import CentralDP, CentralDPState
from shoal.privacy.csprng import CryptoRandom
from shoal.privacy.discrete_gaussian import discrete_gaussian, grid_for, gridded_release


def exact_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    """P(x) ∝ exp(-x²/2σ²), normalised over all integers (the tails beyond 40σ vanish)."""
    far = np.arange(-int(40 * sigma) - 1, int(40 * sigma) + 2)
    z = np.exp(-far.astype(float) ** 2 / (2 * sigma**2)).sum()
    return np.exp(-support.astype(float) ** 2 / (2 * sigma**2)) / z


@pytest.mark.parametrize("sigma", [0.6, 1.5, 4.0])
def test_histogram_matches_the_exact_pmf(sigma):
    x = discrete_gaussian(sigma, 200_000, np.random.default_rng(7))
    assert x.dtype == np.int64
    lo, hi = int(-6 * sigma) - 1, int(6 * sigma) + 1
    support = np.arange(lo, hi + 1)
    p = exact_pmf(sigma, support)
    counts = np.array([(x == k).sum() for k in support])
    expected = p * x.size
    keep = expected >= 5  # the chi-square's usual validity rule; lump the rest
    f_obs = np.append(counts[keep], x.size - counts[keep].sum())
    f_exp = np.append(expected[keep], x.size - expected[keep].sum())
    assert stats.chisquare(f_obs, f_exp).pvalue > 1e-4


def test_large_sigma_has_the_continuous_moments_and_csprng_works():
    sigma = 1.0e6
    x = discrete_gaussian(sigma, 100_000, CryptoRandom(bytes(32)))
    assert abs(x.mean()) < 5 * sigma / math.sqrt(x.size)
    assert abs(x.std() / sigma - 1) < 0.01


def test_gridded_release_is_on_an_exact_grid_with_the_promised_noise():
    dim, clip = 50_000, 0.7
    gamma = grid_for(clip, dim)
    assert math.log2(gamma) == int(math.log2(gamma))  # a power of two
    assert gamma * math.sqrt(dim) <= 2.0**-20 * clip < 2 * gamma * math.sqrt(dim)
    total = np.random.default_rng(0).normal(0, 3.0, dim)
    sigma = 1.3 * clip
    out = gridded_release(total, sigma, clip, np.random.default_rng(1))
    steps = out / gamma
    np.testing.assert_array_equal(steps, np.rint(steps))  # every value a multiple of γ
    noise = out - np.rint(total / gamma) * gamma
    # σ scaled up by at most 2^-20: the accountant's z stays a lower bound
    assert abs(noise.std() / sigma - 1) < 0.02
    assert noise.std() >= 0.97 * sigma
    with pytest.raises(PrivacyError, match="too large"):
        gridded_release(np.full(10, 1e30), sigma, clip, np.random.default_rng(1))


def test_central_dp_releases_on_the_grid_when_discrete():
    dp = CentralDP(noise_multiplier=1.0, clip_norm=0.5, expected_clients=10, discrete=True)
    total = np.linspace(-1, 1, 1000)
    out, state, fraction, std = dp.release(total.copy(), 10, 3, CentralDPState(0.5, 0),
                                           CryptoRandom())
    gamma = grid_for(0.5, 1000)
    np.testing.assert_array_equal(out / gamma, np.rint(out / gamma))
    assert std == 0.5 and state.round == 1 and fraction is None
    assert 0.4 < np.std(out - total) < 0.6


def test_bad_arguments_are_refused():
    for sigma in (0.0, -1.0, math.inf, math.nan, 2.0**51):
        with pytest.raises(PrivacyError):
            discrete_gaussian(sigma, 3, np.random.default_rng(0))
    with pytest.raises(PrivacyError):
        grid_for(0.0, 10)
