"""Client-level differential privacy for federated averaging: clipping, Gaussian noise,
adaptive clipping and local DP (central DP-FedAvg is :mod:`shoal.privacy.central`).

Algorithms:

* DP-FedAvg: McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
  Language Models" (ICLR 2018). Each client's update Δ_k is flat-clipped to L2 norm C, the server
  sums the clipped updates, adds N(0, (zC)² I) to the sum and divides by the *fixed*
  denominator m = qN (the expected cohort size). Weights are uniform (w_k = 1): weighting by the
  client's example count would make the sensitivity depend on private data (n_k), so the sum's
  L2 sensitivity is exactly C only when every client counts once.
* Adaptive clipping: Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning
  with Adaptive Clipping" (NeurIPS 2021), in the convention of TF-Privacy's
  ``QuantileEstimatorQuery``: clients report the unclipped bit b_k = 1[‖Δ_k‖ ≤ C_t], centred to
  b_k − ½ (so the count query has sensitivity ½), the server releases
  b̄ = clip((Σ(b_k − ½) + N(0, σ_b²))/m + ½, 0, 1) and sets C_{t+1} = C_t·exp(−η(b̄ − γ)).
  If fewer than a fraction γ of updates were unclipped (b̄ < γ) the norm grows, else it shrinks.
* Not here: distributed noise for secure aggregation (Kairouz, Liu and Steinke, "The
  Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation",
  ICML 2021) needs discrete noise in SecAgg's integer ring; see ``docs/privacy.md``.

Units used throughout: ``noise_multiplier`` z is the ratio of the noise standard deviation on
the *sum* to the sum's L2 sensitivity C (add/remove-one-client adjacency). The privacy
accountant (:mod:`shoal.privacy.accountant`) consumes exactly this z.

Randomness is always an explicit :class:`numpy.random.Generator`. Nothing here mutates an array
it did not create, except the accumulator's own running sum.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass

import numpy as np

from shoal.errors import PrivacyError, UpdateRejected
from shoal.privacy.csprng import CryptoRandom, RandomSource

__all__ = [
    "DEFAULT_INITIAL_CLIP_NORM",
    "AdaptiveClipping",
    "ClipResult",
    "LocalDP",
    "Placement",
    "add_gaussian_noise",
    "clip_to_norm",
    "gaussian_noise",
    "next_clip_norm",
    "noised_unclipped_fraction",
    "secure_generator",
    "update_noise_multiplier",
]

#: C_0 recommended by Andrew et al. (2021) when the clip norm is learned.
DEFAULT_INITIAL_CLIP_NORM = 0.1

# Clipping scales by (C/‖x‖)·(1 − 2⁻²²). The float64 norm is exact to ~1e-16·√d and rounding
# a normal float32 result costs at most 2⁻²⁴ relative, so the shrink keeps ‖clipped‖ ≤ C (the
# sensitivity bound the accountant relies on) at a 2.4e-7 relative bias; results in the
# subnormal range are re-checked explicitly in clip_to_norm.
_CLIP_SHRINK = 1.0 - 2.0**-22
_SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Placement(enum.StrEnum):
    """Where the Gaussian noise is added (and so whom it protects against)."""

    CENTRAL = "central"
    LOCAL = "local"


# --------------------------------------------------------------------------- primitives


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    value = float(value)
    ok = value >= 0.0 if allow_zero else value > 0.0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise PrivacyError(f"{name} must be finite and {bound}, got {value!r}")
    return value


def _check_vector(x: np.ndarray, *, client_id: object = None, round: int | None = None) -> None:
    if not isinstance(x, np.ndarray) or x.ndim != 1:
        shape = getattr(x, "shape", type(x).__name__)
        raise UpdateRejected(
            "wrong_shape",
            f"expected a flat 1-D vector, got {shape}",
            client_id=client_id,
            round=round,
        )
    if x.dtype not in _SUPPORTED_DTYPES:
        raise UpdateRejected(
            "wrong_dtype",
            f"expected float32 or float64, got {x.dtype}",
            client_id=client_id,
            round=round,
        )


def _norm(x: np.ndarray, *, client_id: object = None, round: int | None = None) -> float:
    """L2 norm accumulated in float64 (float32 squares of values near 3.4e38 would overflow).

    A float64 update whose squares overflow is finite, not ``non_finite``: its norm is then
    computed from the vector scaled by its largest magnitude (``inf`` only if even that
    overflows), so it is clipped or refused for its size.
    """
    sq = float(np.einsum("i,i->", x, x, dtype=np.float64))
    if math.isfinite(sq):
        return math.sqrt(sq)
    if not np.isfinite(x).all():
        raise UpdateRejected(
            "non_finite", "update contains NaN or infinite values", client_id=client_id, round=round
        )
    peak = float(np.max(np.abs(x)))
    scaled = x / peak
    with np.errstate(over="ignore"):
        return peak * math.sqrt(float(np.einsum("i,i->", scaled, scaled, dtype=np.float64)))


def _clip_scale(norm: float, clip_norm: float) -> float:
    return 1.0 if norm <= clip_norm else (clip_norm / norm) * _CLIP_SHRINK


@dataclass(frozen=True)
class ClipResult:
    """What clipping one update revealed (raw, *not* differentially private)."""

    norm: float
    was_clipped: bool


def clip_to_norm(x: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float, bool]:
    """Flat L2 clip: ``x · min(1, C/‖x‖)`` (McMahan et al. 2018, FlatClip).

    Args:
        x: 1-D float32 or float64 vector; never modified.
        clip_norm: C > 0.

    Returns:
        ``(clipped, norm, was_clipped)``: a new array of x's dtype whose L2 norm is ≤ C, the
        original norm (computed in float64) and whether scaling happened.

    Raises:
        PrivacyError: C is not a finite positive number.
        UpdateRejected: x is not a flat float vector (``wrong_shape``/``wrong_dtype``) or holds
            NaN/inf (``non_finite``).
    """
    clip_norm = _positive("clip_norm", clip_norm)
    _check_vector(x)
    norm = _norm(x)
    scale = _clip_scale(norm, clip_norm)
    if scale == 1.0:
        return x.copy(), norm, False
    # Scale in float64: C/‖x‖ can be far below float32's normal range (‖x‖ ~ 1e38).
    clipped = (x * np.float64(scale)).astype(x.dtype, copy=False)
    for _ in range(4):
        # Outputs in the subnormal range round with a large relative error; re-check the bound.
        out_norm = math.sqrt(float(np.einsum("i,i->", clipped, clipped, dtype=np.float64)))
        if out_norm <= clip_norm:
            return clipped, norm, True
        rescale = np.float64(clip_norm / out_norm * _CLIP_SHRINK)
        clipped = (clipped * rescale).astype(x.dtype, copy=False)
    raise PrivacyError(
        f"cannot clip to clip_norm={clip_norm!r} in {x.dtype}: the bound is below its precision"
    )


def gaussian_noise(dim: int, std: float, rng: RandomSource) -> np.ndarray:
    """Draw ``dim`` i.i.d. N(0, std²) values as float32.

    ``std = 0`` returns zeros without consuming randomness.
    """
    std = _positive("std", std, allow_zero=True)
    if dim < 0:
        raise PrivacyError(f"dim must be >= 0, got {dim}")
    if std == 0.0:
        return np.zeros(dim, dtype=np.float32)
    noise = rng.standard_normal(dim, dtype=np.float32)
    noise *= np.float32(std)
    return noise


def add_gaussian_noise(x: np.ndarray, std: float, rng: RandomSource) -> np.ndarray:
    """Return ``x + N(0, std² I)`` as a new array of x's dtype; x is not modified."""
    _check_vector(x)
    return (x + gaussian_noise(x.shape[0], std, rng)).astype(x.dtype, copy=False)


def secure_generator() -> CryptoRandom:
    """A cryptographically secure random source for deployment noise: AES-256-CTR keyed with
    32 bytes of ``os.urandom``, ratcheting (:class:`~shoal.privacy.csprng.CryptoRandom`).

    Use one per round on the server (or per upload on a device): noise cannot be recomputed
    from a configuration seed, nor predicted from earlier outputs. Central DP in deployment
    also releases on an exact grid with discrete Gaussian noise
    (:mod:`shoal.privacy.discrete_gaussian`), which closes the floating-point attacks on
    textbook samplers (Mironov, "On Significance of the Least Significant Bits for
    Differential Privacy", 2012).
    """
    return CryptoRandom(os.urandom(32))


# --------------------------------------------------------------------------- adaptive clipping


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier left for the update sum after paying for the adaptive-clipping count.

    One round releases two Gaussian sums over the same sampled clients: the update sum
    (sensitivity C, noise z_Δ·C) and the centred count Σ(b_k − ½) (sensitivity ½, noise σ_b, so
    its noise multiplier is 2σ_b). Their composition is one Gaussian mechanism with
    z⁻² = z_Δ⁻² + (2σ_b)⁻², hence z_Δ = (z⁻² − (2σ_b)⁻²)^(−½). Here z is the total multiplier the
    accountant is given and σ_b is the count noise's standard deviation *in clients*
    (default m/20). The relation is the same under replace-one adjacency (both sensitivities
    double).

    Raises:
        PrivacyError: the count noise alone would spend the whole budget (z ≥ 2σ_b).
    """
    z = _positive("noise_multiplier", noise_multiplier)
    sigma_b = _positive("count_noise_std", count_noise_std, allow_zero=True)
    if sigma_b == 0.0:
        raise PrivacyError(
            "count_noise_std must be > 0 for adaptive clipping (0 releases the count exactly)"
        )
    residual = z**-2 - (2.0 * sigma_b) ** -2
    if residual <= 0.0:
        # σ_b giving z_Δ = 1.05·z, as a concrete suggestion
        suggest = z / (2.0 * math.sqrt(1.0 - 1.05**-2))
        raise PrivacyError(
            f"adaptive clipping count noise count_noise_std={sigma_b:g} "
            f"(multiplier 2σ_b={2 * sigma_b:g}) leaves no budget for the update at "
            f"noise_multiplier={z:g}: need 2·count_noise_std > noise_multiplier "
            f"(count_noise_std={suggest:.3g} costs 5% more update noise)"
        )
    return residual**-0.5


def noised_unclipped_fraction(
    unclipped: int,
    num_updates: int,
    expected_clients: float,
    count_noise_std: float,
    rng: RandomSource,
) -> float:
    """DP estimate b̄ of the fraction of updates that were not clipped (TF-Privacy convention).

    ``b̄ = clip((Σ_k (b_k − ½) + N(0, σ_b²)) / m + ½, 0, 1)`` with m the expected number of
    clients (the fixed denominator), so the released value has sensitivity ½/m.
    """
    m = _positive("expected_clients", expected_clients)
    sigma_b = _positive("count_noise_std", count_noise_std, allow_zero=True)
    if not 0 <= unclipped <= num_updates:
        raise PrivacyError(f"unclipped must be in [0, num_updates={num_updates}], got {unclipped}")
    centred = unclipped - 0.5 * num_updates
    noise = float(rng.normal(0.0, sigma_b)) if sigma_b > 0.0 else 0.0
    return min(1.0, max(0.0, (centred + noise) / m + 0.5))


def next_clip_norm(
    clip_norm: float, unclipped_fraction: float, target_quantile: float, learning_rate: float
) -> float:
    """Geometric update C_{t+1} = C_t · exp(−η (b̄ − γ)) (Andrew et al. 2021, eq. 3).

    More updates under the norm than the target quantile (b̄ > γ) shrinks C; fewer grows it.
    """
    return float(clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile)))


@dataclass(frozen=True)
class AdaptiveClipping:
    """Settings for learning the clip norm as a quantile of update norms.

    Attributes:
        target_quantile: γ, the fraction of updates that should be unclipped (0.5 = median).
        learning_rate: η_C of the geometric update.
        count_noise_std: σ_b, std of the noise on the unclipped count in clients; ``None``
            means m/20 (Andrew et al.'s recommendation).
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.target_quantile < 1.0:
            raise PrivacyError(
                f"adaptive.target_quantile must be in (0, 1), got {self.target_quantile!r}"
            )
        _positive("adaptive.learning_rate", self.learning_rate)
        if self.count_noise_std is not None:
            _positive("adaptive.count_noise_std", self.count_noise_std)

    def resolved_count_noise_std(self, expected_clients: float) -> float:
        """σ_b in clients, applying the m/20 default."""
        return self.count_noise_std if self.count_noise_std is not None else expected_clients / 20.0


# --------------------------------------------------------------------------- local DP


@dataclass(frozen=True)
class LocalDP:
    """Each client clips and noises its own update before upload.

    Each upload is a Gaussian mechanism on that client's data alone; there is no amplification
    from sampling or from the server's sum. Local DP compares *any* two inputs of the client,
    so the sensitivity of the clipped update is 2C and the accountant is given z_local/2 per
    release (see :mod:`shoal.privacy.accountant`, ``sampling="local"``), composed over every
    round the client may take part in (worst case: all of them).

    The server should average uploads with uniform weights: example counts sent in the clear
    are outside the guarantee.
    """

    noise_multiplier: float
    clip_norm: float

    def __post_init__(self) -> None:
        _positive("noise_multiplier", self.noise_multiplier)
        _positive("clip_norm", self.clip_norm)

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def privatize(
        self, update: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, ClipResult]:
        """Client side: clip to C, add N(0, (z_local·C)² I). Returns a new array."""
        clipped, norm, was_clipped = clip_to_norm(update, self.clip_norm)
        noise = gaussian_noise(clipped.shape[0], self.noise_std, rng)
        clipped += noise.astype(clipped.dtype, copy=False)
        return clipped, ClipResult(norm=norm, was_clipped=was_clipped)
