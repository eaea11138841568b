"""A model download as a device receives it: a chunked stream reassembled and verified
before anything is decoded, then decoded against the model the device holds.

Sans-I/O: :func:`receive_model` (``Download`` and ``GetModel`` streams) takes any iterator
of ``ModelChunk`` messages (the gRPC stream, or a list in tests) and trusts none of them. The
payload buffer is allocated once, from a declared size checked against a bound; chunks must
keep the first chunk's version, base, size, digest and signature, arrive contiguously and in
order, and add up to exactly the declared size whose SHA-256 must match. Only then does
:func:`decode_model` parse the codec wire format (which validates again before building a
vector) and apply a delta to the held model.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from shoal.codec import decode_download, download_from_bytes
from shoal.lifecycle.signing import SignedArtifact
from shoal.transport.device_api import DownloadRefused
from shoal.transport.proto import shoal_pb2 as pb

__all__ = ["Received", "assemble_download", "decode_model", "receive_model"]


@dataclass(frozen=True)
class Received:
    """One model as a device received it, checked but not yet decoded.

    Attributes:
        payload: the bytes (codec wire format); empty when ``not_modified``.
        version: the version the stream carries.
        base: the version a delta is against (0: a full model).
        signed: the signature the first chunk carried (``None``: unsigned).
        not_modified: serving only: the device already holds ``version``.
    """

    payload: bytearray
    version: int
    base: int
    signed: SignedArtifact | None
    not_modified: bool = False


def receive_model(stream: Iterable[pb.ModelChunk], *, version: int | None, have: int,
                  max_bytes: int, on_bytes: Callable[[int], None] = lambda n: None
                  ) -> Received:
    """Reassemble a ``Download`` or ``GetModel`` stream into one verified payload.

    Args:
        stream: the server's chunks.
        version: the version asked for (``Download``), or ``None``: whichever version the
            server serves (``GetModel``; the first chunk names it, and may say "not
            modified" for ``have``).
        have: the version the device holds, the only base a delta may be against.
        max_bytes: a larger declared ``total_size`` is refused before allocation.
        on_bytes: told the size of every chunk as it arrives (traffic accounting).

    Raises:
        DownloadRefused: the stream is not exactly one well-formed payload of what was asked.
    """
    buf: bytearray | None = None
    digest, expected, total, received, base = hashlib.sha256(), b"", 0, 0, 0
    signed: SignedArtifact | None = None
    for chunk in stream:
        n = len(chunk.data)
        on_bytes(n)
        if buf is None:
            if version is None:
                version = chunk.version
                if chunk.not_modified:
                    if chunk.version != have or n or not have:
                        raise DownloadRefused(f"'not modified' for version {chunk.version}, "
                                              f"but the device holds {have}")
                    return Received(bytearray(), version, 0, None, not_modified=True)
            total, expected, base = chunk.total_size, chunk.sha256, chunk.base_version
            if chunk.version != version or base not in (0, have):
                raise DownloadRefused(f"asked for model version {version} (holding "
                                      f"{have}), got version {chunk.version} against base "
                                      f"{base}")
            if not 0 < total <= max_bytes:
                raise DownloadRefused(f"declared total_size {total} is outside "
                                      f"[1, max_model_bytes={max_bytes}]")
            if len(expected) != 32:
                raise DownloadRefused(f"first chunk carries a {len(expected)}-byte sha256, "
                                      f"expected 32")
            if chunk.signed_header or chunk.signature:
                signed = SignedArtifact(bytes(chunk.signed_header), bytes(chunk.signature))
            buf = bytearray(total)
        elif ((chunk.version and chunk.version != version)
              or (chunk.base_version and chunk.base_version != base)
              or (chunk.total_size and chunk.total_size != total)
              or (chunk.sha256 and chunk.sha256 != expected)
              or chunk.signed_header or chunk.signature or chunk.not_modified):
            raise DownloadRefused(f"chunk at offset {chunk.offset} changes the version, "
                                  f"base_version, total_size, sha256 or signature of the "
                                  f"download")
        if chunk.offset != received:
            raise DownloadRefused(f"chunk offset {chunk.offset}, expected {received} "
                                  f"(chunks must be contiguous and in order)")
        if received + n > total:
            raise DownloadRefused(f"chunks carry more than the declared total_size {total}")
        buf[received:received + n] = chunk.data
        digest.update(chunk.data)
        received += n
    if buf is None or version is None:
        raise DownloadRefused("the download stream was empty")
    if received != total:
        raise DownloadRefused(f"download truncated: {received} of {total} bytes")
    if not hmac.compare_digest(digest.digest(), expected):
        raise DownloadRefused("sha256 of the downloaded model does not match")
    return Received(buf, version, base, signed)


def assemble_download(request: pb.DownloadRequest, stream: Iterable[pb.ModelChunk], *,
                      max_bytes: int, on_bytes: Callable[[int], None] = lambda n: None
                      ) -> tuple[bytearray, int]:
    """:func:`receive_model` of a ``Download`` for ``request``: ``(payload, base)``.

    Raises:
        DownloadRefused: as :func:`receive_model`.
    """
    got = receive_model(stream, version=request.version, have=request.base_version,
                        max_bytes=max_bytes, on_bytes=on_bytes)
    return got.payload, got.base


def decode_model(blob: bytearray, version: int, base: int,
                 held: tuple[int, np.ndarray] | None, *, max_elements: int) -> np.ndarray:
    """The model a verified payload carries: full, or a delta against ``held`` (the device's
    ``(version, params)``).

    A payload without a versions context is a full model (servers before delta downloads
    sent bare models); one with a context must name the stream's versions.

    Raises:
        DownloadRefused: the payload's versions are not the stream's.
        CodecError: the payload is malformed, too large, or a delta against a model the
            device does not hold.
    """
    dl = download_from_bytes(blob, max_elements=max_elements,
                             bare_version=version if base == 0 else None)
    if dl.version != version or dl.base_version != (base or None):
        raise DownloadRefused(f"payload is version {dl.version} against base "
                              f"{dl.base_version}, the stream said {version} against "
                              f"{base or None}")
    return decode_download(dl, held)
