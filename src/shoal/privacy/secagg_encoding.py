"""Fixed-point encoding of clipped float updates into the ring Z_{2^b} for secure aggregation.

Secure aggregation (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017; Bell et al., CCS 2020) sums integers modulo 2^b, so each client maps its
float update to integers first:

1. clip every coordinate to [-c, c];
2. shift and scale onto the grid {0, 1, ..., L} with L = 2^v - 1 (v = ``value_bits``), step
   2c / L, using unbiased stochastic rounding (round up with probability equal to the fractional
   part; the randomness is an explicit ``numpy.random.Generator``);
3. multiply by the client's integer weight w in [1, ``max_weight``] and append w itself as one
   extra element, so the server recovers the weighted mean sum(w q) / sum(w) after unmasking.

The ring must hold the sum of n contributions without wrapping: n * max_weight * L < 2^b, i.e.
b >= v + ceil(log2 max_weight) + ceil(log2 n) (for unit weights b >= v + ceil(log2 n)).
:meth:`FixedPoint.ring_bits` gives the smallest such b (at most 64).

Rings of up to 32 bits are held as uint32, larger ones as uint64: arithmetic wraps modulo 2^32 or
2^64, and because 2^b divides both, reducing with a bit mask at the end is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from shoal.errors import ConfigError, ProtocolError, UpdateRejected
from shoal.privacy.csprng import RandomSource

__all__ = ["FixedPoint", "RingEncoding", "pack_ring", "ring_bytes", "ring_dtype", "ring_mask",
           "unpack_ring"]


def ring_dtype(bits: int) -> type[np.unsignedinteger]:
    """The numpy dtype holding Z_{2^bits}: uint32 up to 32 bits, else uint64."""
    if not 1 <= bits <= 64:
        raise ConfigError(f"ring bits must be in [1, 64], got {bits}", key="bits")
    return np.uint32 if bits <= 32 else np.uint64


def ring_mask(bits: int) -> np.unsignedinteger:
    """``2**bits - 1`` as a scalar of :func:`ring_dtype`; ``x & mask`` reduces mod 2^bits."""
    return ring_dtype(bits)((1 << bits) - 1)


def ring_bytes(bits: int) -> int:
    """Bytes per element on the wire: ceil(bits / 8)."""
    ring_dtype(bits)  # validates
    return (bits + 7) // 8


def pack_ring(vector: np.ndarray, bits: int) -> bytes:
    """A ring vector as ``ceil(bits/8)`` little-endian bytes per element (a 36-bit ring
    travels in 5 bytes per element, not 8). Entries must already be reduced mod 2^bits."""
    dtype = np.dtype(ring_dtype(bits)).newbyteorder("<")
    v = np.ascontiguousarray(vector, dtype=dtype)
    width = ring_bytes(bits)
    if width == dtype.itemsize:
        return v.tobytes()
    return np.ascontiguousarray(v.view(np.uint8).reshape(-1, dtype.itemsize)[:, :width]).tobytes()


def unpack_ring(data: bytes | bytearray | memoryview, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_ring`, validating first.

    Raises:
        ProtocolError: ``data`` is not ``length`` elements of ``ceil(bits/8)`` bytes, or an
            element lies outside [0, 2^bits).
    """
    dtype = np.dtype(ring_dtype(bits)).newbyteorder("<")
    width = ring_bytes(bits)
    if len(data) != length * width:
        raise ProtocolError(f"a {bits}-bit ring vector of {length} elements takes "
                            f"{length * width} bytes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8).reshape(length, width)
    wide = np.zeros((length, dtype.itemsize), dtype=np.uint8)
    wide[:, :width] = raw
    out = wide.view(dtype).reshape(length).astype(ring_dtype(bits))
    if bits < 8 * dtype.itemsize and bool((out > ring_mask(bits)).any()):
        raise ProtocolError(f"ring vector has entries outside [0, 2^{bits})")
    return out


class RingEncoding(Protocol):
    """How a client's float update becomes a ring vector and the unmasked sum a mean:
    :class:`FixedPoint`, or a round of the rotated encoding
    (:class:`~shoal.privacy.rotated_encoding.RoundEncoding`)."""

    @property
    def max_weight(self) -> int: ...

    @property
    def noised(self) -> bool:
        """Whether every client adds its own noise share (distributed DP) before masking."""
        ...

    def ring_bits(self, n_clients: int) -> int: ...

    def length(self, dim: int) -> int: ...

    def encode(self, x: np.ndarray, weight: int, bits: int, rng: RandomSource
               ) -> np.ndarray: ...

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int]: ...


@dataclass(frozen=True)
class FixedPoint:
    """Clip, quantize and weight float vectors into Z_{2^b}, and decode the masked sum.

    Attributes:
        clip: c > 0; coordinates are clipped to [-c, c].
        value_bits: v; each coordinate becomes an integer in [0, 2^v - 1].
        max_weight: the largest integer weight a client may use (1 for an unweighted mean).
    """

    clip: float
    value_bits: int = 16
    max_weight: int = 1
    #: clients add no noise of their own
    noised: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip must be finite and > 0, got {self.clip}", key="clip")
        if not 1 <= self.value_bits <= 52:
            raise ConfigError(
                f"value_bits must be in [1, 52], got {self.value_bits}", key="value_bits"
            )
        if self.max_weight < 1:
            raise ConfigError(f"max_weight must be >= 1, got {self.max_weight}", key="max_weight")

    @property
    def levels(self) -> int:
        """L = 2^v - 1, the largest quantized value."""
        return (1 << self.value_bits) - 1

    @property
    def step(self) -> float:
        """Grid spacing 2c / L; also the bound on |decoded mean - clipped weighted mean|."""
        return 2.0 * self.clip / self.levels

    def length(self, dim: int) -> int:
        """Ring elements per client: the d values, then the weight."""
        return dim + 1

    def ring_bits(self, n_clients: int) -> int:
        """Smallest b with n * max_weight * L < 2^b, so the sum of n inputs cannot wrap.

        Raises:
            ConfigError: ``n_clients < 1`` or more than 64 bits would be needed.
        """
        if n_clients < 1:
            raise ConfigError(f"n_clients must be >= 1, got {n_clients}", key="n_clients")
        bits = (n_clients * self.max_weight * self.levels).bit_length()
        if bits > 64:
            raise ConfigError(
                f"{n_clients} clients x max_weight {self.max_weight} x 2^{self.value_bits} levels "
                f"needs a {bits}-bit ring; at most 64 is supported "
                "(lower value_bits or max_weight)",
                key="value_bits",
            )
        return bits

    def encode(
        self, x: np.ndarray, weight: int, bits: int, rng: RandomSource
    ) -> np.ndarray:
        """Quantize ``x`` (length d) into a ring vector of length d + 1: ``w*q`` then ``w``.

        Args:
            x: float update (any float dtype); not modified.
            weight: integer weight w in [1, max_weight] (e.g. the number of examples).
            bits: ring size b, at least ``ring_bits(n)`` for the round's n.
            rng: source of the stochastic-rounding coins.

        Raises:
            UpdateRejected: ``x`` is not a finite 1-D vector.
            ConfigError: weight out of range or ring too small for one weighted value.
        """
        x = np.asarray(x)
        if x.ndim != 1:
            raise UpdateRejected("wrong_shape", f"expected a 1-D vector, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise UpdateRejected("non_finite", "update contains NaN or infinity")
        if int(weight) != weight or not 1 <= weight <= self.max_weight:
            raise ConfigError(
                f"weight must be an integer in [1, max_weight={self.max_weight}], got {weight}",
                key="weight",
            )
        dtype = ring_dtype(bits)
        if (self.max_weight * self.levels).bit_length() > bits:
            raise ConfigError(f"a {bits}-bit ring cannot hold one weighted value", key="bits")
        # In place on one float64 buffer: this runs once per client per round on the whole
        # model. floor(s + u), u ~ U[0, 1), rounds s up with probability frac(s) (unbiased).
        q = np.clip(x, -self.clip, self.clip, out=np.empty(x.shape, dtype=np.float64))
        q += self.clip
        q *= self.levels / (2.0 * self.clip)
        q += rng.random(q.shape)
        np.floor(q, out=q)
        np.minimum(q, self.levels, out=q)  # guards float rounding at the top edge
        out = np.empty(x.shape[0] + 1, dtype=dtype)
        out[:-1] = q
        if weight != 1:
            out[:-1] *= dtype(weight)
        out[-1] = weight
        return out

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """Weighted mean (float64, length d) and total weight from the unmasked ring sum.

        Raises:
            ProtocolError: the total weight is zero (nothing was aggregated).
        """
        weight = int(total[-1])
        if weight <= 0:
            raise ProtocolError("aggregate has zero total weight")
        mean = total[:-1].astype(np.float64) * (self.step / weight) - self.clip
        return mean, weight
