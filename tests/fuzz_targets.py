"""Every decoder that takes bytes from the network, as a fuzz target ``target(data: bytes)``.

Shared by the Hypothesis fuzz tests (``tests/test_fuzz_*.py``, a few hundred cases each in
the suite, ``SHOAL_FUZZ_EXAMPLES`` in a benchmark run) and the coverage-guided atheris run
(``benchmarks/fuzz.py``). A target passes when the decoder returns a result that meets its
contract or raises a :class:`~shoal.errors.ShoalError` (the clear error a caller can act
on); any other exception fails it, as does an allocation beyond :data:`ALLOC_LIMIT` (checked
with ``tracemalloc``) -- hangs are caught by the callers' per-case deadlines.

Inputs are the fuzzed bytes, or for the structured decoders (chunk streams, protobuf
messages) the fuzzed bytes parsed into the structure (``ModelChunk``\\ s split from the
bytes, a ``SecAggReply`` parsed by protobuf: bytes protobuf refuses never reach shoal, gRPC
refuses them). :func:`fix_crc` lets a mutated codec payload past its checksum so mutations
reach the parser behind it.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from collections.abc import Callable

import numpy as np

from shoal.codec import (Chain, ModelHistory, decode_download, download_from_bytes,
                         download_to_bytes, encode_download, from_bytes, to_bytes)
from shoal.errors import ShoalError

#: model length every target decodes against
DIM = 64
#: bytes a decoder may allocate beyond the input on one case (40 float64 copies of DIM
#: would be 20 KiB; anything near the input's declared sizes would be megabytes)
ALLOC_LIMIT = 2 << 20

_CHAINS = ["none", "fp16", "bf16", "q8", "q4", "q2", "sign", "topk(0.25)", "randk(0.5)",
           "zstd", "topk(0.1)+q8+zstd", "q4+zstd", "randk(0.3)+fp16", "sign+zstd",
           "topk(0.5)+bf16+zstd"]


def fix_crc(data: bytes) -> bytes:
    """``data`` with its last four bytes replaced by the CRC-32 of the rest (the codec wire
    format's trailer)."""
    if len(data) < 4:
        return data
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def seeds() -> list[bytes]:
    """Valid payloads: an update for every chain, and full and delta downloads."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=DIM).astype(np.float32)
    out = [to_bytes(Chain.parse(c).encode(x, rng)) for c in _CHAINS]
    hist = ModelHistory(3).push(1, x)
    new = x + rng.normal(scale=0.01, size=DIM).astype(np.float32)
    for codec in (Chain.parse("none"), Chain.parse("zstd")):
        out.append(download_to_bytes(encode_download(new, 2, None, codec, 3, rng=rng)))
        out.append(download_to_bytes(encode_download(new, 2, hist.get(1), codec, 3, rng=rng,
                                                     exact=True)))
    return out


def _bounded(fn: Callable[[], object]) -> object:
    tracemalloc.start()
    try:
        return fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= ALLOC_LIMIT, f"decoder allocated {peak} bytes"


def _guard(fn: Callable[[], object]) -> object:
    try:
        return _bounded(fn)
    except ShoalError:
        return None


# --------------------------------------------------------------------------- codec


def wire_update(data: bytes) -> None:
    """:func:`shoal.codec.from_bytes`: a finite float32 vector of at most DIM elements."""
    out = _guard(lambda: from_bytes(data, max_elements=DIM))
    if out is not None:
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.ndim == 1
        assert out.size <= DIM and np.isfinite(out).all()


def wire_download(data: bytes) -> None:
    """:func:`shoal.codec.download_from_bytes` then :func:`decode_download` against the
    version a device holds."""
    held = (1, np.linspace(-1, 1, DIM, dtype=np.float32))

    def run() -> np.ndarray:
        return decode_download(download_from_bytes(data, max_elements=DIM, bare_version=2),
                               held)

    out = _guard(run)
    if out is not None:
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        assert out.size <= DIM and np.isfinite(out).all()


# --------------------------------------------------------------------------- transport


def upload(data: bytes) -> None:
    """:func:`shoal.transport.downloads.decode_upload` (the aggregator's upload decode)
    with the raw chain and a compressed one."""
    from shoal.transport.downloads import decode_upload

    for chain in ("", "topk(0.1)+q8+zstd"):
        out = _guard(lambda: decode_upload(data, DIM, chain))
        if out is not None:
            assert out.dtype == np.float32 and out.size <= DIM and np.isfinite(out).all()


def download_stream(data: bytes) -> None:
    """:func:`shoal.transport.download_stream.assemble_download` over chunks cut from the
    bytes (their header fields fuzzed too), then :func:`decode_model`."""
    from shoal.transport.download_stream import assemble_download, decode_model
    from shoal.transport.proto import shoal_pb2 as pb

    chunks = []
    pos = 0
    while pos + 8 <= len(data) and len(chunks) < 64:
        version, base, total, offset, size = struct.unpack_from("<BBHHH", data, pos)
        pos += 8
        body = data[pos:pos + size % 512]
        pos += len(body)
        sha = bytes(data[pos:pos + 32]) if version & 1 else b""
        chunks.append(pb.ModelChunk(version=version % 4, base_version=base % 3,
                                    total_size=total, sha256=sha, offset=offset, data=body))
    request = pb.DownloadRequest(version=2, base_version=1)
    held = (1, np.zeros(DIM, np.float32))

    def run() -> object:
        blob, base = assemble_download(request, iter(chunks), max_bytes=1 << 16)
        return decode_model(blob, 2, base, held, max_elements=DIM)

    out = _guard(run)
    if out is not None:
        assert isinstance(out, np.ndarray) and out.size <= DIM


def secagg_reply(data: bytes) -> None:
    """:func:`shoal.transport.secagg_wire.reply_from_pb` on any ``SecAggReply`` protobuf
    accepts (what a device reads from the aggregator)."""
    from google.protobuf.message import DecodeError

    from shoal.transport.proto import shoal_pb2 as pb
    from shoal.transport.secagg_wire import reply_from_pb

    try:
        msg = pb.SecAggReply.FromString(data)
    except DecodeError:
        return  # protobuf itself refuses it: gRPC's deserializer fails the call
    _guard(lambda: reply_from_pb(msg))


def secagg_header(data: bytes) -> None:
    """:func:`shoal.transport.secagg_wire.message_from_header` and the masked input's
    :func:`~shoal.privacy.secagg_encoding.unpack_ring` (what the aggregator reads)."""
    from google.protobuf.message import DecodeError

    from shoal.privacy.secagg_encoding import unpack_ring
    from shoal.transport.proto import shoal_pb2 as pb
    from shoal.transport.secagg_wire import message_from_header

    if not data:
        return
    bits = 8 + data[0] % 40
    _guard(lambda: unpack_ring(data[1:], bits, DIM))
    try:
        header = pb.SecAggHeader.FromString(data[1:])
    except DecodeError:
        return
    masked = np.zeros(DIM, np.uint64) if data[0] & 1 else None
    _guard(lambda: message_from_header(header, 3, b"s" * 16, masked))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "wire_update": wire_update,
    "wire_download": wire_download,
    "upload": upload,
    "download_stream": download_stream,
    "secagg_reply": secagg_reply,
    "secagg_header": secagg_header,
}


# --------------------------------------------------------------------------- Hypothesis inputs


def examples() -> int:
    """Cases per target: ``SHOAL_FUZZ_EXAMPLES`` (the benchmark run: 10,000), else 300."""
    import os

    return int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "300"))


def mutated_payloads():
    """A Hypothesis strategy: a valid payload (:func:`seeds`) put through a few byte-level
    mutations (flip, overwrite, insert, delete, truncate, duplicate a slice), its checksum
    recomputed most of the time so the mutation reaches the parser; or arbitrary bytes."""
    from hypothesis import strategies as st

    valid = seeds()
    op = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]),
                   st.integers(0, 4096), st.integers(0, 255), st.integers(1, 64))

    def apply(seed: bytes, ops: list, crc: bool) -> bytes:
        b = bytearray(seed)
        for kind, pos, value, span in ops:
            pos = pos % (len(b) + 1)
            if kind == "flip" and pos < len(b):
                b[pos] ^= 1 << (value % 8)
            elif kind == "set" and pos < len(b):
                b[pos] = value
            elif kind == "insert":
                b[pos:pos] = bytes([value]) * span
            elif kind == "delete":
                del b[pos:pos + span]
            elif kind == "truncate":
                del b[pos:]
            elif kind == "dup":
                b[pos:pos] = b[pos:pos + span]
        return fix_crc(bytes(b)) if crc else bytes(b)

    return st.one_of(
        st.builds(apply, st.sampled_from(valid), st.lists(op, min_size=1, max_size=4),
                  st.sampled_from([True, True, True, False])),
        st.binary(max_size=600),
    )


def fuzz_settings():
    """The Hypothesis settings of every fuzz test: :func:`examples` cases, a 5 s deadline
    per case (a hang fails), no health check about slow or large inputs."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=examples(), deadline=5000,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
