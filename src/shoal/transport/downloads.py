"""The aggregator's side of model downloads and update uploads, without gRPC.

:class:`ModelPublisher` holds the current model version and the last few before it, and answers
a device's ``DownloadRequest(version, base_version)`` with a :class:`ModelPayload`: the full
model, or an exact delta against the version the device holds when the publisher still has it
and the delta is smaller (:func:`shoal.codec.smallest_download`, the rule whose bytes the
simulator counts). A delta decodes on the device to the server's float32 bytes
(:mod:`shoal.codec.delta`). Payloads are the codec wire format with the versions in its
checksummed context; each ``(version, base)`` payload is encoded once and cached.

:func:`decode_upload` is the upload side: parse and decode an update, refusing one whose
codec chain is not the one the task announced; :func:`upload_limit` is the largest payload a
well-formed update can be, which the server refuses anything above before reading it.

The gRPC handlers (:mod:`shoal.transport.server`) only move these bytes.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field

import numpy as np

from shoal.codec import (Chain, Download, ModelHistory, download_to_bytes, parse,
                         require_lossless, smallest_download)
from shoal.codec.chain import chain_of
from shoal.codec.encoded import MAX_SIZE, as_update
from shoal.codec.entropy import raw_bound
from shoal.errors import CodecError, ConfigError
from shoal.lifecycle.signing import SignedArtifact
from shoal.uplink import raw_wire_size

__all__ = ["ModelPayload", "ModelPublisher", "decode_upload", "upload_limit"]

_FRAME = 24 + 4  # the wire format's fixed header and its CRC-32 (shoal.codec.wire)


@dataclass(frozen=True)
class ModelPayload:
    """A model version as it goes on the wire (codec wire format).

    ``base_version`` is 0 for a full model (``ModelChunk.base_version``), else the version the
    delta is against. ``signed`` is the operator's signature of the version's full float32
    model (the same for a delta: the device verifies what it rebuilt), or ``None``.
    """

    version: int
    blob: bytes
    sha256: bytes
    base_version: int = 0
    signed: SignedArtifact | None = None
    #: chunk size -> this payload's serialized ``ModelChunk`` messages, made once for every
    #: device that downloads it (see :func:`~shoal.transport.lifecycle_calls.model_chunks`)
    chunks: dict[int, tuple[bytes, ...]] = field(default_factory=dict, compare=False,
                                                 repr=False)

    @classmethod
    def of(cls, version: int, params: np.ndarray) -> ModelPayload:
        """The full model ``params`` as version ``version`` (raw float32)."""
        encoded = Chain([]).encode(np.asarray(params, np.float32), np.random.default_rng(0))
        return cls._from(Download(version, None, encoded))

    @classmethod
    def _from(cls, download: Download, blob: bytes | None = None,
              signed: SignedArtifact | None = None) -> ModelPayload:
        blob = download_to_bytes(download) if blob is None else blob
        base = 0 if download.base_version is None else download.base_version
        return cls(download.version, blob, hashlib.sha256(blob).digest(), base, signed)


class ModelPublisher:
    """The versions a server can send, and their payloads (thread-safe).

    Args:
        codec: lossless chain for what is sent (``compression.download_codec``: ``none`` or
            ``zstd``); deltas only pay off with ``zstd``, or when few parameters changed.
        keep_versions: versions kept besides the current one, as delta bases and for tasks
            still naming them (``compression.keep_versions``).
        deltas: ``False`` sends every device the full model (``compression.download = "full"``).

    Memory: ``keep_versions + 1`` float32 models, plus the cached payloads of the kept
    versions (each a model's size or less).

    Raises:
        ConfigError: a lossy codec, or ``keep_versions`` below 0.
    """

    def __init__(self, codec: Chain | None = None, keep_versions: int = 4, *,
                 deltas: bool = True) -> None:
        if type(keep_versions) is not int or keep_versions < 0:
            raise ConfigError(f"compression.keep_versions must be an integer >= 0, got "
                              f"{keep_versions!r}", key="compression.keep_versions")
        self.codec = require_lossless(codec if codec is not None else Chain([]))
        self.deltas = deltas
        self._history = ModelHistory(keep_versions + 1)
        self._cache: dict[tuple[int, int], ModelPayload] = {}
        self._signed: dict[int, SignedArtifact] = {}
        self._lock = threading.Lock()

    @property
    def version(self) -> int | None:
        """The current version (``None`` before the first :meth:`publish`)."""
        versions = self._history.versions
        return versions[-1][0] if versions else None

    @property
    def versions(self) -> tuple[int, ...]:
        """The versions held, oldest first."""
        return tuple(v for v, _ in self._history.versions)

    def publish(self, version: int, params: np.ndarray,
                signed: SignedArtifact | None = None) -> None:
        """Make ``params`` (copied) the current model as ``version``, with its signature
        ``signed`` (sent with every payload of the version); the oldest kept version beyond
        ``keep_versions`` is dropped, with its cached payloads.

        Raises:
            ConfigError: ``version`` is not newer than the current one.
            CodecError: ``params`` is not a finite 1-D float vector.
        """
        params = as_update(params)
        with self._lock:
            self._history = self._history.push(version, params)
            held = set(self.versions)
            self._cache = {k: p for k, p in self._cache.items()
                           if k[0] in held and (k[1] == 0 or k[1] in held)}
            self._signed = {v: a for v, a in self._signed.items() if v in held}
            if signed is not None:
                self._signed[version] = signed

    def params(self, version: int) -> np.ndarray | None:
        """The model ``version`` if it is held (read-only), else ``None``."""
        with self._lock:
            held = self._history.get(version)
            return None if held is None else held[1]

    def payload(self, version: int, base_version: int = 0) -> ModelPayload:
        """What a device asking for ``version`` while holding ``base_version`` downloads.

        Args:
            version: a version this publisher holds (the task's ``model_version``).
            base_version: ``DownloadRequest.base_version``, the version the device holds
                (0 = none: the proto's 0 means no base, so version 0 is never a delta base).

        Returns:
            The exact delta against ``base_version`` when it is held, older than ``version``
            and its payload is smaller; otherwise the full model.

        Raises:
            KeyError: ``version`` is not held (never published, or dropped); the gRPC handler
                answers NOT_FOUND.
        """
        with self._lock:
            # a base that cannot serve as one is a full download, cached once (a key per
            # claimed base would let a device fill memory with copies of the full model)
            base = self._history.get(base_version) \
                if self.deltas and 0 < base_version < version else None
            key = (version, base_version if base is not None else 0)
            cached = self._cache.get(key)
            if cached is not None:
                return cached
            new = self._history.get(version)
            if new is None:
                raise KeyError(f"model version {version} is not available (held: "
                               f"{list(self.versions)})")
            # lossless chains draw nothing: the generator is a formality
            dl, blob = smallest_download(new[1], version, base, self.codec, version,
                                         rng=np.random.default_rng(0))
            payload = ModelPayload._from(dl, blob, self._signed.get(version))
            self._cache[key] = payload
            return payload


def decode_upload(buf: bytes | bytearray | memoryview, dim: int, expected_chain: str
                  ) -> np.ndarray:
    """Parse and decode an uploaded update, made with the chain the task announced.

    Args:
        buf: the upload's bytes (codec wire format); the result may be a view of them, so
            the caller must not reuse the buffer.
        dim: the model length (the largest element count accepted; the round checks the
            exact shape).
        expected_chain: ``Task.upload_codec`` as sent, in the config's spelling ("" = raw).

    Raises:
        CodecError: reason ``"wrong_codec"`` when the payload's chain is another one;
            otherwise anything :func:`shoal.codec.from_bytes` refuses (reason
            ``"malformed"``); a non-finite result is the round's to refuse.
        ConfigError: ``expected_chain`` itself does not parse (the server's configuration).
    """
    expected = Chain.parse(expected_chain, key="task.upload_codec")
    encoded = parse(buf, max_elements=dim).encoded
    got = chain_of(encoded.spec)
    if got != expected:
        raise CodecError(f"update was encoded with chain {list(encoded.spec)}, the task "
                         f"announced {expected_chain or 'none'!r} ({list(expected.spec)})",
                         reason="wrong_codec")
    # the delta may be a view of ``buf``: the caller's own buffer, received for this upload;
    # not checked for NaN or infinities here: the round validates every update (non_finite)
    return got.decode(encoded, copy=False, finite=False)


def upload_limit(dim: int, chain: Chain) -> int:
    """The largest payload a well-formed update of ``dim`` values encoded with ``chain`` can
    be: anything larger is refused at its header, before a byte of it is read.

    The raw float32 chain has one exact size (:func:`~shoal.uplink.raw_wire_size`). Any
    other is bounded by the wire format's frame, its descriptor (the chain's spec, the count
    and every meta value at their largest) and the packed fields: at most
    :func:`~shoal.codec.entropy.raw_bound` bytes before zstd (8 per value and 1 KiB), which
    zstd can only grow by its worst case for incompressible input (``ZSTD_compressBound``:
    1/256 and a small frame, plus the field table around the frame).
    """
    if not chain.stages:
        return raw_wire_size(dim)
    descriptor = json.dumps({"chain": [[n, dict(p)] for n, p in chain.spec], "count": MAX_SIZE,
                             "meta": dict.fromkeys(chain.expected_meta(), 2**63 - 1)},
                            separators=(",", ":"))
    fields = raw_bound(dim)
    if any(s.role == "entropy" for s in chain.stages):
        fields = _zstd_bound(fields) + 1024
    return _FRAME + len(descriptor.encode()) + fields


def _zstd_bound(n: int) -> int:
    """``ZSTD_COMPRESSBOUND(n)`` of zstd.h: the largest frame ``n`` bytes compress to."""
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < 128 << 10 else 0)
