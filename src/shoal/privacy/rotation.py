"""A random rotation shared by a round's clients: the randomized Hadamard transform.

Before an update is quantized into the few bits of a secure-aggregation ring it is rotated,
so that its energy is spread evenly over the coordinates and no coordinate is much larger
than ||x|| / sqrt(D): the ring then needs room for the typical coordinate, not for the
largest. The rotation is the randomized Hadamard transform -- random signs, then the
normalized Walsh-Hadamard matrix -- of N. Ailon and B. Chazelle, "Approximate Nearest
Neighbors and the Fast Johnson-Lindenstrauss Transform" (STOC 2006), used before
quantization by A. T. Suresh, F. X. Yu, S. Kumar and H. B. McMahan, "Distributed Mean
Estimation with Limited Communication" (ICML 2017), and before modular arithmetic by
P. Kairouz, Z. Liu and T. Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation" (ICML 2021).

Those papers pad d to the next power of two, which for the 2NN (d = 199,210) adds 32 % to
every upload. Here the vector is padded only to a multiple of a block B (a power of two, at
most :data:`BLOCK`), signed, permuted at random and transformed blockwise by H_B / sqrt(B):
the permutation spreads every layer over all blocks, so each block holds about B / D of the
energy and its coordinates are as flat as a full transform's. Every step is orthogonal, so the
transform preserves the L2 norm (which is all the privacy analysis uses) and its inverse is its
transpose. The signs and the permutation come from AES-CTR keystreams of the round's 32-byte
seed, so every client and the server derive the same rotation on any platform; the rotation is
public (it protects nothing, it only flattens).
"""

from __future__ import annotations

import math

import numpy as np

from shoal.errors import ConfigError
from shoal.privacy import crypto

__all__ = ["BLOCK", "Rotation", "block_size", "padded_dim", "rotation_seed"]

#: the largest Hadamard block: padding stays under 1 % for models of a few hundred thousand
#: parameters and more (199,210 -> 200,704)
BLOCK = 4096

_SIGNS = b"shoal rotation signs"
_ORDER = b"shoal rotation permutation"
_FROM_SESSION = b"shoal rotation seed"


def block_size(dim: int, block: int = BLOCK) -> int:
    """B: the smallest power of two >= ``dim``, capped at ``block``.

    Raises:
        ConfigError: ``dim < 1`` or ``block`` is not a power of two.
    """
    if dim < 1:
        raise ConfigError(f"dim must be >= 1, got {dim}", key="dim")
    if block < 1 or block & (block - 1):
        raise ConfigError(f"block must be a power of two, got {block}", key="block")
    return min(block, 1 << (dim - 1).bit_length())


def padded_dim(dim: int, block: int = BLOCK) -> int:
    """D: ``dim`` rounded up to a multiple of :func:`block_size`."""
    b = block_size(dim, block)
    return b * math.ceil(dim / b)


def rotation_seed(session: bytes) -> bytes:
    """A round's 32-byte rotation seed derived from its secure-aggregation session nonce
    (HKDF-SHA256), so a deployment needs no extra message to share it."""
    return crypto.derive_key(session, salt=b"", info=_FROM_SESSION)


def _hadamard_rows_inplace(x: np.ndarray) -> np.ndarray:
    """Unnormalized fast Walsh-Hadamard transform of every row of ``x`` (rows of a power-of-two
    length), in place: log2(B) passes of butterflies over the whole array."""
    rows, b = x.shape
    h = 1
    while h < b:
        v = x.reshape(rows, b // (2 * h), 2, h)
        a = v[:, :, 0, :].copy()
        v[:, :, 0, :] += v[:, :, 1, :]
        a -= v[:, :, 1, :]
        v[:, :, 1, :] = a
        h *= 2
    return x


class Rotation:
    """The rotation of one round for vectors of length ``dim``.

    Args:
        dim: d, the length of the vectors rotated.
        seed: the round's 32 bytes (:func:`rotation_seed`, or any shared random value).
        block: the largest Hadamard block (a power of two).

    Raises:
        ConfigError: bad ``dim`` or ``block``.
        ProtocolError: ``seed`` is not 32 bytes.
    """

    def __init__(self, dim: int, seed: bytes, block: int = BLOCK) -> None:
        self.dim = int(dim)
        self.block = block_size(self.dim, block)
        self.padded = padded_dim(self.dim, block)
        bits = crypto.prg_uint(crypto.derive_key(seed, salt=b"", info=_SIGNS), self.padded, 1)
        self.signs = 1.0 - 2.0 * bits.astype(np.float64)  # +1 / -1
        keys = crypto.prg_uint(crypto.derive_key(seed, salt=b"", info=_ORDER), self.padded, 64)
        #: position j of the rotated vector reads coordinate order[j] (ties: by index)
        self.order = np.argsort(keys, kind="stable")

    def forward(self, x: np.ndarray) -> np.ndarray:
        """R x: a new float64 vector of length D (``x`` of length d is padded with zeros).

        Raises:
            ConfigError: ``x`` is not a vector of length d.
        """
        x = np.asarray(x)
        if x.shape != (self.dim,):
            raise ConfigError(f"expected a vector of {self.dim} values, got shape {x.shape}",
                              key="x")
        v = np.zeros(self.padded, dtype=np.float64)
        v[:self.dim] = x
        v *= self.signs
        y = _hadamard_rows_inplace(v[self.order].reshape(-1, self.block))
        y *= 1.0 / math.sqrt(self.block)
        return y.reshape(self.padded)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """R^T y: the first d coordinates of the un-rotated vector (float64).

        Raises:
            ConfigError: ``y`` is not a vector of length D.
        """
        y = np.asarray(y)
        if y.shape != (self.padded,):
            raise ConfigError(f"expected a rotated vector of {self.padded} values, got shape "
                              f"{y.shape}", key="y")
        w = _hadamard_rows_inplace(np.array(y, dtype=np.float64).reshape(-1, self.block))
        w *= 1.0 / math.sqrt(self.block)
        v = np.empty(self.padded, dtype=np.float64)
        v[self.order] = w.reshape(self.padded)
        v *= self.signs
        return v[:self.dim]
