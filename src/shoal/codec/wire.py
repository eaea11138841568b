"""The byte format of an encoded update, and its validating parser.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic  b"\\x89SHC"
    4       1     format version (1)
    5       1     original dtype (1 = float32)
    6       2     descriptor length D
    8       8     element count d of the decoded vector
    16      8     payload length P
    24      D     descriptor: compact JSON {"chain": [[name, {params}], ...], "count": k,
                  "meta": {key: int}, "context": {key: int}}  ("context" only if present)
    24+D    P     payload: the field table and arrays (:func:`~shoal.codec.encoded.pack_fields`)
    24+D+P  4     CRC-32 (zlib) of every preceding byte

The CRC detects accidental corruption (every single-byte error, every burst up to 32 bits); it
is not a MAC — integrity against an attacker is the transport's job (TLS, signed uploads). So
:func:`parse` trusts nothing after the CRC either: it checks the total length before reading,
the element count against the caller's ``max_elements`` before anything is sized from it, the
descriptor against a strict schema, the chain against the registry, every field's dtype and
length, and the zstd frame against a bound; only then does :func:`from_bytes` decode, and the
decoders check indices, bit padding and scales. Every failure is a
:class:`~shoal.errors.CodecError`; nothing allocates more than O(max_elements) bytes.

``context`` carries a few integers for the layer above (e.g. model versions of a download),
under the same checksum.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.codec.chain import chain_of
from shoal.codec.encoded import MAX_SIZE, Encoded, pack_fields, unpack_fields
from shoal.errors import CodecError

__all__ = ["MAGIC", "FORMAT_VERSION", "Parsed", "to_bytes", "parse", "from_bytes", "frame_length"]

MAGIC = b"\x89SHC"
FORMAT_VERSION = 1
_DTYPE_FLOAT32 = 1
_HEAD = struct.Struct("<4sBBHQQ")
_CRC = struct.Struct("<I")
_MAX_DESCRIPTOR = 0xFFFF
_MAX_INT = 2**63 - 1


@dataclass(frozen=True, eq=False)
class Parsed:
    """A payload that passed every structural check: decode with :func:`shoal.codec.decode`."""

    encoded: Encoded
    context: Mapping[str, int]


def to_bytes(e: Encoded, *, context: Mapping[str, int] | None = None) -> bytes:
    """Serialise an encoded update (from :meth:`Chain.encode <shoal.codec.Chain.encode>`).

    Args:
        e: the encoded update; its ``spec`` names the chain.
        context: optional small integers for the caller (keys ≤ 32 ASCII chars).

    Raises:
        CodecError: ``e`` is not a consistent output of its chain, or the descriptor is too big.
    """
    chain_of(e.spec).check(e)
    descriptor: dict[str, Any] = {
        "chain": [[name, dict(params)] for name, params in e.spec],
        "count": e.count,
        "meta": dict(e.meta),
    }
    if context:
        descriptor["context"] = _int_map(dict(context), "context")
    desc = json.dumps(descriptor, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(desc) > _MAX_DESCRIPTOR:
        raise CodecError(f"descriptor is {len(desc)} bytes, above the limit {_MAX_DESCRIPTOR}")
    payload = pack_fields(e.fields)
    body = _HEAD.pack(MAGIC, FORMAT_VERSION, _DTYPE_FLOAT32, len(desc), e.size, len(payload))
    body += desc + payload
    return body + _CRC.pack(zlib.crc32(body))


def parse(b: bytes | bytearray | memoryview, *, max_elements: int) -> Parsed:
    """Validate a payload's framing, checksum, header, descriptor and fields, without decoding.

    Args:
        b: the received bytes.
        max_elements: largest element count the caller accepts (its model size).

    Raises:
        CodecError: truncated, corrupted, unknown format version, dtype or codec, element
            count above ``max_elements``, or fields inconsistent with the declared chain.
    """
    if type(max_elements) is not int or not 0 <= max_elements <= MAX_SIZE:
        raise CodecError(f"max_elements must be an integer in [0, {MAX_SIZE}], got {max_elements!r}")
    try:
        view = memoryview(b).cast("B")
    except TypeError as exc:
        raise CodecError(f"payload must be bytes, got {type(b).__name__}") from exc
    if len(view) < _HEAD.size + _CRC.size:
        minimum = _HEAD.size + _CRC.size
        raise CodecError(f"payload truncated: {len(view)} bytes, header and checksum alone are {minimum}")
    magic, version, dtype, desc_len, size, payload_len = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise CodecError(f"not a shoal codec payload (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported wire format version {version} (this build reads {FORMAT_VERSION})")
    expected = _HEAD.size + desc_len + payload_len + _CRC.size
    if len(view) != expected:
        raise CodecError(f"payload is {len(view)} bytes but its header declares {expected}")
    body = view[: len(view) - _CRC.size]
    (crc,) = _CRC.unpack_from(view, len(body))
    if zlib.crc32(body) != crc:
        raise CodecError("payload checksum mismatch (corrupted in transit)")
    if dtype != _DTYPE_FLOAT32:
        raise CodecError(f"unknown original dtype code {dtype} (1 = float32)")
    if size > max_elements:
        raise CodecError(f"payload declares {size} elements, above max_elements={max_elements}")
    descriptor = _descriptor(bytes(view[_HEAD.size : _HEAD.size + desc_len]))
    chain = chain_of(descriptor["chain"])
    fields = unpack_fields(view[_HEAD.size + desc_len : len(body)])
    encoded = Encoded(
        size=size,
        count=descriptor["count"],
        fields=fields,
        meta=descriptor["meta"],
        spec=chain.spec,
    )
    chain.check(encoded)
    return Parsed(encoded=encoded, context=descriptor.get("context", {}))


def frame_length(b: bytes | bytearray | memoryview) -> int:
    """Bytes of the payload that starts ``b``, from its header alone (for a caller that sends
    several payloads back to back; :func:`parse` then validates each one).

    Raises:
        CodecError: ``b`` is shorter than a header or does not start with the magic.
    """
    view = memoryview(b).cast("B")
    if len(view) < _HEAD.size:
        raise CodecError(f"payload truncated: {len(view)} bytes, the header alone is {_HEAD.size}")
    magic, _, _, desc_len, _, payload_len = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise CodecError(f"not a shoal codec payload (magic {bytes(magic)!r}, expected {MAGIC!r})")
    return _HEAD.size + desc_len + payload_len + _CRC.size


def from_bytes(b: bytes | bytearray | memoryview, *, max_elements: int) -> np.ndarray:
    """Parse and decode a payload to a float32 vector of its declared length.

    Raises:
        CodecError: anything :func:`parse` or the chain's decoders refuse.
    """
    e = parse(b, max_elements=max_elements).encoded
    return chain_of(e.spec).decode(e)


def _descriptor(raw: bytes) -> dict[str, Any]:
    def no_constants(name: str) -> None:
        raise ValueError(f"non-finite number {name}")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise ValueError("duplicate key")
        return out

    try:
        d = json.loads(raw.decode("utf-8"), parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CodecError(f"descriptor is not valid JSON: {exc}") from exc
    required = {"chain", "count", "meta"}
    if not isinstance(d, dict) or not required <= set(d) <= required | {"context"}:
        raise CodecError("descriptor must be an object with keys chain, count, meta (and optional context)")
    chain = d["chain"]
    if not isinstance(chain, list) or not all(
        isinstance(s, list)
        and len(s) == 2
        and isinstance(s[0], str)
        and isinstance(s[1], dict)
        and all(v is None or isinstance(v, (bool, int, float, str)) for v in s[1].values())
        for s in chain
    ):
        raise CodecError("descriptor.chain must be a list of [name, {scalar params}]")
    if type(d["count"]) is not int or not 0 <= d["count"] <= MAX_SIZE:
        raise CodecError(f"descriptor.count must be an integer in [0, {MAX_SIZE}], got {d['count']!r}")
    d["meta"] = _int_map(d["meta"], "descriptor.meta")
    if "context" in d:
        d["context"] = _int_map(d["context"], "descriptor.context")
    return d


def _int_map(m: object, where: str) -> dict[str, int]:
    if not isinstance(m, dict) or not all(
        isinstance(k, str) and len(k) <= 32 and type(v) is int and -_MAX_INT <= v <= _MAX_INT
        for k, v in m.items()
    ):
        raise CodecError(f"{where} must map short strings to 64-bit integers")
    return m
