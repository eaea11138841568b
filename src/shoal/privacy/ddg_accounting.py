"""Rényi-DP accounting of the distributed discrete Gaussian under fixed-size client sampling.

The sum of n independent discrete Gaussians N_Z(0, σ²) is close to, but not exactly, a
discrete Gaussian of variance nσ². P. Kairouz, Z. Liu and T. Steinke, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation" (ICML 2021) bound
the Rényi divergence of that sum shifted by an integer vector Δ (||Δ||₂ ≤ Δ₂, D coordinates)
for every order α:

    D_α ≤ min( α Δ₂² / (2nσ²) + τD ,  α/2 · (Δ₂/(√n σ) + τ√D)² ),
    τ = 10 · Σ_{k=1}^{n-1} exp(-2π²σ² · k/(k+1)),

(their bound has a third term, with the L1 norm; dropping a term of a minimum keeps a valid
bound). The first term is the Gaussian's α/(2z²), z = √n σ / Δ₂, plus τD; as σ grows τ
vanishes and the sum is the Gaussian it approaches. :func:`ddg_rdp` is this bound.

A round samples m of the N clients without replacement, the relation is replace-one (one
client's rounded vector of norm at most Δ₂ swapped for another's: Δ₂ doubles), and the
subsampled bound is the general one of Y.-X. Wang, B. Balle and S. Kasiviswanathan,
"Subsampled Rényi Differential Privacy and Analytical Moments Accountant" (AISTATS 2019,
Theorem 9) for a mechanism with ε(∞) = ∞, at integer orders:

    ε'(α) ≤ 1/(α-1) · log(1 + γ² C(α,2) min(4(e^{ε(2)} - 1), 2e^{ε(2)})
                              + Σ_{j=3..α} 2 γ^j C(α,j) e^{(j-1)ε(j)}),   γ = m/N,

and never more than ε(α) itself. Rounds compose by adding RDP; the conversion to (ε, δ) is
dp-accounting's (``compute_epsilon``: Canonne, Kamath and Steinke 2020 / Balle et al. 2020),
the same the central accountant uses. With τ → 0 this reproduces dp-accounting's own
``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z/2))`` wherever its strengthened
bound (Theorem 27 of Wang et al.) does not bind -- which the tests check.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.errors import PrivacyError

__all__ = ["ORDERS", "DistributedEvent", "ddg_rdp", "distributed_epsilon", "tau",
           "wor_subsampled_rdp"]

#: integer Rényi orders (the subsampling bound is stated for integers)
ORDERS: tuple[int, ...] = (*range(2, 257), 320, 384, 512, 768, 1024)
KIND = "distributed_discrete_gaussian"


def tau(sigma: float, shares: int) -> float:
    """τ of Kairouz et al. for ``shares`` discrete Gaussians of scale ``sigma`` (grid units):
    10 Σ_{k=1}^{n-1} exp(-2π²σ² k/(k+1)); 0 for one share (a single discrete Gaussian is
    exact)."""
    k = np.arange(1, shares, dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1)).sum())


def ddg_rdp(orders: Sequence[float] | np.ndarray, l2_scale: float, tau_: float,
            dim: int) -> np.ndarray:
    """The bound of the module docstring at each order, for sensitivity over the sum's noise
    scale ``l2_scale`` = Δ₂ / (√n σ)."""
    a = np.asarray(orders, dtype=np.float64)
    first = a * l2_scale**2 / 2 + tau_ * dim
    third = a / 2 * (l2_scale + tau_ * math.sqrt(dim)) ** 2
    return np.minimum(first, third)


@functools.lru_cache(maxsize=4)
def _log_factorials(top: int) -> np.ndarray:
    return np.array([math.lgamma(i + 1) for i in range(top + 1)])


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.exp(x - m).sum()))


def wor_subsampled_rdp(orders: Sequence[int], q: float, rdp: np.ndarray) -> np.ndarray:
    """Theorem 9 of Wang, Balle and Kasiviswanathan (2019) at integer ``orders`` for sampling
    rate ``q`` of a mechanism whose RDP at order j is ``rdp[j]`` (indexable up to
    max(orders); ε(∞) = ∞), never above the unsampled ``rdp``.

    Raises:
        PrivacyError: an order below 2 or not an integer, or q outside (0, 1].
    """
    if not 0 < q <= 1:
        raise PrivacyError(f"sampling rate must be in (0, 1], got {q!r}")
    out = np.empty(len(orders))
    lf = _log_factorials(int(max(orders)))
    for i, alpha in enumerate(orders):
        if alpha != int(alpha) or alpha < 2:
            raise PrivacyError(f"orders must be integers >= 2, got {alpha!r}")
        alpha = int(alpha)
        if q == 1:
            out[i] = rdp[alpha]
            continue
        e2 = float(rdp[2])
        log_comb = lf[alpha] - lf[: alpha + 1] - lf[alpha::-1]  # log C(alpha, j), j = 0..alpha
        second = (2 * math.log(q) + float(log_comb[2])
                  + min(math.log(4) + math.log(math.expm1(e2)) if e2 > 0 else -math.inf,
                        math.log(2) + e2))
        j = np.arange(3, alpha + 1, dtype=np.float64)
        rest = math.log(2) + j * math.log(q) + log_comb[3:] + (j - 1) * rdp[3:alpha + 1]
        total = _logsumexp(np.concatenate([[0.0, second], rest]))
        out[i] = min(float(total) / (alpha - 1), float(rdp[alpha]))
    return out


@dataclass(frozen=True)
class DistributedEvent:
    """One round of the distributed discrete Gaussian for the ledger.

    Attributes:
        noise_multiplier: z = √h σ / Δ₂, the Gaussian the noise approaches (noise std of h
            shares over the rounded vector's norm bound).
        honest: h, the fewest noise shares in a released sum.
        grid_sigma: a lower bound on σ in grid units (it bounds τ).
        dim: an upper bound on D, the noised coordinates (it bounds τD).
        sample_size, population: m of N clients per round, without replacement.
    """

    noise_multiplier: float
    honest: int
    grid_sigma: float
    dim: int
    sample_size: int
    population: int
    sampling: str = "fixed_size"

    def __post_init__(self) -> None:
        z = self.noise_multiplier
        if not (isinstance(z, (int, float)) and math.isfinite(z) and z > 0):
            raise PrivacyError(f"noise_multiplier must be finite and > 0, got {z!r}")
        if self.honest < 1:
            raise PrivacyError(f"honest must be >= 1, got {self.honest!r}")
        if not (math.isfinite(self.grid_sigma) and self.grid_sigma >= 0.5):
            raise PrivacyError(f"the bound needs grid_sigma >= 1/2, got {self.grid_sigma!r}")
        if self.dim < 1:
            raise PrivacyError(f"dim must be >= 1, got {self.dim!r}")
        if not 1 <= self.sample_size <= self.population:
            raise PrivacyError(f"fixed-size sampling needs 1 <= sample_size <= population, "
                               f"got {self.sample_size!r} of {self.population!r}")
        if self.sampling != "fixed_size":
            raise PrivacyError(f"distributed DP is accounted for fixed-size sampling only, "
                               f"got {self.sampling!r}")

    @property
    def q(self) -> float:
        return self.sample_size / self.population

    @property
    def neighboring_relation(self) -> str:
        return "replace_one"

    def rdp(self, orders: Sequence[int] = ORDERS) -> np.ndarray:
        """RDP of one round at ``orders`` (replace-one: the sensitivity is 2Δ₂)."""
        top = int(max(orders))
        every = ddg_rdp(np.arange(top + 1), 2.0 / self.noise_multiplier,
                        tau(self.grid_sigma, self.honest), self.dim)
        return wor_subsampled_rdp(orders, self.q, every)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "noise_multiplier": self.noise_multiplier,
                "honest": self.honest, "grid_sigma": self.grid_sigma, "dim": self.dim,
                "sampling": self.sampling, "sample_size": self.sample_size,
                "population": self.population}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DistributedEvent:
        return cls(noise_multiplier=float(d["noise_multiplier"]), honest=int(d["honest"]),
                   grid_sigma=float(d["grid_sigma"]), dim=int(d["dim"]),
                   sample_size=int(d["sample_size"]), population=int(d["population"]))


@functools.lru_cache(maxsize=256)
def _rdp(event: DistributedEvent) -> np.ndarray:
    return event.rdp(ORDERS)


def distributed_epsilon(entries: Sequence[tuple[DistributedEvent, int]], delta: float) -> float:
    """ε at ``delta`` of ``count`` rounds of each event (RDP composition, then
    dp-accounting's conversion).

    Raises:
        PrivacyError: dp-accounting is not installed.
    """
    if not entries:
        return 0.0
    try:
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise PrivacyError("privacy accounting needs the dp-accounting package: pip "
                           "install 'shoal[privacy]'") from exc
    total = sum((n * _rdp(event) for event, n in entries), np.zeros(len(ORDERS)))
    eps, _ = compute_epsilon(ORDERS, total, delta)
    return float(eps)
