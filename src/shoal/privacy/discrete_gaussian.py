"""Gaussian noise on an integer grid: the discrete Gaussian and a gridded release.

Textbook samplers produce floating-point noise whose low-order bits depend on the value they
are added to, which can reveal it (I. Mironov, "On Significance of the Least Significant Bits
for Differential Privacy", CCS 2012). The fix used here: put the released value on a grid of
spacing γ (a power of two, so every grid point is an exact float) and add γ times an *integer*
noise, the discrete Gaussian N_Z(0, σ²/γ²) of C. L. Canonne, G. Kamath and T. Steinke, "The
Discrete Gaussian for Differential Privacy", NeurIPS 2020, which satisfies the same
concentrated DP as the continuous Gaussian of the same σ (their Theorem 4), so the
accountant's Gaussian analysis applies unchanged.

:func:`discrete_gaussian` is their Algorithm 3 (rejection from a discrete Laplace with scale
t = ⌊σ⌋ + 1), vectorized over numpy arrays. Its outputs are exact integers; the discrete
Laplace (through a geometric variate by inversion) and the acceptance test
exp(-(|y| - σ²/t)² / (2σ²)) are computed in float64, so each output's probability is the
discrete Gaussian's up to a relative error near 2^-50, not the exact rational arithmetic of
the paper's Algorithm 1 — the distribution matches to that precision (the property the tests
check against the exact pmf), and no output carries floating-point structure.

:func:`gridded_release` rounds a sum to the grid and adds the discrete noise. Rounding moves
each coordinate by at most γ/2, so two neighbouring sums, C apart before rounding, may be up to
C + γ·√D apart after it (D coordinates); γ is chosen so that γ·√D ≤ 2^-20·C and σ is scaled
up by the same factor, which keeps the noise multiplier the accountant was given a true lower
bound.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from shoal.errors import PrivacyError

__all__ = ["discrete_gaussian", "grid_for", "gridded_release"]

_SLACK = 2.0**-20  # rounding may add at most this fraction of C to the sensitivity


class _Uniform(Protocol):
    def random(self, size: int) -> np.ndarray: ...


def discrete_gaussian(sigma: float, size: int, rng: _Uniform) -> np.ndarray:
    """``size`` samples of the discrete Gaussian on the integers with scale ``sigma``:
    P(x) ∝ exp(-x² / (2σ²)), as int64.

    Args:
        sigma: σ > 0 (at most 2^50: the grid must stay exact in float64).
        size: how many.
        rng: any source of uniform [0, 1) floats (:class:`~shoal.privacy.csprng.CryptoRandom`
            in deployment; a seeded numpy Generator reproduces a run in tests).

    Raises:
        PrivacyError: σ is not a finite number in (0, 2^50], or size is negative.
    """
    if not (math.isfinite(sigma) and 0 < sigma <= 2.0**50):
        raise PrivacyError(f"discrete Gaussian sigma must be in (0, 2^50], got {sigma!r}")
    if size < 0:
        raise PrivacyError(f"size must be >= 0, got {size}")
    t = math.floor(sigma) + 1
    sigma2 = sigma * sigma
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        m = int((size - filled) * 1.8) + 32  # acceptance is about 0.6 overall
        # discrete Laplace(t): a sign and a geometric magnitude, (-, 0) rejected so 0 is not
        # counted twice
        u = 1.0 - rng.random(m)  # (0, 1]
        magnitude = np.floor(-t * np.log(u))
        negative = rng.random(m) < 0.5
        ok = ~(negative & (magnitude == 0))
        y = np.where(negative, -magnitude, magnitude)[ok]
        accept = rng.random(y.size) < np.exp(-((np.abs(y) - sigma2 / t) ** 2) / (2.0 * sigma2))
        kept = y[accept][: size - filled]
        out[filled:filled + kept.size] = kept.astype(np.int64)
        filled += kept.size
    return out


def grid_for(clip_norm: float, dim: int) -> float:
    """The grid spacing γ for sums of updates clipped to ``clip_norm`` in ``dim``
    coordinates: the largest power of two with γ·√dim ≤ 2^-20·C."""
    if not (clip_norm > 0 and dim >= 1):
        raise PrivacyError(f"need clip_norm > 0 and dim >= 1, got {clip_norm}, {dim}")
    return 2.0 ** math.floor(math.log2(_SLACK * clip_norm / math.sqrt(dim)))


def gridded_release(total: np.ndarray, sigma: float, clip_norm: float,
                    rng: _Uniform) -> np.ndarray:
    """``total`` rounded to the grid of :func:`grid_for` plus γ·N_Z(0, (σ'/γ)²), with σ'
    = σ·(1 + γ√D/C) so that rounding's extra sensitivity is paid for; a new float64 array
    whose every value is an integer multiple of γ.

    Raises:
        PrivacyError: the sum is too large for the grid (|total| / γ ≥ 2^52).
    """
    total = np.asarray(total, dtype=np.float64)
    dim = total.shape[0]
    gamma = grid_for(clip_norm, dim)
    scaled = np.rint(total / gamma)
    if scaled.size and float(np.max(np.abs(scaled))) >= 2.0**52:
        raise PrivacyError("the sum is too large to put on the noise grid exactly")
    sigma_eff = sigma * (1.0 + gamma * math.sqrt(dim) / clip_norm)
    noise = discrete_gaussian(sigma_eff / gamma, dim, rng)
    return (scaled + noise.astype(np.float64)) * gamma
