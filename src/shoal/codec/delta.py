"""Model downloads as deltas against the version a device already holds.

A device that synced version ``b`` recently receives ``new − params_b`` encoded with any chain;
one that is unknown, too far behind (more than ``max_staleness`` versions), ahead of the server
or holding a differently-sized model receives the full model. The decoder needs the base and
refuses a delta whose base version differs from the one the device holds — it never adds a
delta to the wrong model.

Server memory: the server keeps only the last ``max_staleness + 1`` versions
(:class:`ModelHistory`), O((max_staleness + 1) · d) floats; a device whose version has been
evicted gets the full model. Everything here is pure; persisting the history is the store's job.

Exactness: with a lossless chain (``Chain([])`` or ``Chain([Zstd()])``) the device reconstructs
``base + (new − base)``, which differs from ``new`` only by float32 rounding of the subtraction
(≤ 1 ulp of the larger operand per element; measured on a 2NN-sized model with updates of 1e-3,
about 0.7 % of the entries, mostly where a weight crosses zero). An *exact* download
(``encode_download(..., exact=True)``) adds a patch: the entries where ``base + delta`` does
not give ``new`` bit for bit, sent as their exact values and overwritten after the addition, so
the device holds the server's float32 bytes. No float32 delta can do without it: from base 1.0,
no float32 ``d`` gives ``1.0 + d == -1e-8``. The patch travels as a second payload of the wire
format in the top-k layout (sorted indices + values, validated by the same parser); which
entries it holds is the server's choice. With a lossy chain the device's copy deviates from the
server's version by the codec error (an exact download would patch most entries, and
:func:`smallest_download` then sends the full model).

:func:`smallest_download` is the one download rule of both carriers (the simulator counts its
bytes, the gRPC server sends them): the full model, or the exact delta when that is smaller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shoal.codec.chain import Chain, chain_of
from shoal.codec.encoded import Codec, Encoded, as_update, expect_field, expect_meta
from shoal.codec.sparsify import INDEX_BITMAP, INDEX_GAP32, TopK, decode_indices, encode_indices
from shoal.codec.wire import frame_length, parse, to_bytes
from shoal.errors import CodecError, ConfigError

__all__ = [
    "Download",
    "ModelHistory",
    "encode_download",
    "decode_download",
    "download_to_bytes",
    "download_from_bytes",
    "smallest_download",
    "require_lossless",
]

_LOSSLESS = {(), ("zstd",)}


@dataclass(frozen=True, eq=False)
class Download:
    """A model sent to a device: full (``base_version is None``) or a delta against a base.

    ``patch`` (exact downloads only): the entries to overwrite after adding the delta, as a
    sparse payload (top-k layout), or ``None`` when the addition is exact everywhere.
    """

    version: int
    base_version: int | None
    encoded: Encoded
    patch: Encoded | None = None

    @property
    def is_delta(self) -> bool:
        return self.base_version is not None


def require_lossless(codec: Chain, key: str = "compression.download_codec") -> Chain:
    """``codec`` if it is a lossless download chain (``none`` or ``zstd``).

    Raises:
        ConfigError: a lossy chain, named by ``key``: every device must train from the exact
            global model.
    """
    if tuple(name for name, _ in codec.spec) not in _LOSSLESS:
        raise ConfigError(f"{key} must be lossless ('none' or 'zstd'): clients must train "
                          f"from the exact global model", key=key)
    return codec


def _patch_for(rebuilt: np.ndarray, new: np.ndarray) -> Encoded | None:
    """The entries where ``rebuilt`` differs from ``new`` bit for bit, with ``new``'s values."""
    idx = np.flatnonzero(rebuilt.view(np.uint32) != new.view(np.uint32))
    if idx.size == 0:
        return None
    fmt, packed = encode_indices(idx, new.size)
    return Encoded(size=int(new.size), count=int(idx.size),
                   fields={"indices": packed, "values": new[idx]},
                   meta={"index_format": fmt}, spec=Chain([TopK(k=int(idx.size))]).spec)


def _apply_patch(out: np.ndarray, patch: Encoded) -> None:
    """Overwrite the patched entries of ``out`` (validated like any untrusted payload)."""
    if (patch.count < 1 or tuple(patch.spec) != Chain([TopK(k=patch.count)]).spec
            or patch.size != out.size):
        raise CodecError(f"download patch must be a top-k payload of {out.size} elements, got "
                         f"chain {list(patch.spec)} of {patch.size}")
    fmt = expect_meta(patch, "index_format", INDEX_BITMAP, INDEX_GAP32, stage="download patch")
    values = expect_field(patch, "values", "<f4", patch.count, stage="download patch")
    idx = decode_indices(fmt, patch.fields["indices"], patch.size, patch.count,
                         stage="download patch")
    if not np.isfinite(values).all():
        raise CodecError("download patch carries non-finite values", reason="non_finite")
    out[idx] = values


def _check_version(v: object, name: str) -> int:
    if type(v) is not int or v < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {v!r}", key=name)
    return v


def encode_download(
    new_params: np.ndarray,
    new_version: int,
    base: tuple[int, np.ndarray] | None,
    codec: Codec,
    max_staleness: int,
    *,
    rng: np.random.Generator,
    exact: bool = False,
) -> Download:
    """Encode the new global model for a device, as a delta when its base is usable.

    Args:
        new_params: the new global model (flat float32).
        new_version: its version number.
        base: ``(version, params)`` the device last synced, as found in the server's history,
            or ``None`` when unknown or evicted.
        codec: the chain (or any codec) applied to the delta or to the full model.
        max_staleness: largest ``new_version − base_version`` still sent as a delta.
        rng: drives stochastic stages of ``codec``.
        exact: add the patch that makes a delta decode to ``new_params`` bit for bit.

    Returns:
        A :class:`Download`; full when ``base`` is ``None``, newer than ``new_version``, more
        than ``max_staleness`` versions behind, or of a different length.

    Raises:
        ConfigError: negative versions or staleness.
        CodecError: non-finite parameters.
    """
    _check_version(new_version, "new_version")
    _check_version(max_staleness, "max_staleness")
    new = as_update(new_params)
    if base is not None:
        base_version = _check_version(base[0], "base version")
        base_params = as_update(base[1])
        if base_params.shape == new.shape and 0 <= new_version - base_version <= max_staleness:
            with np.errstate(over="ignore"):
                delta = new - base_params
            encoded = codec.encode(delta, rng)
            patch = None
            if exact:  # rebuild exactly as decode_download does, and patch what differs
                with np.errstate(all="ignore"):
                    patch = _patch_for(base_params + chain_of(encoded.spec).decode(encoded), new)
            return Download(new_version, base_version, encoded, patch)
    return Download(new_version, None, codec.encode(new, rng))


def decode_download(download: Download, held: tuple[int, np.ndarray] | None) -> np.ndarray:
    """Reconstruct the model a download carries.

    Args:
        download: from :func:`encode_download` or :func:`download_from_bytes`.
        held: ``(version, params)`` the device holds, or ``None``; ignored for a full model.

    Raises:
        CodecError: a delta whose base version is not the held version (or nothing is held,
            or the held model has another length), or a payload the chain refuses.
    """
    values = chain_of(download.encoded.spec).decode(download.encoded)
    if download.base_version is None:
        return values
    if held is None:
        raise CodecError(f"download is a delta against version {download.base_version}, but no model is held")
    if held[0] != download.base_version:
        raise CodecError(
            f"download is a delta against version {download.base_version}, but version {held[0]} is held"
        )
    base = as_update(held[1])
    if base.size != values.size:
        raise CodecError(f"download delta has {values.size} elements, the held model {base.size}")
    with np.errstate(over="ignore"):  # an overflowing entry is patched, or refused below
        out = base + values
    if download.patch is not None:
        _apply_patch(out, download.patch)
    if not np.isfinite(out).all():
        raise CodecError("download delta overflows float32 when added to the held model")
    return out


def download_to_bytes(download: Download) -> bytes:
    """Serialise with :func:`~shoal.codec.wire.to_bytes`, versions in the checksummed context.

    A patch follows as a second payload; the first one's context gives its length
    (``"patch"``), so a truncated or appended patch is refused.
    """
    base = -1 if download.base_version is None else download.base_version
    context = {"version": download.version, "base_version": base}
    if download.patch is None:
        return to_bytes(download.encoded, context=context)
    patch = to_bytes(download.patch)
    return to_bytes(download.encoded, context={**context, "patch": len(patch)}) + patch


def download_from_bytes(b: bytes | bytearray | memoryview, *, max_elements: int,
                        bare_version: int | None = None) -> Download:
    """Parse a serialised download (validated; decode with :func:`decode_download`).

    Args:
        b: the received bytes.
        max_elements: largest model length accepted.
        bare_version: when given, a payload without a versions context (a bare model, as
            servers sent before delta downloads) is read as the full model of this version.

    Raises:
        CodecError: anything :func:`~shoal.codec.wire.parse` refuses, missing/invalid versions,
            or a patch that is missing, truncated, followed by extra bytes or on a full model.
    """
    view = memoryview(b).cast("B")
    head = frame_length(view)
    parsed = parse(view[:head], max_elements=max_elements)
    ctx = parsed.context
    if not ctx and bare_version is not None:
        return Download(_check_version(bare_version, "bare_version"), None, parsed.encoded)
    if not {"version", "base_version"} <= set(ctx) <= {"version", "base_version", "patch"}:
        raise CodecError(f"download context must hold version and base_version (and "
                         f"optionally patch), got {sorted(ctx)}")
    version, base = ctx["version"], ctx["base_version"]
    if not (version >= 0 and -1 <= base <= version):
        raise CodecError(f"download versions invalid: version={version}, base_version={base}")
    patch_len = ctx.get("patch", 0)
    if len(view) - head != patch_len or (patch_len and base == -1):
        raise CodecError(f"download carries {len(view) - head} bytes after the model payload, "
                         f"its context announces a patch of {patch_len}"
                         + (" (a full model has no patch)" if base == -1 and patch_len else ""))
    patch = parse(view[head:], max_elements=max_elements).encoded if patch_len else None
    return Download(version, None if base == -1 else base, parsed.encoded, patch)


def smallest_download(new_params: np.ndarray, new_version: int,
                      base: tuple[int, np.ndarray] | None, codec: Codec, max_staleness: int,
                      *, rng: np.random.Generator) -> tuple[Download, bytes]:
    """The download a device needs, serialised: the full model, or the exact delta against
    ``base`` (see :func:`encode_download`) when that is usable and smaller.

    A delta that overflows float32 falls back to the full model.

    Raises:
        ConfigError: negative versions or staleness.
        CodecError: non-finite parameters.
    """
    full = encode_download(new_params, new_version, None, codec, max_staleness, rng=rng)
    best = (full, download_to_bytes(full))
    if base is None:
        return best
    try:
        dl = encode_download(new_params, new_version, base, codec, max_staleness, rng=rng,
                             exact=True)
    except CodecError:  # new − base overflows: only the full model can carry it
        return best
    if dl.is_delta:
        blob = download_to_bytes(dl)
        if len(blob) < len(best[1]):
            return dl, blob
    return best


@dataclass(frozen=True, eq=False)
class ModelHistory:
    """The last ``capacity`` model versions a server keeps as delta bases (oldest evicted)."""

    capacity: int
    versions: tuple[tuple[int, np.ndarray], ...] = ()

    def __post_init__(self) -> None:
        if type(self.capacity) is not int or self.capacity < 1:
            raise ConfigError(
                f"history capacity must be an integer ≥ 1, got {self.capacity!r}", key="capacity"
            )

    def push(self, version: int, params: np.ndarray) -> ModelHistory:
        """A new history with ``(version, copy of params)`` appended; versions must increase."""
        _check_version(version, "version")
        if self.versions and version <= self.versions[-1][0]:
            raise ConfigError(f"version {version} is not newer than {self.versions[-1][0]}", key="version")
        kept = self.versions[max(0, len(self.versions) - self.capacity + 1) :]
        return ModelHistory(self.capacity, (*kept, (version, as_update(params).copy())))

    def get(self, version: int | None) -> tuple[int, np.ndarray] | None:
        """``(version, params)`` if still kept, else ``None`` (the caller then sends the full model)."""
        for v, params in self.versions:
            if v == version:
                return v, params
        return None
