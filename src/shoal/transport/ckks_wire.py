"""The wire form of a CKKS upload: the ciphertexts of one device, framed, bounded before
they are parsed.

``u32 count``, ``count`` × ``u32 length`` (little-endian), then the ciphertexts back to
back. :func:`unpack_ciphertexts` checks the count and every length against the round's bounds
(the number of ciphertexts of the model, the largest fresh ciphertext of the parameters)
before any byte is handed to TenSEAL, so a malformed or oversized upload is refused with a
reason and costs no parsing.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from shoal.errors import UpdateRejected

__all__ = ["pack_ciphertexts", "unpack_ciphertexts", "upload_bound"]

_U32 = struct.Struct("<I")


def pack_ciphertexts(ciphertexts: Sequence[bytes]) -> bytes:
    """One device's serialized ciphertexts as one payload."""
    head = _U32.pack(len(ciphertexts)) + b"".join(_U32.pack(len(c)) for c in ciphertexts)
    return head + b"".join(ciphertexts)


def upload_bound(count: int, ciphertext_bytes: int) -> int:
    """The largest payload of ``count`` ciphertexts of at most ``ciphertext_bytes`` each."""
    return 4 * (count + 1) + count * ciphertext_bytes


def unpack_ciphertexts(payload: bytes | bytearray, count: int, ciphertext_bytes: int
                       ) -> list[bytes]:
    """The ciphertexts of a payload, framing checked (not parsed).

    Raises:
        UpdateRejected: ``wrong_shape`` (not ``count`` ciphertexts), ``too_large`` (a
            ciphertext above ``ciphertext_bytes``) or ``malformed`` (the lengths do not add
            up to the payload).
    """
    view = memoryview(payload)
    if len(view) < 4:
        raise UpdateRejected("malformed", "a CKKS upload starts with its ciphertext count")
    (n,) = _U32.unpack_from(view, 0)
    if n != count:
        raise UpdateRejected("wrong_shape", f"expected {count} ciphertexts, got {n}")
    start = 4 * (n + 1)
    if len(view) < start:
        raise UpdateRejected("malformed", "the ciphertext lengths are cut short")
    lengths = [_U32.unpack_from(view, 4 * (i + 1))[0] for i in range(n)]
    big = [i for i, size in enumerate(lengths) if size > ciphertext_bytes]
    if big:
        raise UpdateRejected("too_large", f"ciphertext {big[0]} is {lengths[big[0]]} bytes; "
                             f"one is at most {ciphertext_bytes}")
    if start + sum(lengths) != len(view):
        raise UpdateRejected("malformed", f"the lengths add up to {start + sum(lengths)} "
                             f"bytes, the payload is {len(view)}")
    out, at = [], start
    for size in lengths:
        out.append(bytes(view[at:at + size]))
        at += size
    return out
