"""The registry as columns: what selection reads, one numpy array per field.

A :class:`Columns` view holds every enrolled device in device-id order (row ``i`` is the
``i``-th smallest id), with one array per field -- last seen, enrolment time, participation,
availability windows in compressed-row form, and each attribute as a categorical code column.
Filters (:meth:`Columns.mask`) and the selectors of :mod:`shoal.selection` are vector
operations over these arrays, so choosing 100 devices out of a million costs a few passes over
a few arrays and no Python object per device.

Device ids are stored as UTF-8 bytes (numpy ``S`` dtype). Byte order of UTF-8 is code-point
order, which is also the order of Python ``str`` and of SQLite's default collation, so every
registry sorts ids the same way.

:meth:`Columns.of_size` is the population of the simulator: ``n`` clients known only by their
position, with zero-stride (O(1) memory) columns saying "never seen, never participated,
always available, no attributes".
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field

import numpy as np

from shoal.registry.base import Device, minute_of_week
from shoal.registry.validation import (
    MAX_ID_LENGTH,
    AttrValue,
    RegistryError,
    _attr_value,
    validate_attributes,
    validate_device_id,
    validate_windows,
)

__all__ = ["Attribute", "Columns", "bulk_rows", "check_bulk", "encode_ids", "find_ids",
           "sequential_ids",
           "stratum_key"]


def stratum_key(value: AttrValue | None) -> tuple[int, float | str]:
    """Sort key of an attribute value: missing < numbers (``2 == 2.0``) < strings."""
    if value is None:
        return (0, 0.0)
    if isinstance(value, str):
        return (2, value)
    return (1, float(value))


def _category(value: AttrValue) -> tuple[str, AttrValue]:
    # 2 and 2.0 are equal (and hash alike) but must come back with their own type.
    return (type(value).__name__, value)


@dataclass(frozen=True, eq=False)
class Attribute:
    """One attribute as a categorical column.

    Attributes:
        codes: int32 per row; ``-1`` where the device does not carry the attribute.
        values: the category of each code (``values[codes[i]]``), each distinct value once.
    """

    codes: np.ndarray
    values: tuple[AttrValue, ...]

    def value_at(self, row: int) -> AttrValue | None:
        code = int(self.codes[row])
        return None if code < 0 else self.values[code]

    def equal_to(self, value: AttrValue) -> np.ndarray:
        """Rows whose value equals ``value`` (``3 == 3.0``, ``"3" != 3``)."""
        hits = [c for c, v in enumerate(self.values)
                if isinstance(v, str) == isinstance(value, str) and v == value]
        return np.isin(self.codes, np.asarray(hits, dtype=np.int32))

    @classmethod
    def encode(cls, values: Sequence[AttrValue | None] | np.ndarray, name: str) -> Attribute:
        """Code a column of values (``None`` = missing), validating each distinct value.

        A numeric or string numpy array is coded in one ``np.unique`` pass; a masked array
        (``np.ma``) is too, its masked entries being missing.

        Raises:
            RegistryError: a value is not a str, int or finite float (naming the attribute).
        """
        validate_attributes({name: 0})  # the name's alphabet and length
        where = f"attributes.{name}"
        arr = np.asanyarray(values) if isinstance(values, np.ndarray) else None
        if arr is not None and arr.dtype.kind in "iufU":
            present = ~np.ma.getmaskarray(arr).reshape(-1)
            data = np.ma.getdata(arr).reshape(-1)[present]
            if data.dtype.kind == "f" and not np.isfinite(data).all():
                raise RegistryError(f"{where} must be finite", field=where)
            uniq, inverse = np.unique(data, return_inverse=True)
            cats = tuple(_attr_value(v, where, None) for v in uniq.tolist())
            codes = np.full(present.size, -1, dtype=np.int32)
            codes[present] = inverse.reshape(-1)
            return cls(codes, cats)
        index: dict[tuple[str, AttrValue], int] = {}
        out = np.empty(len(values), dtype=np.int32)
        for i, v in enumerate(values.tolist() if isinstance(values, np.ndarray) else values):
            if v is None:
                out[i] = -1
                continue
            v = _attr_value(v, where, None)
            out[i] = index.setdefault(_category(v), len(index))
        return cls(out, tuple(v for _, v in index))


@dataclass(frozen=True, eq=False)
class Columns:
    """Every enrolled device, one array per field, rows in device-id order.

    Attributes:
        size: number of devices (rows).
        ids: the device ids as sorted, unique UTF-8 bytes; ``None`` for :meth:`of_size`.
        last_seen, enrolled_at: float64 UNIX seconds.
        participation: int64 accepted updates.
        window_offsets: int64, ``size + 1`` entries: row ``i``'s windows are
            ``window_start[o[i]:o[i+1]]`` / ``window_end[...]`` (minutes of the week).
        attributes: attribute name -> :class:`Attribute`.

    A view shares memory with the registry it came from: read it at once (select), or copy
    the arrays you keep; later writes to the registry may show through.
    """

    size: int
    ids: np.ndarray | None
    last_seen: np.ndarray
    enrolled_at: np.ndarray
    participation: np.ndarray
    window_offsets: np.ndarray
    window_start: np.ndarray
    window_end: np.ndarray
    attributes: Mapping[str, Attribute] = field(default_factory=dict)

    @classmethod
    def of_size(cls, n: int) -> Columns:
        """``n`` anonymous clients (the simulator's population) in O(1) memory."""
        zeros = np.broadcast_to(np.float64(0.0), (n,))
        empty = np.zeros(0, dtype=np.int32)
        return cls(size=n, ids=None, last_seen=zeros, enrolled_at=zeros,
                   participation=np.broadcast_to(np.int64(0), (n,)),
                   window_offsets=np.broadcast_to(np.int64(0), (n + 1,)),
                   window_start=empty, window_end=empty)

    @classmethod
    def from_rows(cls, ids: Sequence[str], enrolled_at: Sequence[float],
                  last_seen: Sequence[float], participation: Sequence[int],
                  attributes: Iterable[tuple[int, str, AttrValue]],
                  windows: Iterable[tuple[int, int, int]]) -> Columns:
        """Columns of a store's rows, already in device-id order and valid (what a registry
        read back), without building a :class:`~shoal.registry.Device` per row.

        Args:
            ids, enrolled_at, last_seen, participation: one entry per row.
            attributes: ``(row, name, value)`` for every attribute a row carries.
            windows: ``(row, start, end)`` for every window, rows ascending.
        """
        n = len(ids)
        by_name: dict[str, builtins.list[AttrValue | None]] = {}
        for row, name, value in attributes:
            column = by_name.get(name)
            if column is None:
                column = by_name[name] = [None] * n
            column[row] = value
        win = np.array(builtins.list(windows), dtype=np.int64).reshape(-1, 3)
        counts = np.bincount(win[:, 0], minlength=n)
        return cls(
            size=n, ids=encode_ids(ids, check=False),
            last_seen=np.array(last_seen, dtype=np.float64),
            enrolled_at=np.array(enrolled_at, dtype=np.float64),
            participation=np.array(participation, dtype=np.int64),
            window_offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
            window_start=win[:, 1].astype(np.int32), window_end=win[:, 2].astype(np.int32),
            attributes={name: Attribute.encode(values, name)
                        for name, values in sorted(by_name.items())})

    @classmethod
    def from_devices(cls, devices: Iterable[Device]) -> Columns:
        """Columns of :class:`~shoal.registry.Device` records (any order).

        Raises:
            RegistryError: a device id appears twice.
        """
        devs = sorted(devices, key=lambda d: d.device_id)
        for a, b in zip(devs, devs[1:]):
            if a.device_id == b.device_id:
                raise RegistryError(f"device {a.device_id!r} appears twice among the "
                                    f"candidates", device_id=a.device_id)
        counts = np.fromiter((len(d.windows) for d in devs), dtype=np.int64, count=len(devs))
        wins = [w for d in devs for w in d.windows]
        names = sorted({n for d in devs for n in d.attributes})
        return cls(
            size=len(devs), ids=encode_ids([d.device_id for d in devs], check=False),
            last_seen=np.array([d.last_seen for d in devs], dtype=np.float64),
            enrolled_at=np.array([d.enrolled_at for d in devs], dtype=np.float64),
            participation=np.array([d.participation for d in devs], dtype=np.int64),
            window_offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
            window_start=np.array([s for s, _ in wins], dtype=np.int32),
            window_end=np.array([e for _, e in wins], dtype=np.int32),
            attributes={n: Attribute.encode([d.attributes.get(n) for d in devs], n)
                        for n in names})

    # -- reading --------------------------------------------------------------------------

    def id_of(self, row: int) -> str:
        if self.ids is None:
            raise RegistryError("an anonymous population (Columns.of_size) has no device ids")
        return bytes(self.ids[row]).decode()

    def ids_at(self, rows: np.ndarray | Sequence[int]) -> builtins.list[str]:
        """The device ids of ``rows``, in that order."""
        return [self.id_of(int(r)) for r in rows]

    def row_of(self, device_id: str) -> int:
        """The row of ``device_id``, or ``-1``."""
        if self.ids is None or self.size == 0:
            return -1
        key = device_id.encode()
        i = int(np.searchsorted(self.ids, key))
        return i if i < self.size and self.ids[i] == key else -1

    # -- filters --------------------------------------------------------------------------

    def available(self, now: float) -> np.ndarray:
        """Rows whose windows cover ``now`` (rows without windows: always)."""
        m = minute_of_week(now)
        s, e = self.window_start, self.window_end
        if s.size == 0:  # nobody declared a window (e.g. a simulated population)
            return np.ones(self.size, dtype=bool)
        covers = np.where(s < e, (s <= m) & (m < e), (m >= s) | (m < e))
        # the row owning window j: the last row whose windows start at or before j
        owner = np.searchsorted(self.window_offsets, np.flatnonzero(covers), side="right") - 1
        hit = np.zeros(self.size, dtype=bool)
        hit[owner] = True
        return hit | (self.window_offsets[1:] == self.window_offsets[:-1])

    def mask(self, *, where: Mapping[str, AttrValue] | None = None,
             seen_since: float | None = None, available_at: float | None = None
             ) -> np.ndarray:
        """Rows matching the registry filters (see :class:`~shoal.registry.Registry`)."""
        ok = np.ones(self.size, dtype=bool)
        for name, value in validate_attributes(where).items():
            attr = self.attributes.get(name)
            ok &= attr.equal_to(value) if attr is not None else False
        if seen_since is not None:
            ok &= self.last_seen >= seen_since
        if available_at is not None:
            ok &= self.available(available_at)
        return ok

    def strata(self, attribute: str) -> tuple[np.ndarray, int]:
        """``(stratum of each row, number of strata)`` for ``attribute``'s values, strata
        numbered in :func:`stratum_key` order (missing first)."""
        attr = self.attributes.get(attribute)
        if attr is None:
            return np.zeros(self.size, dtype=np.int64), min(self.size, 1)
        keys = {stratum_key(v) for v in attr.values}
        if (attr.codes < 0).any():
            keys.add(stratum_key(None))
        index = {k: i for i, k in enumerate(sorted(keys))}
        # one entry per code, and a last one that code -1 (missing) picks
        of_code = np.array([index[stratum_key(v)] for v in attr.values]
                           + [index.get(stratum_key(None), 0)], dtype=np.int64)
        return of_code[attr.codes], len(index)


# ---------------------------------------------------------------------------------------------
# Ids
# ---------------------------------------------------------------------------------------------


def sequential_ids(n: int, prefix: str = "client-") -> np.ndarray:
    """``prefix`` + zero-padded ``0 .. n-1`` as UTF-8 bytes, sorted: id order is number order
    (the simulator's client ``i`` is row ``i``). Built without a Python object per id."""
    width = max(1, len(str(max(n - 1, 0))))
    digits = (np.arange(n, dtype=np.int64)[:, None] // 10 ** np.arange(width - 1, -1, -1)) % 10
    head = np.frombuffer(prefix.encode(), dtype=np.uint8)
    raw = np.concatenate([np.broadcast_to(head, (n, head.size)),
                          (digits + ord("0")).astype(np.uint8)], axis=1)
    return np.ascontiguousarray(raw).view(f"S{head.size + width}").reshape(n)


def encode_ids(ids: Iterable[str] | np.ndarray, *, check: bool = True) -> np.ndarray:
    """Device ids as a UTF-8 ``S`` array (input order), each validated like
    :func:`~shoal.registry.validate_device_id`. ASCII ``S``/``U`` arrays are checked as
    byte matrices, without a Python object per id.

    Raises:
        RegistryError: an id is invalid (naming it).
    """
    arr = np.asarray(ids) if isinstance(ids, np.ndarray) else None
    if arr is not None and arr.dtype.kind == "U":
        try:
            arr = arr.astype(f"S{max(arr.dtype.itemsize // 4, 1)}")
        except UnicodeEncodeError:
            arr = None
            ids = builtins.list(np.asarray(ids).tolist())
    if arr is None or arr.dtype.kind != "S":
        strs = [validate_device_id(i) for i in ids] if check else builtins.list(ids)
        enc = [s.encode() for s in strs]
        width = max((len(b) for b in enc), default=1)
        return np.array(enc, dtype=f"S{max(width, 1)}")
    arr = arr.reshape(-1)
    if check and arr.size:
        _check_byte_ids(arr)
    return arr


def find_ids(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, found)``: where each of ``ids`` sits in the sorted ``S`` array
    ``sorted_ids``, and whether it is there. O(len(ids) x log n): the large array is never
    copied, only the few ids are cast to its width (an id wider than it cannot be in it).
    """
    if sorted_ids.size == 0 or ids.size == 0:
        return np.zeros(ids.size, np.int64), np.zeros(ids.size, bool)
    width = sorted_ids.dtype.itemsize
    fits = np.char.str_len(ids) <= width if ids.dtype.itemsize > width \
        else np.ones(ids.size, bool)
    want = ids.astype(sorted_ids.dtype)  # only ids that do not fit lose bytes here
    rows = np.minimum(np.searchsorted(sorted_ids, want), sorted_ids.size - 1)
    return rows.astype(np.int64), fits & (sorted_ids[rows] == want)


def _check_byte_ids(arr: np.ndarray) -> None:
    width = arr.dtype.itemsize
    raw = np.ascontiguousarray(arr).view(np.uint8).reshape(arr.size, width)
    nonzero = raw != 0
    length = np.where(nonzero.any(axis=1), width - np.argmax(nonzero[:, ::-1], axis=1), 0)
    inside = np.arange(width) < length[:, None]
    bad = (length == 0) | (length > MAX_ID_LENGTH) \
        | (inside & ((raw < 0x20) | (raw >= 0x7F))).any(axis=1)
    # Non-ASCII ids (valid or not) and every invalid one get the exact per-id check.
    for b in arr[bad].tolist():
        try:
            validate_device_id(b.decode())
        except UnicodeDecodeError:
            raise RegistryError(f"device_id {b!r} is not UTF-8", field="device_id") from None


def check_bulk(n: int, attributes: Mapping[str, Sized] | None,
               windows: Sequence[object] | None) -> None:
    """Refuse bulk-enrolment columns whose length is not the number of ids ``n``.

    Raises:
        RegistryError: naming the attribute (``attributes.<name>``) or ``windows``.
    """
    for name, values in (attributes or {}).items():
        if isinstance(values, (str, bytes)) or len(values) != n:
            raise RegistryError(f"attributes.{name} must give one value per device id ({n}), "
                                f"got {len(values) if hasattr(values, '__len__') else values!r}",
                                field=f"attributes.{name}")
    if windows is not None and len(windows) != n:
        raise RegistryError(f"windows must give one list per device id ({n}), got "
                            f"{len(windows)}", field="windows")


def bulk_rows(ids: Sequence[str], attributes: Mapping[str, Sequence[AttrValue | None]] | None,
              windows: Sequence[Sequence[Sequence[int]]] | None
              ) -> builtins.list[tuple[str, dict[str, AttrValue], tuple[tuple[int, int], ...]]]:
    """Per device of a bulk enrolment, ``(id, attributes, windows)`` validated (attribute
    columns give one value per id, ``None`` where a device lacks it).

    Raises:
        RegistryError: a column has the wrong length, or a value is invalid (naming the
            device and the field).
    """
    check_bulk(len(ids), attributes, windows)
    columns = {name: (v.tolist() if hasattr(v, "tolist") else builtins.list(v))
               for name, v in (attributes or {}).items()}
    return [(device_id,
             validate_attributes({n: col[k] for n, col in columns.items()
                                  if col[k] is not None}, device_id=device_id),
             validate_windows(windows[k] if windows is not None else None,
                              device_id=device_id))
            for k, device_id in enumerate(ids)]
