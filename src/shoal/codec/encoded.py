"""The intermediate representation every codec stage reads and writes.

An update travels through a chain of stages (sparsify → quantize → entropy-code). Between two
stages it is an :class:`Encoded`: a few *named* one-dimensional numpy arrays plus a handful of
per-payload integers. Names are the contract between stages:

* ``"values"`` is the value stream: ``count`` float32 numbers (the whole vector, or the kept
  entries after a sparsifier). A value stage (cast, quantizer, sign) consumes it and writes its
  own fields (``"codes"``, ``"step"``, ...); its decode writes ``"values"`` back.
* ``"indices"`` is the compact position set a sparsifier writes next to the kept values.
* ``"zstd"`` is one compressed frame holding every other field (entropy stage, always last).

The field table (:func:`pack_fields` / :func:`unpack_fields`) is the one byte layout of a set of
named arrays; the wire format and the zstd stage both use it, and :func:`unpack_fields` validates
every length before it creates a (zero-copy) view.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, Protocol, TypeAlias

import numpy as np

from shoal.errors import CodecError

__all__ = [
    "Encoded",
    "Stage",
    "Codec",
    "Role",
    "Param",
    "StageSpec",
    "ChainSpec",
    "MAX_SIZE",
    "FIELD_DTYPES",
    "as_update",
    "pack_fields",
    "unpack_fields",
    "expect_field",
    "expect_meta",
]

Param: TypeAlias = "bool | int | float | str | None"
StageSpec: TypeAlias = "tuple[str, Mapping[str, Param]]"
ChainSpec: TypeAlias = "tuple[StageSpec, ...]"
Role = Literal["sparsify", "value", "entropy"]

#: Largest vector a codec accepts: indices and field lengths are stored as uint32.
MAX_SIZE = 2**32 - 1

#: The only dtypes a field may have on the wire (code byte → little-endian dtype).
FIELD_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("u1"),
    2: np.dtype("<u2"),
    3: np.dtype("<u4"),
    4: np.dtype("<f2"),
    5: np.dtype("<f4"),
}
_DTYPE_CODES = {dt: code for code, dt in FIELD_DTYPES.items()}
_MAX_FIELDS = 16
_MAX_NAME = 32
_ENTRY = struct.Struct("<BI")  # dtype code, element count (after the length-prefixed name)


@dataclass(frozen=True, eq=False)
class Encoded:
    """An update between (or after) codec stages.

    Attributes:
        size: length of the dense float32 vector this decodes to.
        count: logical entries in the value stream (``size`` unless a sparsifier ran).
        fields: named one-dimensional arrays (see the module docstring for the names).
        meta: per-payload integers a decoder needs (e.g. ``"index_format"``).
        spec: the chain that produced it, ``((name, params), ...)``; empty between stages.
    """

    size: int
    count: int
    fields: Mapping[str, np.ndarray]
    meta: Mapping[str, int] = field(default_factory=dict)
    spec: ChainSpec = ()

    @property
    def nbytes(self) -> int:
        """Bytes of array data carried (the wire adds a small header on top)."""
        return sum(int(a.nbytes) for a in self.fields.values())

    def swap(
        self, drop: Iterable[str], add: Mapping[str, np.ndarray], **changes: Any
    ) -> Encoded:
        """A copy with the ``drop`` fields removed, ``add`` fields set and ``changes`` applied."""
        dropped = frozenset(drop)
        fields = {k: v for k, v in self.fields.items() if k not in dropped}
        fields.update(add)
        return replace(self, fields=fields, **changes)


class Stage(Protocol):
    """One step of a chain: transforms an :class:`Encoded` and undoes it.

    ``encode`` and ``decode`` sit side by side in every implementation. ``decode`` receives
    untrusted input: it validates the fields it owns (dtype, length, ranges) and raises
    :class:`~shoal.errors.CodecError` before allocating anything larger than ``size``.
    """

    name: ClassVar[str]
    role: ClassVar[Role]

    @property
    def produces(self) -> frozenset[str]:
        """Fields this stage's ``encode`` writes (it consumes ``"values"``, or all for zstd)."""
        ...

    @property
    def meta_keys(self) -> frozenset[str]:
        """Keys this stage's ``encode`` adds to :attr:`Encoded.meta`."""
        ...

    def params(self) -> dict[str, Param]: ...

    def encode(self, e: Encoded, rng: np.random.Generator) -> Encoded: ...

    def decode(self, e: Encoded) -> Encoded: ...


class Codec(Protocol):
    """A whole update codec: a flat float32 vector in, an :class:`Encoded` out, and back."""

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Encoded: ...

    def decode(self, e: Encoded) -> np.ndarray: ...


def as_update(x: np.ndarray) -> np.ndarray:
    """Check that ``x`` is a finite 1-D float vector and return it as float32.

    Raises:
        CodecError: wrong shape or dtype, too long, or a NaN/Inf entry (refused, not encoded).
    """
    if not isinstance(x, np.ndarray) or x.ndim != 1:
        shape = getattr(x, "shape", type(x).__name__)
        raise CodecError(f"update must be a 1-D numpy array, got shape {shape}")
    if x.dtype.kind != "f":
        raise CodecError(f"update must be floating point, got dtype {x.dtype}")
    if x.size > MAX_SIZE:
        raise CodecError(f"update has {x.size} elements, above the limit {MAX_SIZE}")
    with np.errstate(over="ignore"):
        x32 = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x32)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise CodecError(
            f"update has {bad.size} non-finite entries (first at index {int(bad[0])}, "
            f"value {x.flat[int(bad[0])]!r}); refusing to encode NaN/Inf"
        )
    return x32


def pack_fields(fields: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named 1-D arrays: a table (count, then name/dtype/length each), then the data."""
    if len(fields) > _MAX_FIELDS:
        raise CodecError(f"{len(fields)} fields, above the limit {_MAX_FIELDS}")
    table = [struct.pack("<B", len(fields))]
    for name, arr in fields.items():
        raw_name = name.encode("ascii")
        code = _DTYPE_CODES.get(arr.dtype.newbyteorder("<"))
        if code is None or arr.ndim != 1 or not 0 < len(raw_name) <= _MAX_NAME:
            raise CodecError(f"field {name!r} of dtype {arr.dtype}, ndim {arr.ndim} cannot be packed")
        table.append(struct.pack("<B", len(raw_name)) + raw_name + _ENTRY.pack(code, arr.size))
    data = [np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes() for a in fields.values()]
    return b"".join(table + data)


def unpack_fields(buf: bytes | memoryview) -> dict[str, np.ndarray]:
    """Parse :func:`pack_fields` output into read-only views over ``buf``.

    Raises:
        CodecError: truncated table, unknown dtype, bad or duplicate name, or data lengths that
            do not add up to exactly ``len(buf)``.
    """
    view = memoryview(buf).cast("B")
    if len(view) < 1:
        raise CodecError("field table truncated: no field count")
    n = view[0]
    if n > _MAX_FIELDS:
        raise CodecError(f"field table declares {n} fields, above the limit {_MAX_FIELDS}")
    pos = 1
    entries: list[tuple[str, np.dtype, int]] = []
    for i in range(n):
        if pos >= len(view):
            raise CodecError(f"field table truncated at entry {i}")
        name_len = view[pos]
        end = pos + 1 + name_len + _ENTRY.size
        if not 0 < name_len <= _MAX_NAME or end > len(view):
            raise CodecError(f"field table entry {i}: bad name length {name_len} or truncated")
        try:
            name = bytes(view[pos + 1 : pos + 1 + name_len]).decode("ascii")
        except UnicodeDecodeError as exc:
            raise CodecError(f"field table entry {i}: name is not ASCII") from exc
        code, length = _ENTRY.unpack_from(view, pos + 1 + name_len)
        if code not in FIELD_DTYPES:
            raise CodecError(f"field {name!r}: unknown dtype code {code}")
        if any(name == other for other, _, _ in entries):
            raise CodecError(f"field {name!r} appears twice")
        entries.append((name, FIELD_DTYPES[code], length))
        pos = end
    need = sum(dt.itemsize * length for _, dt, length in entries)
    if need != len(view) - pos:
        raise CodecError(
            f"field data is {len(view) - pos} bytes but the table declares {need} bytes"
        )
    out: dict[str, np.ndarray] = {}
    for name, dt, length in entries:
        arr = np.frombuffer(view, dtype=dt, count=length, offset=pos)
        out[name] = arr
        pos += dt.itemsize * length
    return out


def expect_field(e: Encoded, name: str, dtype: str, length: int, *, stage: str) -> np.ndarray:
    """Return ``e.fields[name]`` after checking its dtype and length (for stage decoders)."""
    arr = e.fields.get(name)
    if arr is None:
        raise CodecError(f"{stage}: field {name!r} missing")
    if arr.dtype != np.dtype(dtype) or arr.ndim != 1:
        raise CodecError(f"{stage}: field {name!r} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if arr.size != length:
        raise CodecError(f"{stage}: field {name!r} has {arr.size} entries, expected {length}")
    return arr


def expect_meta(e: Encoded, key: str, low: int, high: int, *, stage: str) -> int:
    """Return the integer ``e.meta[key]`` after checking ``low <= value <= high``."""
    value = e.meta.get(key)
    if type(value) is not int:
        raise CodecError(f"{stage}: meta {key!r} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise CodecError(f"{stage}: meta {key!r} = {value} outside [{low}, {high}]")
    return value
