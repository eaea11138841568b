"""Device traces: how fast each simulated device computes and communicates, and when it is
online.

A :class:`DeviceTrace` is two column tables, never an object per device:

* **capacity** -- per row, milliseconds per training example (forward and backward pass) and
  bandwidth in kilobits per second (one rate for both directions, as in FedScale);
* **availability** -- per row, a period (seconds after which the pattern repeats, e.g. a day)
  and its online windows ``[start, end)`` in seconds into the period, in compressed-row form
  (``offsets``, ``start``, ``end``). A row without windows is always online.

Client ``c`` uses capacity row ``c % rows`` and availability row ``c % rows`` of each table
(FedScale maps its clients onto its traces the same way), so a trace of a few thousand
measured devices serves a population of millions at no cost per client, and a generated trace
(:mod:`shoal.sim.devices`) holds a row per client: about 40 bytes a device.

Timing follows FedScale (F. Lai et al., "FedScale: Benchmarking Model and System Performance
of Federated Learning at Scale", ICML 2022): a task's download and upload take
``bytes x 8 / 1000 / kbps`` seconds each, its computation ``examples x epochs x
ms_per_example / 1000``. Availability is periodic as in FedScale's client behaviour trace
(``time mod finish_time``). A window that reaches the end of the period continues into the
next period's window that starts at 0: such a session is stored once, with its ``end`` past
the period.

Queries are vectorized over the clients asked about and cost ``O(log windows)`` each (a
segmented binary search): deciding whether 4,000 candidates out of ten million are online
touches 4,000 rows.

File formats: shoal's own ``.npz`` (:meth:`DeviceTrace.save` / :func:`load_trace`) and
FedScale's two pickled dictionaries (:func:`from_fedscale`), read with an unpickler that
accepts only plain containers and numbers -- a trace file cannot run code.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shoal.errors import DataError

__all__ = ["Availability", "Capacity", "DeviceTrace", "from_fedscale", "load_trace",
           "transfer_seconds"]

#: FedScale's ``augmentation_factor``: its traces give inference latency per sample, and a
#: training step (forward + backward) is taken to cost three times that.
FEDSCALE_TRAINING_FACTOR = 3.0


def transfer_seconds(nbytes: np.ndarray, kbps: np.ndarray) -> np.ndarray:
    """Seconds to move ``nbytes`` at ``kbps`` kilobits per second (``inf`` kbps: 0 s)."""
    return np.asarray(nbytes, dtype=np.float64) * 8.0 / 1000.0 / np.asarray(kbps, np.float64)


@dataclass(frozen=True, eq=False)
class Capacity:
    """Per row: compute speed and bandwidth.

    Attributes:
        compute_ms: float64 ``(P,)``, milliseconds per training example (>= 0).
        bandwidth_kbps: float64 ``(P,)``, kilobits per second (> 0; ``inf`` = instant).

    Raises:
        DataError: a column is missing values, negative, NaN, or the lengths differ.
    """

    compute_ms: np.ndarray
    bandwidth_kbps: np.ndarray

    def __post_init__(self) -> None:
        c = np.ascontiguousarray(self.compute_ms, dtype=np.float64).reshape(-1)
        b = np.ascontiguousarray(self.bandwidth_kbps, dtype=np.float64).reshape(-1)
        if c.size == 0 or c.size != b.size:
            raise DataError(f"a trace needs at least one capacity row and one bandwidth per "
                            f"row, got {c.size} compute and {b.size} bandwidth values")
        if not (np.isfinite(c).all() and (c >= 0).all()):
            raise DataError("capacity: compute_ms must be finite and >= 0")
        if np.isnan(b).any() or not (b > 0).all():
            raise DataError("capacity: bandwidth_kbps must be > 0 (inf = instant transfers)")
        object.__setattr__(self, "compute_ms", c)
        object.__setattr__(self, "bandwidth_kbps", b)

    @property
    def rows(self) -> int:
        return int(self.compute_ms.size)


@dataclass(frozen=True, eq=False)
class Availability:
    """Per row: a period and the online windows within it (see the module docstring).

    Attributes:
        period: float64 ``(A,)`` seconds (> 0, finite).
        offsets: int64 ``(A + 1,)``; row ``r``'s windows are ``start[o[r]:o[r+1]]``.
        start, end: float64 ``(W,)``; within a row sorted, ``0 <= start < end``, windows do
            not overlap, every ``start < period``, and only a row's last window may end past
            the period (by at most the length of its first window, which then starts at 0).

    ``Availability.always()`` (no rows) is a population that is always online.

    Raises:
        DataError: the arrays break one of these rules (naming the row).
    """

    period: np.ndarray
    offsets: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __post_init__(self) -> None:
        period = np.ascontiguousarray(self.period, dtype=np.float64).reshape(-1)
        offsets = np.ascontiguousarray(self.offsets, dtype=np.int64).reshape(-1)
        start = np.ascontiguousarray(self.start, dtype=np.float64).reshape(-1)
        end = np.ascontiguousarray(self.end, dtype=np.float64).reshape(-1)
        for name, value in (("period", period), ("offsets", offsets), ("start", start),
                            ("end", end)):
            object.__setattr__(self, name, value)
        self._check()

    @classmethod
    def always(cls) -> Availability:
        """Every device online all the time (no rows)."""
        z = np.zeros(0)
        return cls(z, np.zeros(1, np.int64), z, z)

    @property
    def rows(self) -> int:
        return int(self.period.size)

    def _check(self) -> None:
        a, w = self.period.size, self.start.size
        o = self.offsets
        if o.size != a + 1 or o[0] != 0 or o[-1] != w or self.end.size != w \
                or (np.diff(o) < 0).any():
            raise DataError(f"availability: offsets must run from 0 to {w} windows over "
                            f"{a} rows, non-decreasing")
        if a and not (np.isfinite(self.period).all() and (self.period > 0).all()):
            raise DataError("availability: every period must be finite and > 0")
        if not w:
            return
        row = np.repeat(np.arange(a), np.diff(o))
        p = self.period[row]
        bad = ~(np.isfinite(self.start) & np.isfinite(self.end) & (self.start >= 0)
                & (self.start < self.end) & (self.start < p))
        first = o[:-1][np.diff(o) > 0]
        last = o[1:][np.diff(o) > 0] - 1
        inner = np.ones(w, bool)
        inner[last] = False
        bad |= inner & (self.end > p)
        # only the last window may run past the period, continuing the row's first window
        over = self.end[last] > self.period[row[last]]
        cont = self.period[row[last]] + np.where(self.start[first] == 0,
                                                 self.end[first], 0.0)
        bad[last[over & ((self.start[first] != 0) | (self.end[last] > cont))]] = True
        gap = np.zeros(w, bool)
        gap[1:] = (row[1:] == row[:-1]) & (self.start[1:] < self.end[:-1])
        bad |= gap
        if bad.any():
            r = int(row[np.flatnonzero(bad)[0]])
            raise DataError(f"availability row {r}: windows must satisfy 0 <= start < end, "
                            f"start < period, be sorted without overlap, and only the last "
                            f"may continue past the period into a window starting at 0; got "
                            f"{list(zip(self.start[o[r]:o[r + 1]].tolist(), self.end[o[r]:o[r + 1]].tolist()))} "
                            f"with period {self.period[r]}")

    @classmethod
    def from_windows(cls, period: float | np.ndarray, windows: list[list[tuple[float, float]]]
                     ) -> Availability:
        """Rows of ``(start, end)`` windows within each row's period, normalised: windows
        sorted, zero-length ones dropped, touching or overlapping ones merged, a window
        ending at the period joined to one starting at 0, a row covering its whole period
        made window-free (always online).

        Raises:
            DataError: a window lies outside ``[0, period]`` or ``start > end``.
        """
        periods = np.broadcast_to(np.asarray(period, np.float64), (len(windows),))
        offsets = [0]
        starts: list[float] = []
        ends: list[float] = []
        for r, (p, rows) in enumerate(zip(periods.tolist(), windows)):
            merged = _normalise(r, p, rows)
            starts += [s for s, _ in merged]
            ends += [e for _, e in merged]
            offsets.append(len(starts))
        return cls(periods.copy(), np.array(offsets, np.int64), np.array(starts, np.float64),
                   np.array(ends, np.float64))

    # -- queries --------------------------------------------------------------------------

    def online_until(self, client_ids: np.ndarray, t: float) -> np.ndarray:
        """For each client, when its current session ends: ``inf`` for a client without
        windows, ``t`` itself for a client offline at ``t``.

        ``t`` may be any time (seconds since the start of the simulation).
        """
        ids = np.asarray(client_ids, dtype=np.int64)
        until = np.full(ids.size, math.inf)
        if not self.rows or not ids.size:
            return until
        row = ids % self.rows
        lo, hi = self.offsets[row], self.offsets[row + 1]
        has = hi > lo
        if not has.any():
            return until
        period = self.period[row]
        base = np.floor(t / period) * period
        tau = t - base
        j = _last_at_or_before(self.start, lo, hi, tau)
        hit = has & (j >= lo)
        jj = np.where(hit, j, 0)
        end = self.end[jj]
        on = hit & (tau < end)
        until[has] = t
        until[on] = base[on] + end[on]
        return until

    def online(self, client_ids: np.ndarray, t: float) -> np.ndarray:
        """Whether each client is online at ``t``."""
        return self.online_until(client_ids, t) > t

    def online_fraction(self, times: np.ndarray) -> np.ndarray:
        """For each of ``times``, the fraction of *rows* online (uniform rows: the fraction
        of the population, up to the remainder of ``clients % rows``)."""
        if not self.rows:
            return np.ones(len(times))
        ids = np.arange(self.rows, dtype=np.int64)
        return np.array([float(self.online(ids, float(t)).mean()) for t in times])

    def online_seconds(self) -> np.ndarray:
        """Per row, the seconds online per period (its period for a row without windows)."""
        row = np.repeat(np.arange(self.rows), np.diff(self.offsets))
        # a session continuing past the period is counted up to it: its continuation is
        # the row's first window, counted there
        length = np.minimum(self.end, self.period[row]) - self.start
        per = np.bincount(row, weights=length, minlength=self.rows)
        return np.where(np.diff(self.offsets) == 0, self.period, per)


def _normalise(r: int, period: float, rows: list[tuple[float, float]]
               ) -> list[tuple[float, float]]:
    if not (math.isfinite(period) and period > 0):
        raise DataError(f"availability row {r}: the period must be finite and > 0, got "
                        f"{period}")
    spans = []
    for s, e in rows:
        s, e = float(s), float(e)
        if not (math.isfinite(s) and math.isfinite(e) and 0 <= s <= e <= period):
            raise DataError(f"availability row {r}: window ({s}, {e}) must satisfy "
                            f"0 <= start <= end <= period ({period})")
        if e > s:
            spans.append((s, e))
    spans.sort()
    merged: list[list[float]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    if len(merged) == 1 and merged[0] == [0.0, period]:
        return []  # online the whole period: always online
    if len(merged) > 1 and merged[0][0] == 0.0 and merged[-1][1] == period:
        merged[-1][1] = period + merged[0][1]  # a session across the period's end
    return [(s, e) for s, e in merged]


def _last_at_or_before(start: np.ndarray, lo: np.ndarray, hi: np.ndarray, tau: np.ndarray
                       ) -> np.ndarray:
    """Per query ``i``: the last index ``j`` in ``[lo[i], hi[i])`` with ``start[j] <= tau[i]``,
    or ``lo[i] - 1`` if there is none (``start`` is sorted within each segment). A binary
    search run on every query at once: ``log2(longest segment)`` vectorized steps."""
    a, b = lo.copy(), hi.copy()
    top = max(start.size - 1, 0)
    while True:
        active = a < b
        if not active.any():
            return a - 1
        mid = (a + b) // 2
        right = active & (start[np.minimum(mid, top)] <= tau)
        a = np.where(right, mid + 1, a)
        b = np.where(active & ~right, mid, b)


@dataclass(frozen=True, eq=False)
class DeviceTrace:
    """Capacity and availability of a device population (see the module docstring).

    Attributes:
        capacity: compute speed and bandwidth rows.
        availability: online windows rows (:meth:`Availability.always` for none).
        name: where it came from (``"mobile"``, a file name).
    """

    capacity: Capacity
    availability: Availability
    name: str = ""

    def compute_seconds(self, client_ids: np.ndarray, example_passes: np.ndarray
                        ) -> np.ndarray:
        """Seconds each client computes to train ``example_passes`` examples (examples x
        epochs)."""
        rows = np.asarray(client_ids, np.int64) % self.capacity.rows
        return np.asarray(example_passes, np.float64) * self.capacity.compute_ms[rows] / 1000.0

    def transfer_seconds(self, client_ids: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """Seconds each client takes to move ``nbytes`` (down or up)."""
        rows = np.asarray(client_ids, np.int64) % self.capacity.rows
        return transfer_seconds(nbytes, self.capacity.bandwidth_kbps[rows])

    def online_until(self, client_ids: np.ndarray, t: float) -> np.ndarray:
        """See :meth:`Availability.online_until`."""
        return self.availability.online_until(client_ids, t)

    def online(self, client_ids: np.ndarray, t: float) -> np.ndarray:
        return self.availability.online(client_ids, t)

    @property
    def nbytes(self) -> int:
        """Memory the trace's arrays hold."""
        c, a = self.capacity, self.availability
        return sum(x.nbytes for x in (c.compute_ms, c.bandwidth_kbps, a.period, a.offsets,
                                      a.start, a.end))

    # -- files ----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the trace as shoal's ``.npz`` (:func:`load_trace` reads it back)."""
        c, a = self.capacity, self.availability
        np.savez_compressed(path, format=np.array("shoal-trace-1"), name=np.array(self.name),
                            compute_ms=c.compute_ms, bandwidth_kbps=c.bandwidth_kbps,
                            period=a.period, offsets=a.offsets, start=a.start, end=a.end)


def load_trace(path: str | Path) -> DeviceTrace:
    """A trace saved by :meth:`DeviceTrace.save`.

    Raises:
        DataError: the file is missing, not an ``.npz`` trace, or its arrays are invalid.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            if "format" not in z or str(z["format"]) != "shoal-trace-1":
                raise DataError(f"{p} is not a shoal trace (.npz written by "
                                f"DeviceTrace.save or `shoal traces convert`)", path=str(p))
            arrays = {k: z[k] for k in ("compute_ms", "bandwidth_kbps", "period", "offsets",
                                        "start", "end")}
            name = str(z["name"]) if "name" in z else p.stem
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read trace {p}: {exc}", path=str(p)) from None
    try:
        return DeviceTrace(Capacity(arrays["compute_ms"], arrays["bandwidth_kbps"]),
                           Availability(arrays["period"], arrays["offsets"], arrays["start"],
                                        arrays["end"]), name or p.stem)
    except DataError as exc:
        raise DataError(f"{p}: {exc}", path=str(p)) from None


# ---------------------------------------------------------------------------------------------
# FedScale's format
# ---------------------------------------------------------------------------------------------


class _PlainUnpickler(pickle.Unpickler):
    """Only dicts, lists, tuples, strings and numbers: a trace file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a trace may hold only plain data, not {module}.{name}")


def _read_pickle(path: Path) -> dict:
    try:
        data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except OSError as exc:
        raise DataError(f"cannot read trace {path}: {exc}", path=str(path)) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"{path} is not a FedScale trace (a pickled dict of plain values): "
                        f"{exc}", path=str(path)) from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty dict keyed by client id",
                        path=str(path))
    return data


def _key_order(data: dict, path: Path) -> list:
    try:
        return sorted(data, key=lambda k: (0, int(k)) if str(k).lstrip("-").isdigit()
                      else (1, str(k)))
    except (TypeError, ValueError):
        raise DataError(f"{path}: client ids must be integers or strings",
                        path=str(path)) from None


def from_fedscale(capacity_path: str | Path, availability_path: str | Path | None = None, *,
                  training_factor: float = FEDSCALE_TRAINING_FACTOR) -> DeviceTrace:
    """A trace from FedScale's files.

    * capacity (``client_device_capacity``): ``{client_id: {"computation": ms per sample,
      "communication": kbps}}``; ``computation`` is inference latency, multiplied by
      ``training_factor`` (FedScale's own factor, 3) for a training example;
    * availability (``client_behave_trace``): ``{client_id: {"active": [s, ...],
      "inactive": [s, ...], "finish_time": s, ...}}``: the device is online from
      ``active[i]`` to ``inactive[i]``, and the pattern repeats every ``finish_time``
      seconds. Without this file every device is always online.

    Rows are in client-id order (numbers numerically); client ``c`` of the simulation uses row
    ``c % rows`` of each.

    Raises:
        DataError: a file is unreadable, not plain pickled data, or an entry lacks a field or
            holds an impossible value (naming the client id).
    """
    cap_path = Path(capacity_path)
    cap = _read_pickle(cap_path)
    compute, bandwidth = [], []
    for key in _key_order(cap, cap_path):
        entry = cap[key]
        try:
            compute.append(float(entry["computation"]) * training_factor)
            bandwidth.append(float(entry["communication"]))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{cap_path}: client {key!r} needs numeric 'computation' and "
                            f"'communication'", path=str(cap_path)) from None
    try:
        capacity = Capacity(np.array(compute), np.array(bandwidth))
    except DataError as exc:
        raise DataError(f"{cap_path}: {exc}", path=str(cap_path)) from None
    availability = Availability.always()
    name = cap_path.stem
    if availability_path is not None:
        av_path = Path(availability_path)
        av = _read_pickle(av_path)
        periods, windows = [], []
        for key in _key_order(av, av_path):
            entry = av[key]
            try:
                active = [float(x) for x in entry["active"]]
                inactive = [float(x) for x in entry["inactive"]]
                period = float(entry["finish_time"])
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{av_path}: client {key!r} needs 'active', 'inactive' "
                                f"(lists of seconds) and 'finish_time'",
                                path=str(av_path)) from None
            if len(active) != len(inactive):
                raise DataError(f"{av_path}: client {key!r} has {len(active)} 'active' and "
                                f"{len(inactive)} 'inactive' times", path=str(av_path))
            periods.append(period)
            windows.append(list(zip(active, inactive)))
        try:
            availability = Availability.from_windows(np.array(periods), windows)
        except DataError as exc:
            raise DataError(f"{av_path}: {exc}", path=str(av_path)) from None
        name += "+" + av_path.stem
    return DeviceTrace(capacity, availability, name)
