"""Sparsifiers: keep k of d coordinates and send (indices, values).

* :class:`TopK` keeps the k largest magnitudes (biased; use with error feedback: Stich,
  Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018).
* :class:`RandomK` keeps k uniformly random coordinates; with ``unbiased=True`` the kept values
  are scaled by d/k so that ``E[decode(encode(x))] = x`` (same paper; Konečný et al.,
  "Federated Learning: Strategies for Improving Communication Efficiency", 2016).

Indices are sent in whichever form is smallest: a bitmap of d bits, or the gaps between sorted
indices as uint16 (when every gap fits) or uint32. Gaps are stored as ``idx[i] - idx[i-1] - 1``
(with ``idx[-1] = -1``), so an unsorted or duplicated index set cannot even be expressed; the
decoder still checks that the last index is below d and that a bitmap has exactly k bits set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from shoal.codec.encoded import Encoded, Param, Role, expect_field, expect_meta
from shoal.errors import CodecError, ConfigError

__all__ = [
    "TopK",
    "RandomK",
    "INDEX_BITMAP",
    "INDEX_GAP16",
    "INDEX_GAP32",
    "encode_indices",
    "decode_indices",
]

INDEX_BITMAP = 0
INDEX_GAP16 = 1
INDEX_GAP32 = 2
_GAP_DTYPES = {INDEX_GAP16: "<u2", INDEX_GAP32: "<u4"}


def encode_indices(idx: np.ndarray, size: int) -> tuple[int, np.ndarray]:
    """Compactly encode strictly increasing indices below ``size``.

    Returns:
        ``(format, array)``: :data:`INDEX_BITMAP` (uint8, ⌈size/8⌉ bytes), or
        :data:`INDEX_GAP16` / :data:`INDEX_GAP32` (one gap per index), whichever is smallest.
    """
    gaps = np.diff(idx, prepend=-1) - 1
    bitmap_bytes = -(-size // 8)
    fits16 = idx.size == 0 or int(gaps.max()) <= 0xFFFF
    gap_bytes = idx.size * (2 if fits16 else 4)
    if bitmap_bytes < gap_bytes:
        mask = np.zeros(size, dtype=bool)
        mask[idx] = True
        return INDEX_BITMAP, np.packbits(mask, bitorder="little")
    fmt = INDEX_GAP16 if fits16 else INDEX_GAP32
    return fmt, gaps.astype(_GAP_DTYPES[fmt])


def decode_indices(fmt: int, arr: np.ndarray, size: int, k: int, *, stage: str) -> np.ndarray:
    """Inverse of :func:`encode_indices` on untrusted input; returns sorted int64 indices.

    Raises:
        CodecError: wrong dtype or length for ``fmt``, an index ≥ ``size``, a bitmap whose
            popcount is not ``k`` or whose padding bits are set.
    """
    if fmt == INDEX_BITMAP:
        _expect_array(arr, "u1", -(-size // 8), stage, "indices")
        bits = np.unpackbits(arr, bitorder="little")
        if bits[size:].any():
            raise CodecError(f"{stage}: index bitmap has bits set beyond the vector length {size}")
        idx = np.flatnonzero(bits[:size])
        if idx.size != k:
            raise CodecError(f"{stage}: index bitmap has {idx.size} bits set, expected {k} values")
        return idx
    _expect_array(arr, _GAP_DTYPES[fmt], k, stage, "indices")
    idx = np.cumsum(arr.astype(np.int64) + 1) - 1
    if k and int(idx[-1]) >= size:
        raise CodecError(f"{stage}: index {int(idx[-1])} out of range for a vector of length {size}")
    return idx


def _expect_array(arr: np.ndarray, dtype: str, length: int, stage: str, name: str) -> None:
    if arr.dtype != np.dtype(dtype) or arr.size != length:
        raise CodecError(
            f"{stage}: field {name!r} is {arr.size} × {arr.dtype}, expected {length} × {np.dtype(dtype)}"
        )


def _check_amount(fraction: object, k: object, stage: str) -> None:
    if (fraction is None) == (k is None):
        raise ConfigError(f"{stage}: give exactly one of fraction and k", key=f"{stage}.fraction")
    # exact types: bool and numpy scalars are refused
    if fraction is not None and (type(fraction) is not int and type(fraction) is not float
                                 or not 0 < fraction <= 1):
        raise ConfigError(f"{stage}.fraction must be in (0, 1], got {fraction!r}", key=f"{stage}.fraction")
    if k is not None and (type(k) is not int or k < 1):
        raise ConfigError(f"{stage}.k must be an integer ≥ 1, got {k!r}", key=f"{stage}.k")


def _kept(fraction: float | None, k: int | None, size: int) -> int:
    if k is not None:
        return min(k, size)
    assert fraction is not None
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


class _Sparsifier:
    """Shared plumbing: dense ``"values"`` in, ``"indices"`` + kept ``"values"`` out."""

    name: ClassVar[str]
    role: ClassVar[Role] = "sparsify"
    produces: ClassVar[frozenset[str]] = frozenset({"indices", "values"})
    meta_keys: ClassVar[frozenset[str]] = frozenset({"index_format"})
    fraction: float | None
    k: int | None

    def kept(self, size: int) -> int:
        """Number of coordinates kept from a vector of length ``size``."""
        return _kept(self.fraction, self.k, size)

    def _pack(self, e: Encoded, idx: np.ndarray, values: np.ndarray) -> Encoded:
        fmt, arr = encode_indices(idx, e.size)
        return e.swap(
            ["values"],
            {"indices": arr, "values": values},
            count=int(idx.size),
            meta={**e.meta, "index_format": fmt},
        )

    def _dense(self, e: Encoded) -> np.ndarray:
        if e.count != e.size or "indices" in e.fields:
            raise CodecError(f"{self.name}: input is already sparse")
        return expect_field(e, "values", "<f4", e.size, stage=self.name)

    def decode(self, e: Encoded) -> Encoded:
        k = self.kept(e.size)
        if e.count != k:
            raise CodecError(f"{self.name}: payload carries {e.count} values, expected {k} for d={e.size}")
        fmt = expect_meta(e, "index_format", INDEX_BITMAP, INDEX_GAP32, stage=self.name)
        values = expect_field(e, "values", "<f4", k, stage=self.name)
        packed = e.fields.get("indices")
        if packed is None:
            raise CodecError(f"{self.name}: field 'indices' missing")
        idx = decode_indices(fmt, packed, e.size, k, stage=self.name)
        dense = np.zeros(e.size, dtype=np.float32)
        dense[idx] = values
        meta = {key: v for key, v in e.meta.items() if key != "index_format"}
        return e.swap(["indices"], {"values": dense}, count=e.size, meta=meta)


@dataclass(frozen=True)
class TopK(_Sparsifier):
    """Keep the ``k`` (or ``⌈fraction·d⌉``, at least 1) largest-magnitude coordinates."""

    fraction: float | None = None
    k: int | None = None

    name: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        _check_amount(self.fraction, self.k, self.name)

    def params(self) -> dict[str, Param]:
        return {"fraction": self.fraction, "k": self.k}

    def encode(self, e: Encoded, rng: np.random.Generator) -> Encoded:
        v = self._dense(e)
        k = self.kept(v.size)
        if k == v.size:
            idx = np.arange(v.size)
        else:
            idx = np.sort(np.argpartition(np.abs(v), v.size - k)[v.size - k :])
        return self._pack(e, idx, v[idx])


@dataclass(frozen=True)
class RandomK(_Sparsifier):
    """Keep ``k`` coordinates drawn uniformly without replacement; scale by d/k if ``unbiased``."""

    fraction: float | None = None
    k: int | None = None
    unbiased: bool = True

    name: ClassVar[str] = "randk"

    def __post_init__(self) -> None:
        _check_amount(self.fraction, self.k, self.name)
        if type(self.unbiased) is not bool:
            raise ConfigError(f"randk.unbiased must be a bool, got {self.unbiased!r}", key="randk.unbiased")

    def params(self) -> dict[str, Param]:
        return {"fraction": self.fraction, "k": self.k, "unbiased": self.unbiased}

    def encode(self, e: Encoded, rng: np.random.Generator) -> Encoded:
        v = self._dense(e)
        k = self.kept(v.size)
        idx = np.sort(rng.choice(v.size, size=k, replace=False)) if k else np.zeros(0, np.int64)
        values = v[idx]
        if self.unbiased and k:
            with np.errstate(over="ignore"):
                values = values * np.float32(v.size / k)
            if not np.isfinite(values).all():
                raise CodecError(f"randk: a kept value times d/k = {v.size / k:.4g} overflows float32")
        return self._pack(e, idx, values)
