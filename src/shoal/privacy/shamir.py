"""Shamir t-out-of-n secret sharing of 32-byte secrets over a prime field.

Shamir, "How to Share a Secret" (Communications of the ACM, 1979), as used by Bonawitz et al.,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017) to share each
client's self-mask seed and masking private key.

The field is GF(p) with p = 2**256 + 297, the smallest prime above 2**256, so a whole 32-byte
secret is one field element (Google's FCP instead splits secrets into 31-bit chunks mod
2**31 + 11; one big element keeps the code short, and Python integers make it fast enough for
the few shares a client holds). The secret is the constant term of a random polynomial of degree
t - 1 whose other coefficients come from :mod:`secrets`; share ``x`` is the holder's 1-based index
in the round's roster. Any t shares determine the polynomial (Lagrange interpolation at 0); any
t - 1 shares are consistent with every secret, each with exactly one polynomial, so they reveal
nothing.

Shares are few and small, so this module uses Python integers, not vectors.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from shoal.errors import ProtocolError

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "Share",
    "split_secret",
    "combine_shares",
    "split_int",
    "interpolate_at_zero",
    "evaluate_polynomial",
]

PRIME = 2**256 + 297
"""The field modulus: the smallest prime larger than 2**256."""
SECRET_BYTES = 32
"""Length of the secrets shared (seeds and X25519 private keys)."""
SHARE_BYTES = (PRIME.bit_length() + 7) // 8
"""Length of a serialized share value (33 bytes)."""


@dataclass(frozen=True)
class Share:
    """One point (x, y) of the sharing polynomial; ``y`` is hidden from ``repr``."""

    x: int
    y: int = field(repr=False)

    def y_bytes(self) -> bytes:
        """The share value as :data:`SHARE_BYTES` big-endian bytes (x is implied by the holder)."""
        return self.y.to_bytes(SHARE_BYTES, "big")

    @classmethod
    def from_y_bytes(cls, x: int, data: bytes) -> Share:
        """Inverse of :meth:`y_bytes`.

        Raises:
            ProtocolError: wrong length, or the value is not a field element.
        """
        if len(data) != SHARE_BYTES:
            raise ProtocolError(f"share value must be {SHARE_BYTES} bytes, got {len(data)}")
        y = int.from_bytes(data, "big")
        if y >= PRIME:
            raise ProtocolError("share value is not reduced modulo the field prime")
        return cls(x, y)


def evaluate_polynomial(coefficients: Sequence[int], x: int, prime: int = PRIME) -> int:
    """``sum(c_i * x**i) mod prime`` by Horner's rule; ``coefficients[0]`` is the constant term."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % prime
    return acc


def split_int(
    secret: int,
    threshold: int,
    xs: Sequence[int],
    *,
    prime: int = PRIME,
    coefficients: Sequence[int] | None = None,
) -> tuple[Share, ...]:
    """Shares of the field element ``secret`` at the points ``xs``.

    Args:
        secret: value in ``[0, prime)``.
        threshold: t, the number of shares needed to reconstruct (>= 1).
        xs: distinct non-zero evaluation points, one per holder.
        prime: the field modulus.
        coefficients: the t - 1 non-constant coefficients; drawn uniformly with
            :mod:`secrets` when omitted (only tests pass them).

    Raises:
        ProtocolError: the secret, threshold, coefficients or points are out of range (the
            message names which and the bound).
    """
    _check_points(xs, prime)
    if not 0 <= secret < prime:
        raise ProtocolError("secret must lie in [0, prime) of the field")
    if not 1 <= threshold <= len(xs):
        raise ProtocolError(
            f"threshold must be in [1, {len(xs)}] (number of shares), got {threshold}")
    if coefficients is None:
        coefficients = [secrets.randbelow(prime) for _ in range(threshold - 1)]
    elif len(coefficients) != threshold - 1:
        raise ProtocolError(f"coefficients: need threshold - 1 = {threshold - 1}, "
                            f"got {len(coefficients)}")
    poly = [secret, *coefficients]
    return tuple(Share(x, evaluate_polynomial(poly, x, prime)) for x in xs)


def split_secret(secret: bytes, threshold: int, xs: Sequence[int]) -> tuple[Share, ...]:
    """Split a 32-byte secret into ``len(xs)`` shares, any ``threshold`` of which recover it.

    Args:
        secret: exactly :data:`SECRET_BYTES` bytes.
        threshold: t >= 1.
        xs: the holders' 1-based roster indices (distinct, non-zero).

    Raises:
        ProtocolError: wrong secret length, threshold or points.
    """
    if len(secret) != SECRET_BYTES:
        raise ProtocolError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    return split_int(int.from_bytes(secret, "big"), threshold, xs)


def interpolate_at_zero(shares: Iterable[Share], *, prime: int = PRIME) -> int:
    """Value at 0 of the unique polynomial of degree < len(shares) through ``shares``.

    Raises:
        ProtocolError: repeated x-coordinates, or one outside [1, prime).
    """
    shares = sorted(shares, key=lambda s: s.x)
    xs = tuple(s.x for s in shares)
    _check_points(xs, prime)
    lam = _lagrange_at_zero(xs, prime)
    return sum(li * s.y for li, s in zip(lam, shares, strict=True)) % prime


def combine_shares(shares: Iterable[Share], threshold: int) -> bytes:
    """Recover a secret made by :func:`split_secret` from at least ``threshold`` shares.

    Uses the ``threshold`` shares with the smallest x (so sets repeat and their Lagrange
    coefficients are cached); extra shares are ignored.

    Raises:
        ProtocolError: fewer than ``threshold`` distinct shares, two different values for the
            same x, or a result that is not a 32-byte secret (shares from different secrets).
    """
    by_x: dict[int, Share] = {}
    for s in shares:
        if s.x in by_x and by_x[s.x].y != s.y:
            raise ProtocolError(f"two different shares for point x={s.x}")
        by_x[s.x] = s
    if len(by_x) < threshold:
        raise ProtocolError(f"need {threshold} shares to reconstruct, got {len(by_x)}")
    chosen = [by_x[x] for x in sorted(by_x)[:threshold]]
    value = interpolate_at_zero(chosen)
    if value >> (8 * SECRET_BYTES):
        raise ProtocolError("reconstructed value is not a 32-byte secret (inconsistent shares)")
    return value.to_bytes(SECRET_BYTES, "big")


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...], prime: int) -> tuple[int, ...]:
    # lambda_i = prod_{j != i} x_j / (x_j - x_i); O(t^2) once per point set
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % prime
                den = den * (xj - xi) % prime
        out.append(num * pow(den, -1, prime) % prime)
    return tuple(out)


def _check_points(xs: Sequence[int], prime: int) -> None:
    if len(set(xs)) != len(xs):
        raise ProtocolError("share x-coordinates must be distinct")
    if any(not 0 < x < prime for x in xs):
        raise ProtocolError("share x-coordinates must be in [1, prime)")
