"""Few-bit integer encoding of updates for secure aggregation: clip, rotate, scale, round, (noise).

The client step of P. Kairouz, Z. Liu and T. Steinke, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation" (ICML 2021), Algorithm 1, written
once for two uses:

* **compression** (``noise_std = 0``): an update enters a ring of b bits (8 is one byte per
  parameter, against five for the default fixed point of :mod:`.secagg_encoding`);
* **distributed DP** (``noise_std > 0``, :mod:`.ddg`): every client also adds its share of
  discrete Gaussian noise before masking, so the unmasked sum is already private.

:func:`privatize_and_encode` is the pure function a client (simulated, or a device's runtime)
calls; :func:`decode_sum` is the server's inverse on the unmasked ring sum. Steps:

1. clip x to L2 norm c;
2. rotate with the round's shared :class:`~shoal.privacy.rotation.Rotation` (length D);
3. scale by 1/γ;
4. round each coordinate to a neighbouring integer at random (up with probability equal to
   the fractional part: unbiased); with ``norm_bound`` set, *conditionally*: draw again until
   the rounded vector's L2 norm is at most ``norm_bound``, the bound the privacy analysis
   uses (the paper's conditional randomized rounding);
5. add a discrete Gaussian N_Z(0, σ²) per coordinate (distributed DP only);
6. reduce modulo 2^b and append 1 (so the sum carries its own count).

The server maps each summed coordinate back to [-2^(b-1), 2^(b-1)), multiplies by γ and
un-rotates. γ is chosen (:func:`plan_quantization`) so that the sum of n contributions stays
inside the ring with probability about 1 - :data:`WRAP_PROBABILITY` per round: the sum's
coordinates are sub-Gaussian (flattened signal of norm at most n·c, n rounding errors of
variance at most 1/4, n noise shares of variance σ²), and k standard deviations with
2·D·exp(-k²/2) = p fit in half the ring. A coordinate that does wrap is off by 2^b γ (the
paper's modular clipping); privacy does not depend on it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from shoal.errors import ConfigError, PrivacyError, ProtocolError, UpdateRejected
from shoal.privacy.csprng import RandomSource
from shoal.privacy.discrete_gaussian import discrete_gaussian
from shoal.privacy.rotation import BLOCK, Rotation, padded_dim
from shoal.privacy.secagg_encoding import ring_bytes, ring_dtype

__all__ = ["MIN_GRID_SIGMA", "WRAP_PROBABILITY", "RotatedQuantization", "RotatedPlan",
           "RoundEncoding", "decode_sum", "plan_quantization", "privatize_and_encode",
           "rounding_bound"]

#: the chance per round that some coordinate of the sum wraps around the ring (sizing target)
WRAP_PROBABILITY = 2.0**-10
#: β of conditional randomized rounding: with ``norm_bound`` >= :func:`rounding_bound`, a
#: draw is accepted with probability at least 1 - β (the paper's experiments use e^-0.5)
BETA = math.exp(-0.5)
#: smallest noise scale in grid units a noised encoding may use; the accountant of
#: :mod:`.ddg_accounting` assumes at least this much (it bounds the paper's tau term)
MIN_GRID_SIGMA = 4.0
_MAX_ROUNDING_DRAWS = 64


@dataclass(frozen=True)
class RotatedQuantization:
    """What every client of a round must agree on to encode into the ring.

    Attributes:
        dim: d, the update's length.
        clip: c, the L2 norm each client clips its update to (real units).
        bits: b, the ring is Z_{2^b} (2..32).
        gamma: γ, the grid step (real units per integer).
        noise_std: σ, each client's discrete Gaussian noise in grid units (0: no noise).
        norm_bound: conditional rounding's bound on the rounded vector's L2 norm, in grid
            units; ``None`` rounds unconditionally.
        block: the rotation's largest Hadamard block.
    """

    dim: int
    clip: float
    bits: int
    gamma: float
    noise_std: float = 0.0
    norm_bound: float | None = None
    block: int = BLOCK

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ConfigError(f"dim must be an int >= 1, got {self.dim!r}", key="dim")
        for name, value in (("clip", self.clip), ("gamma", self.gamma)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be finite and > 0, got {value!r}", key=name)
        if not 2 <= self.bits <= 32:
            raise ConfigError(f"bits must be in [2, 32], got {self.bits!r}", key="bits")
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ConfigError(f"noise_std must be finite and >= 0, got {self.noise_std!r}",
                              key="noise_std")
        if self.norm_bound is not None and not (math.isfinite(self.norm_bound)
                                                and self.norm_bound > 0):
            raise ConfigError(f"norm_bound must be finite and > 0, got {self.norm_bound!r}",
                              key="norm_bound")

    @property
    def padded(self) -> int:
        """D, the rotated length."""
        return padded_dim(self.dim, self.block)

    @property
    def length(self) -> int:
        """Ring elements per client: D, then the count."""
        return self.padded + 1

    @property
    def upload_bytes(self) -> int:
        """Bytes of one masked upload packed at ceil(b/8) bytes per element."""
        return ring_bytes(self.bits) * self.length


def rounding_bound(scaled_norm: float, dim: int, beta: float = BETA) -> float:
    """An L2 bound that randomized rounding of a vector of norm ``scaled_norm`` (grid units)
    in ``dim`` coordinates exceeds with probability at most ``beta``:
    sqrt(r² + D/4 + sqrt(2 ln(1/β)) (r + sqrt(D)/2)), capped by r + sqrt(D) (Kairouz et al.
    2021, conditional randomized rounding)."""
    r, d = float(scaled_norm), float(dim)
    tail = math.sqrt(r * r + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (r + math.sqrt(d) / 2))
    return min(r + math.sqrt(d), tail)


def plan_quantization(dim: int, clients: int, bits: int, clip: float, *,
                      noise_std: float = 0.0, slack: float | None = None,
                      block: int = BLOCK) -> RotatedQuantization:
    """Choose γ for a sum of ``clients`` contributions in a ``bits``-bit ring.

    Args:
        dim: d.
        clients: n, the contributions the ring must hold (the round's roster).
        bits: b.
        clip: c (real units).
        noise_std: each client's noise std in real units (0: compression only).
        slack: η; with a value, conditional rounding bounds every rounded vector by
            (1 + η)·c/γ (distributed DP's sensitivity).
        block: the rotation's largest block.

    Raises:
        ConfigError: the ring is too narrow: n rounding errors alone fill it, conditional
            rounding cannot meet (1 + η)·c/γ with probability 1 - β for this d, or the
            noise would be coarser than :data:`MIN_GRID_SIGMA` grid steps (the message
            says to raise ``secure_aggregation.ring_bits``).
    """
    if clients < 1:
        raise ConfigError(f"clients must be >= 1, got {clients}", key="clients")
    big_d = padded_dim(dim, block)
    k = math.sqrt(2 * math.log(2 * big_d / WRAP_PROBABILITY))
    room = (2.0 ** (bits - 1) / k) ** 2 - clients / 4
    if room <= 0:
        raise ConfigError(f"a {bits}-bit ring cannot hold the sum of {clients} rounded "
                          f"vectors; raise secure_aggregation.ring_bits",
                          key="secure_aggregation.ring_bits")
    spread = (clients * clip) ** 2 / big_d + clients * noise_std ** 2
    gamma = math.sqrt(spread / room)
    sigma = noise_std / gamma
    bound = None
    if slack is not None:
        bound = (1 + slack) * clip / gamma
        if rounding_bound(clip / gamma, big_d) > bound:
            raise ConfigError(f"a {bits}-bit ring is too coarse for {dim} parameters under "
                              f"distributed DP: rounding cannot keep the norm within "
                              f"{1 + slack:g} C; raise secure_aggregation.ring_bits",
                              key="secure_aggregation.ring_bits")
    if noise_std > 0 and sigma < MIN_GRID_SIGMA:
        raise ConfigError(f"a {bits}-bit ring leaves the noise only {sigma:.3g} grid steps "
                          f"wide (at least {MIN_GRID_SIGMA:g} are needed); raise "
                          f"secure_aggregation.ring_bits", key="secure_aggregation.ring_bits")
    return RotatedQuantization(dim=dim, clip=clip, bits=bits, gamma=gamma, noise_std=sigma,
                               norm_bound=bound, block=block)


@functools.lru_cache(maxsize=2)
def _rotation(dim: int, seed: bytes, block: int) -> Rotation:
    # every client of a simulated round shares it; building one sorts D keys
    return Rotation(dim, seed, block)


def _round(scaled: np.ndarray, bound: float | None, rng: RandomSource) -> np.ndarray:
    floor = np.floor(scaled)
    frac = scaled - floor
    # a small relative margin: the norm is summed in float64, the bound must hold exactly
    limit = None if bound is None else bound * bound * (1 - 1e-9)
    for _ in range(_MAX_ROUNDING_DRAWS):
        r = floor + (rng.random(scaled.shape[0]) < frac)
        if limit is None or float(r @ r) <= limit:
            return r.astype(np.int64)
    raise PrivacyError(f"conditional rounding found no draw within the norm bound in "
                       f"{_MAX_ROUNDING_DRAWS} tries (is the bound below the rounding "
                       f"bound of the plan?)")


def privatize_and_encode(delta: np.ndarray, round_seed: bytes, params: RotatedQuantization,
                         rng: RandomSource) -> np.ndarray:
    """A client's update as its ring vector (before masking): steps 1-6 of the module.

    Args:
        delta: the update, a finite float vector of length ``params.dim``; not modified.
        round_seed: the round's 32-byte rotation seed (the same for every client).
        params: the round's quantization (from the server).
        rng: rounding coins and noise (a CSPRNG such as
            :class:`~shoal.privacy.csprng.CryptoRandom` on a device; the run's seeded
            generator in simulation).

    Returns:
        ``uint32`` vector of ``params.length`` entries in [0, 2^b): the rotated, rounded,
        noised update mod 2^b, then 1.

    Raises:
        UpdateRejected: ``delta`` is not a finite vector of length d.
        PrivacyError: conditional rounding failed (parameters that
            :func:`plan_quantization` would refuse).
    """
    x = np.asarray(delta)
    if x.shape != (params.dim,):
        raise UpdateRejected("wrong_shape", f"expected a vector of {params.dim} values, got "
                             f"shape {x.shape}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise UpdateRejected("non_finite", "update contains NaN or infinity")
    norm = math.sqrt(float(x @ x))
    if norm > params.clip:
        x *= params.clip / norm
    scaled = _rotation(params.dim, round_seed, params.block).forward(x)
    scaled *= 1.0 / params.gamma
    ints = _round(scaled, params.norm_bound, rng)
    if params.noise_std > 0:
        ints += discrete_gaussian(params.noise_std, ints.shape[0], rng)
    dtype = ring_dtype(params.bits)
    out = np.empty(params.length, dtype=dtype)
    out[:-1] = ints & ((1 << params.bits) - 1)
    out[-1] = 1
    return out


def decode_sum(total: np.ndarray, round_seed: bytes, params: RotatedQuantization
               ) -> tuple[np.ndarray, int]:
    """The server's inverse on the unmasked ring sum: (sum of the clients' clipped updates
    plus their noise, float64 of length d; how many clients are in it).

    Raises:
        ProtocolError: ``total`` has the wrong length, or no client is in it.
    """
    total = np.asarray(total)
    if total.shape != (params.length,):
        raise ProtocolError(f"a ring sum of {params.length} elements was expected, got "
                            f"shape {total.shape}")
    count = int(total[-1])
    if count <= 0:
        raise ProtocolError("aggregate has no client in it")
    half, full = 1 << (params.bits - 1), 1 << params.bits
    signed = total[:-1].astype(np.int64)
    signed[signed >= half] -= full
    rotated = signed.astype(np.float64) * params.gamma
    return _rotation(params.dim, round_seed, params.block).inverse(rotated), count


@dataclass(frozen=True)
class RoundEncoding:
    """One round's rotated encoding behind the ring-encoding interface of
    :class:`~shoal.privacy.secagg_encoding.FixedPoint` (``ring_bits``, ``length``,
    ``encode``, ``decode``), so the SecAgg+ driver runs either. Clients weigh 1."""

    params: RotatedQuantization
    seed: bytes
    max_weight: ClassVar[int] = 1

    def ring_bits(self, n_clients: int) -> int:
        """b, once the count element can hold ``n_clients``.

        Raises:
            ConfigError: ``n_clients`` does not fit in b bits.
        """
        if not 1 <= n_clients < (1 << self.params.bits):
            raise ConfigError(f"a {self.params.bits}-bit ring cannot count {n_clients} "
                              f"clients", key="secure_aggregation.ring_bits")
        return self.params.bits

    def length(self, dim: int) -> int:
        if dim != self.params.dim:
            raise ConfigError(f"the round's encoding is for {self.params.dim} values, not "
                              f"{dim}", key="dim")
        return self.params.length

    def encode(self, x: np.ndarray, weight: int, bits: int, rng: RandomSource
               ) -> np.ndarray:
        """:func:`privatize_and_encode` (``weight`` must be 1, ``bits`` the plan's)."""
        if weight != 1 or bits != self.params.bits:
            raise ConfigError(f"the rotated encoding weighs every client 1 in a "
                              f"{self.params.bits}-bit ring, got weight {weight} and "
                              f"{bits} bits", key="weight")
        return privatize_and_encode(x, self.seed, self.params, rng)

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """(mean of the included clients' contributions, their count)."""
        vector, count = decode_sum(total, self.seed, self.params)
        return vector / count, count

    @property
    def noised(self) -> bool:
        """Whether every client adds a discrete Gaussian share (distributed DP)."""
        return self.params.noise_std > 0


@dataclass(frozen=True)
class RotatedPlan:
    """How a run encodes every round: ring bits, clip, each client's noise (real units; 0
    for compression only) and the conditional-rounding slack (``None``: plain rounding).
    :meth:`for_round` chooses γ for the round's roster and binds its rotation seed."""

    bits: int
    clip: float
    noise_std: float = 0.0
    slack: float | None = None
    block: int = BLOCK

    def for_round(self, dim: int, clients: int, seed: bytes) -> RoundEncoding:
        """The encoding of one round (see :func:`plan_quantization` for what it raises)."""
        return RoundEncoding(plan_quantization(dim, clients, self.bits, self.clip,
                                               noise_std=self.noise_std, slack=self.slack,
                                               block=self.block), seed)
