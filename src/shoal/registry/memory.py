"""A client registry in memory, as numpy columns: a million idle clients in tens of megabytes.

The simulator's registry (and a fast one for tests): every field is a column -- ids (UTF-8
bytes), enrolment time, last seen, participation, availability windows in compressed-row form,
each attribute and the capabilities document as categorical codes -- with rows kept in
device-id order, so :meth:`MemoryRegistry.columns` hands selection zero-copy views. There is no
Python object per device: an idle device costs its bytes in each column (about 40 bytes plus
its id and 4 per attribute). Per-round outcomes live in :class:`~shoal.registry.outcome_log.
OutcomeLog`, a block of ``history`` slots per device that has reported, so they cost nothing
for idle devices.

Costs: reads, filters and field updates of a known device are O(log n) or vectorized O(n);
adding or removing *one* device shifts the columns (O(n)) to keep them sorted, so enrol large
populations with :meth:`MemoryRegistry.enroll_many` (one merge). Recording outcomes is
O(log n + history) per device, and :meth:`MemoryRegistry.record_outcomes` records a whole
cohort in one vectorized call. Attribute values are meant to be categories: each distinct
value is stored once.

Semantics, validation and error messages are those of :class:`~shoal.registry.Registry`;
``tests/test_registry.py`` runs one conformance suite over this and the SQLite registry.
"""

from __future__ import annotations

import builtins
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from shoal.registry.base import (
    Device,
    Outcome,
    UnknownDevice,
)
from shoal.registry.validation import (
    AttrValue,
    RegistryError,
    _check_time,
    _validate_round,
    check_batch_size,
    check_limit,
    validate_attributes,
    validate_capabilities,
    validate_device_id,
    validate_outcome,
    validate_windows,
)
from shoal.registry.columns import Attribute, Columns, check_bulk, encode_ids, find_ids
from shoal.registry.outcome_log import OutcomeLog

__all__ = ["MemoryRegistry"]

_NO_CAPABILITIES = "{}"


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


class _Categories:
    """Distinct values of one categorical column, each stored once (code = position)."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self._index: dict[tuple[str, Any], int] = {}

    def code(self, value: Any) -> int:
        key = (type(value).__name__, value)  # 2 and 2.0 are different categories
        code = self._index.get(key)
        if code is None:
            code = self._index[key] = len(self.values)
            self.values.append(value)
        return code

    def codes_of(self, attr: Attribute) -> np.ndarray:
        """``attr``'s codes translated to this column's codes (``-1`` stays ``-1``)."""
        table = np.array([self.code(v) for v in attr.values] + [-1], dtype=np.int32)
        return table[attr.codes]


class MemoryRegistry:
    """A :class:`~shoal.registry.Registry` held in numpy columns (see the module docstring).

    Args:
        history: outcomes kept per device (the most recent rounds).

    One lock guards every call, so a registry may be shared by threads.
    """

    def __init__(self, *, history: int = 20) -> None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise RegistryError(f"history must be an int >= 1, got {history!r}",
                                field="history")
        self.history = history
        self._lock = threading.Lock()
        self._closed = False
        self._ids = np.zeros(0, dtype="S1")
        self._enrolled = np.zeros(0, dtype=np.float64)
        self._seen = np.zeros(0, dtype=np.float64)
        self._part = np.zeros(0, dtype=np.int64)
        self._woff = np.zeros(1, dtype=np.int64)
        self._wstart = np.zeros(0, dtype=np.int16)
        self._wend = np.zeros(0, dtype=np.int16)
        self._attr_codes: dict[str, np.ndarray] = {}
        self._attr_values: dict[str, _Categories] = {}
        self._caps = _Categories()
        self._caps_codes = np.zeros(0, dtype=np.int32)
        self._log = OutcomeLog(history)
        self._caps.code(_NO_CAPABILITIES)

    # -- plumbing ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryError("registry in memory is closed")

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def __enter__(self) -> MemoryRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryRegistry({self._ids.size} devices)"

    def __len__(self) -> int:
        return int(self._ids.size)

    @property
    def nbytes(self) -> int:
        """Bytes held by the columns and the outcome log (not the few per-category values)."""
        arrays = [self._ids, self._enrolled, self._seen, self._part, self._woff, self._wstart,
                  self._wend, self._caps_codes, *self._attr_codes.values()]
        return sum(a.nbytes for a in arrays) + self._log.nbytes

    def _row(self, device_id: str) -> int:
        key = device_id.encode()
        i = int(np.searchsorted(self._ids, key))
        return i if i < self._ids.size and self._ids[i] == key else -1

    def _known_row(self, device_id: str) -> int:
        row = self._row(device_id)
        if row < 0:
            raise UnknownDevice(device_id)
        return row

    # -- structure: rows in, rows out -------------------------------------------------------

    def _insert(self, ids: np.ndarray, now: float, attrs: Mapping[str, Attribute],
                caps: np.ndarray, windows: Sequence[tuple[tuple[int, int], ...]] | None
                ) -> None:
        """Merge new devices (``ids`` sorted, unique, none enrolled) into the columns."""
        m = ids.size
        pos = np.searchsorted(self._ids, ids)
        width = max(self._ids.dtype.itemsize, ids.dtype.itemsize)
        old_n = self._ids.size
        self._ids = np.insert(self._ids.astype(f"S{width}"), pos, ids)
        times = np.full(m, now)
        self._enrolled = np.insert(self._enrolled, pos, times)
        self._seen = np.insert(self._seen, pos, times)
        self._part = np.insert(self._part, pos, np.zeros(m, dtype=np.int64))
        self._caps_codes = np.insert(self._caps_codes, pos, caps)
        for name in set(self._attr_codes) | set(attrs):
            codes = self._attr_codes.get(name, np.full(old_n, -1, dtype=np.int32))
            new = (self._attr_values.setdefault(name, _Categories()).codes_of(attrs[name])
                   if name in attrs else np.full(m, -1, dtype=np.int32))
            self._attr_codes[name] = np.insert(codes, pos, new)
        counts = np.zeros(m, dtype=np.int64)
        if windows is not None:
            counts = np.fromiter((len(w) for w in windows), dtype=np.int64, count=m)
            flat = np.array([p for w in windows for p in w], dtype=np.int16).reshape(-1, 2)
            at = np.repeat(self._woff[pos], counts)
            self._wstart = np.insert(self._wstart, at, flat[:, 0])
            self._wend = np.insert(self._wend, at, flat[:, 1])
        all_counts = np.insert(np.diff(self._woff), pos, counts)
        self._woff = np.concatenate(([0], np.cumsum(all_counts))).astype(np.int64)
        self._log.insert_rows(pos)

    def _delete(self, row: int) -> None:
        for name in ("_ids", "_enrolled", "_seen", "_part", "_caps_codes"):
            setattr(self, name, np.delete(getattr(self, name), row))
        for name, codes in self._attr_codes.items():
            self._attr_codes[name] = np.delete(codes, row)
        self._set_windows(row, ())
        self._woff = np.delete(self._woff, row + 1)
        self._log.delete_row(row)

    def _set_windows(self, row: int, windows: tuple[tuple[int, int], ...]) -> None:
        a, b = int(self._woff[row]), int(self._woff[row + 1])
        new = np.array(windows, dtype=np.int16).reshape(-1, 2)
        self._wstart = np.concatenate((self._wstart[:a], new[:, 0], self._wstart[b:]))
        self._wend = np.concatenate((self._wend[:a], new[:, 1], self._wend[b:]))
        self._woff[row + 1:] += len(windows) - (b - a)

    def _set_attributes(self, row: int, attributes: Mapping[str, AttrValue]) -> None:
        for name, codes in self._attr_codes.items():
            codes[row] = -1
        for name, value in attributes.items():
            if name not in self._attr_codes:
                self._attr_codes[name] = np.full(self._ids.size, -1, dtype=np.int32)
            self._attr_codes[name][row] = \
                self._attr_values.setdefault(name, _Categories()).code(value)

    def _device(self, row: int) -> Device:
        attrs = {name: self._attr_values[name].values[code]
                 for name, codes in self._attr_codes.items() if (code := int(codes[row])) >= 0}
        a, b = int(self._woff[row]), int(self._woff[row + 1])
        windows = tuple(zip(self._wstart[a:b].tolist(), self._wend[a:b].tolist()))
        return Device(device_id=bytes(self._ids[row]).decode(), attributes=attrs,
                      capabilities=json.loads(self._caps.values[int(self._caps_codes[row])]),
                      windows=windows, enrolled_at=float(self._enrolled[row]),
                      last_seen=float(self._seen[row]), participation=int(self._part[row]))

    # -- devices ----------------------------------------------------------------------------

    def enroll(self, device_id: str, *, now: float,
               attributes: Mapping[str, AttrValue] | None = None,
               capabilities: Mapping[str, Any] | None = None,
               windows: Sequence[Sequence[int]] | None = None) -> Device:
        """Insert or update a device (see :meth:`Registry.enroll`); returns the stored record.

        A new device shifts every column (O(n)); enrol populations with :meth:`enroll_many`.
        """
        device_id = validate_device_id(device_id)
        now = _check_time(now, "now")
        attrs = None if attributes is None else validate_attributes(attributes,
                                                                    device_id=device_id)
        caps = None if capabilities is None else json.dumps(
            validate_capabilities(capabilities, device_id=device_id), sort_keys=True,
            separators=(",", ":"))
        wins = None if windows is None else validate_windows(windows, device_id=device_id)
        with self._lock:
            self._check_open()
            row = self._row(device_id)
            if row < 0:
                one = {n: Attribute.encode([v], n) for n, v in (attrs or {}).items()}
                code = self._caps.code(caps or _NO_CAPABILITIES)
                self._insert(encode_ids([device_id], check=False), now, one,
                             np.array([code], dtype=np.int32), [wins or ()])
                return self._device(self._known_row(device_id))
            if attrs is not None:
                self._set_attributes(row, attrs)
            if caps is not None:
                self._caps_codes[row] = self._caps.code(caps)
            if wins is not None:
                self._set_windows(row, wins)
            self._seen[row] = max(self._seen[row], now)
            return self._device(row)

    def enroll_many(self, device_ids: Sequence[str] | np.ndarray, *, now: float,
                    attributes: Mapping[str, Sequence[AttrValue | None] | np.ndarray]
                    | None = None,
                    windows: Sequence[Sequence[Sequence[int]]] | None = None) -> int:
        """Enrol new devices in one merge (see :meth:`Registry.enroll_many`).

        ``device_ids`` may be a numpy ``S``/``U`` array (``sequential_ids``) and each attribute
        a numpy array (a masked one for missing values): then nothing is built per device.
        """
        now = _check_time(now, "now")
        ids = encode_ids(device_ids)
        check_bulk(ids.size, attributes, windows)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        dup = np.flatnonzero(ids[1:] == ids[:-1])
        if dup.size:
            raise RegistryError(f"device {bytes(ids[dup[0]]).decode()!r} appears twice "
                                "among the ids", field="device_ids")
        attrs = {name: Attribute.encode(np.asanyarray(values)[order] if isinstance(
                     values, np.ndarray) else [values[i] for i in order.tolist()], name)
                 for name, values in (attributes or {}).items()}
        wins = None if windows is None else [
            validate_windows(windows[i], device_id=bytes(ids[j]).decode())
            for j, i in enumerate(order.tolist())]
        with self._lock:
            self._check_open()
            if self._ids.size and ids.size:
                at = np.minimum(np.searchsorted(self._ids, ids), self._ids.size - 1)
                taken = np.flatnonzero(self._ids[at] == ids)
                if taken.size:
                    name = bytes(ids[taken[0]]).decode()
                    raise RegistryError(f"device {name!r} is already enrolled",
                                        device_id=name, field="device_ids")
            caps = np.zeros(ids.size, dtype=np.int32)  # code 0 = no capabilities
            self._insert(ids, now, attrs, caps, wins)
        return int(ids.size)

    def get(self, device_id: str) -> Device:
        """The device's record. Raises :class:`UnknownDevice`."""
        device_id = validate_device_id(device_id)
        with self._lock:
            self._check_open()
            return self._device(self._known_row(device_id))

    def touch(self, device_id: str, *, now: float) -> None:
        """Advance ``last_seen`` to ``now`` (never backwards). Raises :class:`UnknownDevice`."""
        device_id = validate_device_id(device_id)
        now = _check_time(now, "now")
        with self._lock:
            self._check_open()
            row = self._known_row(device_id)
            self._seen[row] = max(self._seen[row], now)

    def remove(self, device_id: str) -> bool:
        """Forget the device and its outcomes; ``False`` if it was not enrolled."""
        device_id = validate_device_id(device_id)
        with self._lock:
            self._check_open()
            row = self._row(device_id)
            if row < 0:
                return False
            self._delete(row)
            return True

    # -- outcomes ---------------------------------------------------------------------------

    def record_outcome(self, device_id: str, round: int, outcome: str, *, now: float) -> bool:
        """Record ``outcome`` for ``round`` (see :meth:`Registry.record_outcome`); only the
        last ``history`` rounds are kept per device, as in the SQLite registry."""
        device_id = validate_device_id(device_id)
        return self.record_outcomes(encode_ids([device_id], check=False), round, outcome,
                                    now=now) == 1

    def record_outcomes(self, device_ids: Sequence[str] | np.ndarray, round: int,
                        outcome: str, *, now: float) -> int:
        """Record one outcome for several devices in ``round`` (see
        :meth:`Registry.record_outcomes`): O(devices x history), vectorized, whatever the
        population -- the simulator records each cohort with one call.

        ``device_ids`` may be a numpy ``S`` array (rows of :meth:`columns` ``.ids``).
        """
        ids = encode_ids(device_ids)
        round = _validate_round(round)
        outcome = validate_outcome(outcome)
        now = _check_time(now, "now")
        ordered = np.sort(ids)
        dup = np.flatnonzero(ordered[1:] == ordered[:-1])
        if dup.size:
            raise RegistryError(f"device {bytes(ordered[dup[0]]).decode()!r} appears twice "
                                "among the ids", field="device_ids")
        with self._lock:
            self._check_open()
            rows = self._rows(ids)
            done = self._log.record(rows, round, outcome, now)
            self._part[rows[done.counts]] += 1
            return int(done.changed.sum())

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids``; the caller holds the lock. Raises :class:`UnknownDevice`."""
        rows, found = find_ids(self._ids, ids)
        if not found.all():
            raise UnknownDevice(bytes(ids[np.argmin(found)]).decode())
        return rows

    def outcomes(self, device_id: str) -> builtins.list[Outcome]:
        """The device's last ``history`` outcomes, oldest round first."""
        device_id = validate_device_id(device_id)
        with self._lock:
            self._check_open()
            return [Outcome(round=r, outcome=o, ts=t)
                    for r, o, t in self._log.of_row(self._known_row(device_id))]

    # -- queries ----------------------------------------------------------------------------

    def columns(self) -> Columns:
        """Every device as read-only column views, rows in device-id order (no copy)."""
        with self._lock:
            self._check_open()
            return self._columns()

    def _columns(self) -> Columns:
        attrs = {name: Attribute(_readonly(codes), tuple(self._attr_values[name].values))
                 for name, codes in self._attr_codes.items()}
        return Columns(size=int(self._ids.size), ids=_readonly(self._ids),
                       last_seen=_readonly(self._seen), enrolled_at=_readonly(self._enrolled),
                       participation=_readonly(self._part),
                       window_offsets=_readonly(self._woff),
                       window_start=_readonly(self._wstart), window_end=_readonly(self._wend),
                       attributes=attrs)

    def _matching(self, where: Mapping[str, AttrValue] | None, seen_since: float | None,
                  available_at: float | None) -> np.ndarray:
        """Rows matching the filters; the caller holds the lock (and validated them)."""
        self._check_open()
        return self._columns().mask(where=where, seen_since=seen_since,
                                    available_at=available_at)

    @staticmethod
    def _filters(where: Mapping[str, AttrValue] | None, seen_since: float | None,
                 available_at: float | None) -> tuple[dict[str, AttrValue], float | None,
                                                      float | None]:
        return (validate_attributes(where),
                None if seen_since is None else _check_time(seen_since, "seen_since"),
                None if available_at is None else _check_time(available_at, "available_at"))

    def scan(self, *, where: Mapping[str, AttrValue] | None = None,
             seen_since: float | None = None, available_at: float | None = None,
             batch_size: int = 1000) -> Iterator[Device]:
        """Matching devices in device-id order, built ``batch_size`` at a time.

        Which devices match is decided when the scan starts; a device removed meanwhile is
        skipped, and a field changed meanwhile may or may not be seen.
        """
        check_batch_size(batch_size)
        filters = self._filters(where, seen_since, available_at)
        with self._lock:
            ids = self._ids[self._matching(*filters)]  # a copy: the snapshot of who matched
        return self._scan(ids, batch_size)

    def _scan(self, ids: np.ndarray, batch_size: int) -> Iterator[Device]:
        for start in range(0, ids.size, batch_size):
            with self._lock:
                self._check_open()
                batch = [self._device(r) for b in ids[start:start + batch_size].tolist()
                         if (r := self._row(b.decode())) >= 0]
            yield from batch

    def list(self, *, where: Mapping[str, AttrValue] | None = None,
             seen_since: float | None = None, available_at: float | None = None,
             limit: int | None = None) -> builtins.list[Device]:
        """Matching devices in device-id order, at most ``limit`` (all if ``None``)."""
        check_limit(limit)
        filters = self._filters(where, seen_since, available_at)
        with self._lock:
            rows = np.flatnonzero(self._matching(*filters))[:limit]
            return [self._device(r) for r in rows.tolist()]

    def count(self, *, where: Mapping[str, AttrValue] | None = None,
              seen_since: float | None = None, available_at: float | None = None) -> int:
        """Number of matching devices (one vectorized pass)."""
        filters = self._filters(where, seen_since, available_at)
        with self._lock:
            return int(self._matching(*filters).sum())
