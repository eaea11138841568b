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
(≤ 1 ulp of the larger operand per element). With a lossy chain the device's copy deviates
from the server's version by the codec error, and successive delta syncs accumulate those
deviations until the next full download; prefer lossless chains for downloads, or bound the
drift with a small ``max_staleness`` schedule of full syncs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shoal.codec.chain import chain_of
from shoal.codec.encoded import Codec, Encoded, as_update
from shoal.codec.wire import parse, to_bytes
from shoal.errors import CodecError, ConfigError

__all__ = [
    "Download",
    "ModelHistory",
    "encode_download",
    "decode_download",
    "download_to_bytes",
    "download_from_bytes",
]


@dataclass(frozen=True, eq=False)
class Download:
    """A model sent to a device: full (``base_version is None``) or a delta against a base."""

    version: int
    base_version: int | None
    encoded: Encoded

    @property
    def is_delta(self) -> bool:
        return self.base_version is not None


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
            return Download(new_version, base_version, codec.encode(delta, rng))
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
    out = base + values
    if not np.isfinite(out).all():
        raise CodecError("download delta overflows float32 when added to the held model")
    return out


def download_to_bytes(download: Download) -> bytes:
    """Serialise with :func:`~shoal.codec.wire.to_bytes`, versions in the checksummed context."""
    base = -1 if download.base_version is None else download.base_version
    return to_bytes(download.encoded, context={"version": download.version, "base_version": base})


def download_from_bytes(b: bytes | bytearray | memoryview, *, max_elements: int) -> Download:
    """Parse a serialised download (validated; decode with :func:`decode_download`).

    Raises:
        CodecError: anything :func:`~shoal.codec.wire.parse` refuses, or missing/invalid versions.
    """
    parsed = parse(b, max_elements=max_elements)
    ctx = parsed.context
    if set(ctx) != {"version", "base_version"}:
        raise CodecError(f"download context must hold version and base_version, got {sorted(ctx)}")
    version, base = ctx["version"], ctx["base_version"]
    if not (version >= 0 and -1 <= base <= version):
        raise CodecError(f"download versions invalid: version={version}, base_version={base}")
    return Download(version, None if base == -1 else base, parsed.encoded)


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
