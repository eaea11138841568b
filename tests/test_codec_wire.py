"""The wire format: round trips, and every malformed payload refused with CodecError.

Tampered payloads are re-assembled here from the documented layout (header struct, JSON
descriptor, field table, CRC-32) with a valid checksum, so they reach the deeper checks.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import replace

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.codec import (
    BFloat16,
    Chain,
    Float16,
    RandomK,
    Sign,
    StochasticQuantize,
    TopK,
    Zstd,
    from_bytes,
    parse,
    to_bytes,
)
from shoal.errors import CodecError

HEAD = struct.Struct("<4sBBHQQ")
DTYPE_CODES = {"u1": 1, "<u2": 2, "<u4": 3, "<f2": 4, "<f4": 5}


def table(fields: dict[str, np.ndarray]) -> bytes:
    """The documented field table: count, (name length, name, dtype code, element count)…, data."""
    out = struct.pack("<B", len(fields))
    for name, arr in fields.items():
        code = DTYPE_CODES[arr.dtype.str.replace("|", "")]
        out += struct.pack("<B", len(name)) + name.encode() + struct.pack("<BI", code, arr.size)
    return out + b"".join(a.tobytes() for a in fields.values())


def assemble(
    descriptor: dict | bytes,
    payload: bytes,
    size: int,
    *,
    magic: bytes = b"\x89SHC",
    version: int = 1,
    dtype: int = 1,
) -> bytes:
    desc = descriptor if isinstance(descriptor, bytes) else json.dumps(descriptor).encode()
    body = HEAD.pack(magic, version, dtype, len(desc), size, len(payload)) + desc + payload
    return body + struct.pack("<I", zlib.crc32(body))


def split(b: bytes) -> tuple[dict, bytes, int]:
    _, _, _, dlen, size, plen = HEAD.unpack_from(b)
    return json.loads(b[24 : 24 + dlen]), b[24 + dlen : 24 + dlen + plen], size


def desc(chain: Chain, count: int, **meta: int) -> dict:
    return {"chain": [[n, p] for n, p in chain.spec], "count": count, "meta": meta}


RNG = np.random.default_rng(0)
X = np.random.default_rng(1).standard_normal(50).astype(np.float32)
CHAINS = [
    Chain([]),
    Chain([BFloat16()]),
    Chain([StochasticQuantize(bits=4, block=8)]),
    Chain([Sign(block=16)]),
    Chain([TopK(fraction=0.1), StochasticQuantize(bits=2, block=8), Zstd()]),
    Chain([RandomK(k=5), Zstd(level=1)]),
]


@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: "+".join(n for n, _ in c.spec) or "raw")
def test_round_trip(chain: Chain) -> None:
    e = chain.encode(X, np.random.default_rng(3))
    b = to_bytes(e)
    assert np.array_equal(from_bytes(b, max_elements=50), chain.decode(e))
    assert np.array_equal(from_bytes(bytearray(b), max_elements=50), chain.decode(e))
    assert from_bytes(to_bytes(chain.encode(np.zeros(0, np.float32), RNG)), max_elements=0).shape == (0,)
    parsed = parse(b, max_elements=50)
    assert parsed.encoded.spec == chain.spec and parsed.context == {}


def test_raw_payload_bytes_by_hand() -> None:
    x = np.array([1.0, -2.0], np.float32)
    b = to_bytes(Chain([]).encode(x, RNG))
    descriptor, payload, size = split(b)
    assert b[:8] == b"\x89SHC\x01\x01" + struct.pack("<H", len(b) - 24 - len(payload) - 4)
    assert size == 2 and descriptor == {"chain": [], "count": 2, "meta": {}}
    assert payload == table({"values": x})
    assert struct.unpack("<I", b[-4:])[0] == zlib.crc32(b[:-4])


def test_every_corrupted_byte_and_every_truncation_is_refused() -> None:
    chain = Chain([TopK(k=4), StochasticQuantize(bits=4, block=8), Zstd()])
    b = to_bytes(chain.encode(X, RNG))
    for i in range(len(b)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(b)
            bad[i] ^= flip
            with pytest.raises(CodecError):
                from_bytes(bytes(bad), max_elements=50)
    for n in range(len(b)):
        with pytest.raises(CodecError):
            from_bytes(b[:n], max_elements=50)
    with pytest.raises(CodecError, match="declares"):
        from_bytes(b + b"\x00", max_elements=50)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_resealed_mutations_never_crash(data: st.DataObject) -> None:
    """Any byte changed after the header, with a recomputed CRC: decode or CodecError, nothing else."""
    chain = data.draw(st.sampled_from(CHAINS))
    b = bytearray(to_bytes(chain.encode(X, RNG)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(24, len(b) - 5))
        b[i] = data.draw(st.integers(0, 255))
    body = bytes(b[:-4])
    try:
        y = from_bytes(body + struct.pack("<I", zlib.crc32(body)), max_elements=50)
    except CodecError:
        return
    assert y.dtype == np.float32 and y.shape == (50,) and np.isfinite(y).all()


def test_max_elements_is_respected() -> None:
    b = to_bytes(Chain([]).encode(X, RNG))
    assert from_bytes(b, max_elements=50).size == 50
    with pytest.raises(CodecError, match="max_elements=49"):
        from_bytes(b, max_elements=49)
    with pytest.raises(CodecError, match="max_elements"):
        from_bytes(b, max_elements=-1)
    # A header declaring 2^40 elements is refused before anything is sized from it.
    with pytest.raises(CodecError, match="max_elements"):
        from_bytes(assemble(desc(Chain([]), 0), table({}), 2**40), max_elements=10**6)


Q4 = Chain([StochasticQuantize(bits=4, block=8)])
TOPK = Chain([TopK(k=3)])
def f32(*v: float) -> np.ndarray:
    return np.array(v, np.float32)


def u1(*v: int) -> np.ndarray:
    return np.array(v, np.uint8)


def u2(*v: int) -> np.ndarray:
    return np.array(v, "<u2")




@pytest.mark.parametrize(
    "descriptor, fields, size, match",
    [
        (desc(Chain([]), 3), {"values": f32(1, 2)}, 3, "values"),  # count ≠ value length
        (desc(Chain([]), 2), {"values": f32(1, np.nan)}, 2, "non-finite"),
        (desc(Chain([BFloat16()]), 2), {"bits": u2(0x3F80, 0x7FC0)}, 2, "non-finite"),  # bf16 NaN
        (desc(Chain([Float16()]), 2), {"values": np.array([1, np.inf], "<f2")}, 2, "non-finite"),
        (desc(Chain([]), 2), {"values": u2(1, 2)}, 2, "dtype"),
        (desc(Chain([]), 2), {"values": f32(1, 2), "extra": u1(0)}, 2, "fields"),
        (desc(Chain([]), 1), {}, 1, "fields"),
        ({"chain": [["gzip", {}]], "count": 1, "meta": {}}, {"values": f32(1)}, 1, "unknown codec"),
        ({"chain": [["quantize", {"bits": 3, "block": 4, "scale": "minmax"}]], "count": 1, "meta": {}},
         {"values": f32(1)}, 1, "bits"),
        ({"chain": [["zstd", {"level": 3}], ["fp16", {}]], "count": 1, "meta": {}}, {}, 1, "zstd"),
        ({"chain": [["fp16", {"x": 1}]], "count": 1, "meta": {}}, {}, 1, "parameters"),
        (desc(TOPK, 2, index_format=1), {"indices": u2(0, 1), "values": f32(1, 2)}, 10, "expected 3"),
        (desc(TOPK, 3, index_format=1), {"indices": u2(0, 1, 9), "values": f32(1, 2, 3)}, 10, "out of range"),
        (desc(TOPK, 3, index_format=1), {"indices": u2(0, 1), "values": f32(1, 2, 3)}, 10, "indices"),
        (desc(TOPK, 3, index_format=0), {"indices": u1(0b1111, 0), "values": f32(1, 2, 3)}, 10, "4 bits set"),
        (desc(TOPK, 3, index_format=0), {"indices": u1(0b111, 0b100), "values": f32(1, 2, 3)}, 10, "beyond"),
        (desc(TOPK, 3, index_format=7), {"indices": u2(0, 1, 2), "values": f32(1, 2, 3)}, 10, "index_format"),
        (desc(TOPK, 3), {"indices": u2(0, 1, 2), "values": f32(1, 2, 3)}, 10, "meta"),
        (desc(TOPK, 3, index_format=1, zstd_raw=4), {"indices": u2(0, 1, 2), "values": f32(1, 2, 3)}, 10,
         "meta"),
        (desc(Q4, 5), {"codes": u1(0, 0), "step": f32(1), "lo": f32(0)}, 5, "codes"),
        (desc(Q4, 5), {"codes": u1(0, 0, 0x10), "step": f32(1), "lo": f32(0)}, 5, "padding"),
        (desc(Q4, 5), {"codes": u1(0, 0, 0), "step": f32(1, 1), "lo": f32(0)}, 5, "step"),
        (desc(Q4, 5), {"codes": u1(0, 0, 0), "step": f32(-1), "lo": f32(0)}, 5, "non-negative"),
        (desc(Q4, 5), {"codes": u1(0, 0, 0), "step": f32(np.inf), "lo": f32(0)}, 5, "finite"),
        (desc(Q4, 5), {"codes": u1(0, 0, 0), "step": f32(1), "lo": f32(np.nan)}, 5, "lo"),
        (desc(Q4, 5), {"codes": u1(0xFF, 0xFF, 0x0F), "step": f32(3e38), "lo": f32(3e38)}, 5, "non-finite"),
        (desc(Chain([Sign()]), 9), {"signs": u1(0xFF, 0x03), "scale": f32(1)}, 9, "padding"),
        (desc(Chain([Sign()]), 9), {"signs": u1(0xFF, 0x01), "scale": f32(1, 1)}, 9, "scale"),
        ({"chain": [], "count": True, "meta": {}}, {"values": f32(1)}, 1, "count"),
        ({"chain": [], "count": 1}, {"values": f32(1)}, 1, "keys"),
        ({"chain": [], "count": 1, "meta": {"a": 1.5}}, {"values": f32(1)}, 1, "meta"),
        ({"chain": {"fp16": {}}, "count": 1, "meta": {}}, {"values": f32(1)}, 1, "chain"),
    ],
)
def test_inconsistent_payloads_are_refused(descriptor: dict, fields: dict, size: int, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        from_bytes(assemble(descriptor, table(fields), size), max_elements=100)


@pytest.mark.parametrize(
    "kwargs, descriptor, match",
    [
        ({"magic": b"PK\x03\x04"}, None, "magic"),
        ({"version": 2}, None, "version 2"),
        ({"dtype": 2}, None, "dtype"),
        ({}, b"{not json", "JSON"),
        ({}, b'{"chain": [], "count": NaN, "meta": {}}', "JSON"),
        ({}, b'{"chain": [], "count": 1, "count": 1, "meta": {}}', "JSON"),
        ({}, b"[" * 5000 + b"]" * 5000, "JSON|descriptor"),
        ({}, b"\xff\xfe", "JSON"),
    ],
)
def test_bad_headers_are_refused(kwargs: dict, descriptor: bytes | None, match: str) -> None:
    d = descriptor if descriptor is not None else desc(Chain([]), 1)
    with pytest.raises(CodecError, match=match):
        from_bytes(assemble(d, table({"values": f32(1)}), 1, **kwargs), max_elements=10)


def test_field_table_lengths_must_add_up() -> None:
    good = table({"values": f32(1, 2)})
    for payload in (good[:-1], good + b"\x00", b"", b"\x11", b"\x01\x06values\x09\x02\x00\x00\x00"):
        with pytest.raises(CodecError):
            from_bytes(assemble(desc(Chain([]), 2), payload, 2), max_elements=10)


ZSTD = Chain([Zstd()])


def zstd_payload(frame: bytes, raw: int, size: int) -> bytes:
    return assemble(desc(ZSTD, size, zstd_raw=raw), table({"zstd": np.frombuffer(frame, np.uint8)}), size)


def test_zstd_bombs_are_refused_quickly() -> None:
    huge = 256 * 2**20
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(huge))  # ~8 KB declaring 256 MiB
    streamed = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(2**20))
    inner = table({"values": f32(1, 2)})
    cases = [
        (zstd_payload(bomb, huge, 2), "outside"),  # declared raw size above the bound for d=2
        (zstd_payload(bomb, len(inner), 2), "content size"),  # frame header disagrees
        (zstd_payload(streamed, len(inner), 2), "content size unknown"),
        (zstd_payload(bomb, huge, 2**24), "outside"),  # even for d = 2^24: bound is 8 B/value
    ]
    for b, match in cases:
        start = time.perf_counter()
        with pytest.raises(CodecError, match=match):
            from_bytes(b, max_elements=2**24)
        assert time.perf_counter() - start < 0.5


def test_zstd_frame_must_be_exact() -> None:
    inner = table({"values": f32(1, 2)})
    frame = zstandard.ZstdCompressor(level=3).compress(inner)
    assert np.array_equal(from_bytes(zstd_payload(frame, len(inner), 2), max_elements=2), f32(1, 2))
    for bad, match in [
        (frame + b"\x00", "extra data"),
        (frame + frame, "extra data"),
        (frame[:-1], "truncated|corrupt"),
        (b"\x00" * 12, "frame header"),
    ]:
        with pytest.raises(CodecError, match=match):
            from_bytes(zstd_payload(bad, len(inner), 2), max_elements=2)
    bad_inner = table({"values": f32(1, 2, 3)})  # inner count disagrees with the descriptor
    frame = zstandard.ZstdCompressor(level=3).compress(bad_inner)
    with pytest.raises(CodecError, match="values"):
        from_bytes(zstd_payload(frame, len(bad_inner), 2), max_elements=2)


def test_context_round_trips_under_the_checksum() -> None:
    e = Chain([]).encode(X, RNG)
    parsed = parse(to_bytes(e, context={"version": 3}), max_elements=50)
    assert parsed.context == {"version": 3}
    with pytest.raises(CodecError, match="context"):
        to_bytes(e, context={"version": 1.5})


def test_to_bytes_refuses_an_inconsistent_encoding() -> None:
    e = Chain([Sign()]).encode(X, RNG)
    with pytest.raises(CodecError):
        to_bytes(replace(e, spec=Chain([]).spec))
    with pytest.raises(CodecError):
        to_bytes(replace(e, spec=(("nope", {}),)))
