"""A cryptographically secure random source with the numpy ``Generator`` methods shoal uses.

:class:`CryptoRandom` draws every value from the AES-256-CTR keystream of
:func:`shoal.privacy.crypto.keystream_into` (AES-NI through OpenSSL, several GB/s), keyed with
32 bytes from ``os.urandom``. Each draw ratchets the key: the first 32 bytes of the stream
become the next key and are never output, so a state captured later reveals nothing drawn
before (forward secrecy), and no output ever reveals the state (unlike PCG64, whose 128-bit
state can be recovered from its outputs).

It answers the subset of ``numpy.random.Generator`` that deployment randomness goes through:
``random``, ``uniform``, ``integers``, ``choice`` (without ``p``), ``standard_normal``,
``normal``, ``bytes``. Normal variates use the Box-Muller transform on 53-bit uniforms, in
float64; privacy-critical noise is drawn on an integer grid by
:mod:`shoal.privacy.discrete_gaussian` instead, which closes the floating-point attacks on
textbook samplers (I. Mironov, "On Significance of the Least Significant Bits for
Differential Privacy", CCS 2012). Simulation keeps numpy's seeded generators: reproducible,
and nobody there is an adversary.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from shoal.errors import PrivacyError
from shoal.privacy.crypto import KEY_BYTES, keystream_into

__all__ = ["CryptoRandom", "RandomSource"]

_U53 = float(2.0**-53)


def _count(size: int | tuple[int, ...] | None) -> tuple[int, tuple[int, ...] | None]:
    if size is None:
        return 1, None
    shape = (size,) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    if any(s < 0 for s in shape):
        raise PrivacyError(f"size must be non-negative, got {size!r}")
    return int(np.prod(shape, dtype=np.int64)), shape


def _shaped(values: np.ndarray, shape: tuple[int, ...] | None) -> Any:
    return values[0].item() if shape is None else values.reshape(shape)


class CryptoRandom:
    """A CSPRNG with numpy-``Generator``-style methods (see the module docstring).

    Args:
        key: a 32-byte starting key, for tests and known-answer checks only; by default 32
            bytes from ``os.urandom``. Two instances with the same key produce the same
            stream.

    Not thread-safe: give each thread its own.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = os.urandom(KEY_BYTES)
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise PrivacyError(f"CryptoRandom needs a {KEY_BYTES}-byte key")
        self._key = bytes(key)

    def __repr__(self) -> str:  # never show the key
        return "CryptoRandom()"

    # -- raw output --------------------------------------------------------------------------

    def _words(self, n: int) -> np.ndarray:
        """``n`` uint64 words of fresh keystream (the key ratchets past what it used)."""
        buf = np.empty(n + KEY_BYTES // 8, dtype=np.uint64)
        keystream_into(self._key, buf)
        self._key = buf[: KEY_BYTES // 8].tobytes()
        return buf[KEY_BYTES // 8:]

    def bytes(self, length: int) -> bytes:
        """``length`` random bytes."""
        if length < 0:
            raise PrivacyError(f"length must be >= 0, got {length}")
        return self._words(-(-length // 8)).tobytes()[:length]

    # -- uniform -----------------------------------------------------------------------------

    def random(self, size: int | tuple[int, ...] | None = None) -> Any:
        """Uniform float64 in [0, 1), multiples of 2^-53 (every one equally likely)."""
        n, shape = _count(size)
        out = (self._words(n) >> np.uint64(11)).astype(np.float64) * _U53
        return _shaped(out, shape)

    def uniform(self, low: float = 0.0, high: float = 1.0,
                size: int | tuple[int, ...] | None = None) -> Any:
        """Uniform float64 in [low, high)."""
        n, shape = _count(size)
        u = self.random(n)
        return _shaped(low + (high - low) * u, shape)

    def integers(self, low: int, high: int | None = None,
                 size: int | tuple[int, ...] | None = None) -> Any:
        """Uniform integers in [low, high) (or [0, low) with one argument), exactly unbiased:
        a word is kept only below the largest multiple of the range (rejection).

        Raises:
            PrivacyError: an empty range or one wider than 2^63.
        """
        if high is None:
            low, high = 0, low
        span = int(high) - int(low)
        if not 0 < span <= 2**63:
            raise PrivacyError(f"integers needs low < high within 2^63, got [{low}, {high})")
        n, shape = _count(size)
        limit = np.uint64((2**64 // span) * span - 1)  # accept words <= limit
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            words = self._words(n - filled + 8)
            keep = words[words <= limit][: n - filled]
            out[filled:filled + keep.size] = (keep % np.uint64(span)).astype(np.int64) + low
            filled += keep.size
        return _shaped(out, shape)

    def choice(self, a: int, size: int | None = None, replace: bool = True,
               p: object = None) -> Any:
        """``size`` values of ``range(a)``, uniformly; without replacement they are distinct
        and in random order.

        Raises:
            PrivacyError: ``p`` is given (weighted choice is not offered), or more values
                than ``a`` are asked without replacement.
        """
        if p is not None:
            raise PrivacyError("CryptoRandom.choice does not take p")
        a = int(a)
        count = 1 if size is None else int(size)
        if replace:
            return self.integers(0, a, size)
        if not 0 <= count <= a:
            raise PrivacyError(f"cannot choose {count} of {a} without replacement")
        if count > a // 4:  # a large share: the first count of a random permutation
            picked = np.argsort(self._words(a))[:count]
        else:  # a small share: draw, de-duplicate keeping first occurrences, top up
            picked = np.empty(0, dtype=np.int64)
            while picked.size < count:
                more = np.concatenate([picked, self.integers(0, a, 2 * (count - picked.size))])
                _, first = np.unique(more, return_index=True)
                picked = more[np.sort(first)][:count]
            picked = picked[np.argsort(self._words(count))]  # order carries no information
        return picked[0].item() if size is None else picked.astype(np.int64)

    # -- normal ------------------------------------------------------------------------------

    def standard_normal(self, size: int | tuple[int, ...] | None = None,
                        dtype: type | np.dtype = np.float64) -> Any:
        """N(0, 1) variates by Box-Muller on 53-bit uniforms, computed in float64."""
        n, shape = _count(size)
        half = -(-n // 2)
        u1 = 1.0 - self.random(half)  # (0, 1]: the log is finite
        u2 = self.random(half)
        r = np.sqrt(-2.0 * np.log(u1))
        theta = 2.0 * np.pi * u2
        z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]
        return _shaped(z.astype(dtype, copy=False), shape)

    def normal(self, loc: float = 0.0, scale: float = 1.0,
               size: int | tuple[int, ...] | None = None) -> Any:
        """N(loc, scale^2) variates (see :meth:`standard_normal`)."""
        if not scale >= 0:
            raise PrivacyError(f"scale must be >= 0, got {scale}")
        n, shape = _count(size)
        return _shaped(loc + scale * self.standard_normal(n), shape)


#: What noise is drawn from: a seeded numpy Generator (simulation: reproducible) or a
#: :class:`CryptoRandom` (deployment).
RandomSource = np.random.Generator | CryptoRandom
