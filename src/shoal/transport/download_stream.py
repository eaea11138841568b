"""A model download as a device receives it: a chunked stream reassembled and verified
before anything is decoded, then decoded against the model the device holds.

Sans-I/O: :func:`assemble_download` takes any iterator of ``ModelChunk`` messages (the gRPC
stream, or a list in tests) and trusts none of them. The payload buffer is allocated once, from
a declared size checked against a bound; chunks must keep the first chunk's version, base,
size and digest, arrive contiguously and in order, and add up to exactly the declared size
whose SHA-256 must match. Only then does :func:`decode_model` parse the codec wire format
(which validates again before building a vector) and apply a delta to the held model.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable

import numpy as np

from shoal.codec import decode_download, download_from_bytes
from shoal.transport.device_api import DownloadRefused
from shoal.transport.proto import shoal_pb2 as pb

__all__ = ["assemble_download", "decode_model"]


def assemble_download(request: pb.DownloadRequest, stream: Iterable[pb.ModelChunk], *,
                      max_bytes: int, on_bytes: Callable[[int], None] = lambda n: None
                      ) -> tuple[bytearray, int]:
    """Reassemble a Download stream into one verified payload.

    Args:
        request: what was asked (``version``, and ``base_version`` the device holds).
        stream: the server's chunks.
        max_bytes: a larger declared ``total_size`` is refused before allocation.
        on_bytes: told the size of every chunk as it arrives (traffic accounting).

    Returns:
        ``(payload, base)``: the bytes and the base version of a delta (0: a full model).

    Raises:
        DownloadRefused: the stream is not exactly one well-formed payload of what was asked.
    """
    version = request.version
    buf: bytearray | None = None
    digest, expected, total, received, base = hashlib.sha256(), b"", 0, 0, 0
    for chunk in stream:
        n = len(chunk.data)
        on_bytes(n)
        if buf is None:
            total, expected, base = chunk.total_size, chunk.sha256, chunk.base_version
            if chunk.version != version or base not in (0, request.base_version):
                raise DownloadRefused(f"asked for model version {version} (holding "
                                      f"{request.base_version}), got version "
                                      f"{chunk.version} against base {base}")
            if not 0 < total <= max_bytes:
                raise DownloadRefused(f"declared total_size {total} is outside "
                                      f"[1, max_model_bytes={max_bytes}]")
            if len(expected) != 32:
                raise DownloadRefused(f"first chunk carries a {len(expected)}-byte sha256, "
                                      f"expected 32")
            buf = bytearray(total)
        elif ((chunk.version and chunk.version != version)
              or (chunk.base_version and chunk.base_version != base)
              or (chunk.total_size and chunk.total_size != total)
              or (chunk.sha256 and chunk.sha256 != expected)):
            raise DownloadRefused(f"chunk at offset {chunk.offset} changes the version, "
                                  f"base_version, total_size or sha256 of the download")
        if chunk.offset != received:
            raise DownloadRefused(f"chunk offset {chunk.offset}, expected {received} "
                                  f"(chunks must be contiguous and in order)")
        if received + n > total:
            raise DownloadRefused(f"chunks carry more than the declared total_size {total}")
        buf[received:received + n] = chunk.data
        digest.update(chunk.data)
        received += n
    if buf is None:
        raise DownloadRefused("the download stream was empty")
    if received != total:
        raise DownloadRefused(f"download truncated: {received} of {total} bytes")
    if not hmac.compare_digest(digest.digest(), expected):
        raise DownloadRefused("sha256 of the downloaded model does not match")
    return buf, base


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
