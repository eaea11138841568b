"""The default client registry: one embedded SQLite file (standard-library ``sqlite3``).

Why SQLite: it is in every Python, needs no server, survives a crash (write-ahead log), and a
million device rows fit comfortably. When several aggregator processes on several machines must
share a registry, swap in a networked implementation of :class:`~shoal.registry.Registry`.

Storage (schema version 1, :mod:`~shoal.registry.sqlite_schema`; see ``docs/operations.md``)::

    schema_version(version)                         -- one row
    devices(device_id PRIMARY KEY, attributes JSON, capabilities JSON, windows JSON,
            enrolled_at, last_seen, participation)
    outcomes(device_id -> devices ON DELETE CASCADE, round, outcome, ts,
             PRIMARY KEY (device_id, round))        -- trimmed to the last ``history`` rounds

Concurrency: each :class:`SQLiteRegistry` owns one connection, guarded by a lock so one object
may be shared by the threads of a server. Several objects (or processes) may open the same
file: the database runs in WAL mode (readers never block the writer), writes are short
``BEGIN IMMEDIATE`` transactions, and a busy database is retried for ``busy_timeout`` seconds.
``synchronous=NORMAL``: a committed write survives a process crash; a power loss may lose the
last few writes but never corrupts the file (the documented WAL trade-off).

Last-seen is written lazily: once a :meth:`~SQLiteRegistry.touch` found its device enrolled,
the device's later touches wait in memory for the next transaction (any write, or a read of
this object, which writes them first) or for a touch once the oldest is
:data:`TOUCH_DELAY_S` old, so a check-in costs no transaction. Reads of this object see every
touch; other readers of the file may see last-seen that old (older if no call comes) and a
crash may lose those advances, never an enrolment or an outcome. A device another process
removed is found out when its touch is written; its next touch raises ``UnknownDevice``. A write the disk
refuses (full, read-only, failing) is rolled back and raised as
:class:`~shoal.store.disk.StorageError` naming the file, whichever method wrote.

Every statement is parameterized; attribute names are additionally restricted to a plain
alphabet by :func:`~shoal.registry.validation.validate_attributes`, so JSON paths are safe.
"""

from __future__ import annotations

import builtins
import itertools
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

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
    enrolment_json,
    to_json,
    validate_attributes,
    validate_device_id,
    validate_device_ids,
    validate_outcome,
)
from shoal.registry.columns import Columns, bulk_rows
from shoal.registry.sqlite_schema import COLUMNS, NUMBERED, SCHEMA, SCHEMA_VERSION, row_to_device
from shoal.store.disk import disk_failure

__all__ = ["SCHEMA_VERSION", "SQLiteRegistry", "TOUCH_DELAY_S"]

TOUCH_DELAY_S = 1.0
"""Longest a touch waits in memory while touches keep coming (see the module docstring)."""
_MAX_PRESENT = 100_000  # devices remembered as enrolled (forgotten all at once past it)

class SQLiteRegistry:
    """A :class:`~shoal.registry.Registry` in one SQLite file.

    Args:
        path: the database file (created if missing), or ``":memory:"`` for a private
            in-memory registry (tests; no WAL there).
        history: outcomes kept per device (the most recent rounds).
        busy_timeout: seconds to wait for another writer before failing.

    Raises:
        RegistryError: the file is not a SQLite database, was written by a newer shoal
            (higher schema version), or an argument is out of range.
        StorageError: the disk refused to create or write it (here and in every method
            that writes).
    """

    def __init__(self, path: str | Path, *, history: int = 20, busy_timeout: float = 5.0
                 ) -> None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise RegistryError(f"history must be an int >= 1, got {history!r}",
                                field="history")
        if not busy_timeout >= 0:
            raise RegistryError(f"busy_timeout must be >= 0 seconds, got {busy_timeout!r}",
                                field="busy_timeout")
        self.path = str(path)
        self.history = history
        self._lock = threading.Lock()
        self._closed = False
        self._present: set[str] = set()  # devices a touch found enrolled
        self._seen: dict[str, float] = {}  # their touches not written yet: latest time
        self._seen_since = 0.0  # time.monotonic() of the oldest of those
        try:
            self._conn = sqlite3.connect(self.path, timeout=busy_timeout,
                                         isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise disk_failure(exc, self.path, "opening the registry") or RegistryError(
                f"cannot open registry {self.path}: {exc}") from None
        try:
            self._conn.execute("PRAGMA foreign_keys = ON")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal" and self.path != ":memory:":
                raise RegistryError(f"registry {self.path}: cannot enable WAL mode "
                                    f"(journal_mode is {mode!r})")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._init_schema()
        except sqlite3.Error as exc:
            self._conn.close()
            raise disk_failure(exc, self.path, "opening the registry") or RegistryError(
                f"registry {self.path} is not a usable SQLite database: {exc}") from None
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------

    def _init_schema(self) -> None:
        with self._write():
            self._conn.execute("CREATE TABLE IF NOT EXISTS schema_version "
                               "(version INTEGER NOT NULL)")
            row = self._conn.execute("SELECT max(version) FROM schema_version").fetchone()
            if row[0] is None:
                for statement in SCHEMA:
                    self._conn.execute(statement)
                self._conn.execute("INSERT INTO schema_version (version) VALUES (?)",
                                   (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise RegistryError(
                    f"registry {self.path} has schema version {row[0]}; this shoal reads "
                    f"version {SCHEMA_VERSION}" + (" (upgrade shoal)" if row[0] > SCHEMA_VERSION
                                                   else ""))

    def _write(self) -> _Transaction:
        return _Transaction(self)

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryError(f"registry {self.path} is closed")

    def close(self) -> None:
        """Write the touches still in memory and close the file (closed even if that write
        fails, which is then raised)."""
        with self._lock:
            if not self._closed:
                try:
                    self._read_ready()
                finally:
                    self._closed = True
                    self._conn.close()

    def _read_ready(self) -> None:
        """(Lock held.) Refuse a closed registry; write the touches still in memory, so a
        read sees them."""
        self._check_open()
        if self._seen:
            with _Transaction(self, locked=True):
                pass

    def _write_seen(self) -> None:
        """(In a write transaction.) The touches kept in memory."""
        for device_id, seen in self._seen.items():
            if self._conn.execute("UPDATE devices SET last_seen = max(last_seen, ?) "
                                  "WHERE device_id = ?", (seen, device_id)).rowcount == 0:
                self._present.discard(device_id)  # removed by another process meanwhile

    def __enter__(self) -> SQLiteRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteRegistry({self.path!r})"

    # -- devices ----------------------------------------------------------------------------

    def enroll(self, device_id: str, *, now: float,
               attributes: Mapping[str, AttrValue] | None = None,
               capabilities: Mapping[str, Any] | None = None,
               windows: Sequence[Sequence[int]] | None = None) -> Device:
        """Insert or update a device (see :meth:`Registry.enroll`); returns the stored record."""
        device_id = validate_device_id(device_id)
        now = _check_time(now, "now")
        attrs, caps, wins = enrolment_json(device_id, attributes, capabilities, windows)
        with self._write():
            self._conn.execute(
                "INSERT INTO devices (" + COLUMNS + ") VALUES (?, ?, ?, ?, ?, ?, 0) "
                "ON CONFLICT (device_id) DO UPDATE SET "
                "attributes = coalesce(?, attributes), "
                "capabilities = coalesce(?, capabilities), "
                "windows = coalesce(?, windows), "
                "last_seen = max(last_seen, excluded.last_seen)",
                (device_id, attrs or "{}", caps or "{}", wins or "[]", now, now,
                 attrs, caps, wins))
            return self._get(device_id)

    def enroll_many(self, device_ids: Sequence[str], *, now: float,
                    attributes: Mapping[str, Sequence[AttrValue | None]] | None = None,
                    windows: Sequence[Sequence[Sequence[int]]] | None = None) -> int:
        """Enrol new devices in one transaction (see :meth:`Registry.enroll_many`)."""
        now = _check_time(now, "now")
        ids = validate_device_ids(device_ids)
        rows = [(device_id, to_json(attrs), "{}", to_json(wins), now, now)
                for device_id, attrs, wins in bulk_rows(ids, attributes, windows)]
        with self._write():
            taken = self._known(ids)
            if taken:
                first = min(taken)
                raise RegistryError(f"device {first!r} is already enrolled", device_id=first,
                                    field="device_ids")
            self._conn.executemany("INSERT INTO devices (" + COLUMNS + ") VALUES "
                                   "(?, ?, ?, ?, ?, ?, 0)", rows)
        return len(rows)

    def columns(self) -> Columns:
        """Every device as columns, rows in device-id order, from one read transaction.

        SQLite unpacks the JSON (``json_each``) and numbers the rows, so no ``Device`` is
        built: a few tuples per device, about 3x faster than building records (0.5 s for
        100,000 devices), with the registry's lock held for the read.
        """
        with self._lock:
            self._read_ready()
            self._conn.execute("BEGIN")  # one snapshot for the three reads
            try:
                base = self._conn.execute(
                    "SELECT device_id, enrolled_at, last_seen, participation FROM devices "
                    "ORDER BY device_id").fetchall()
                attrs = self._conn.execute(
                    NUMBERED + "SELECT d.row, a.key, a.value FROM d, "
                    "json_each(d.attributes) AS a").fetchall()
                wins = self._conn.execute(
                    NUMBERED + "SELECT d.row, json_extract(w.value, '$[0]'), "
                    "json_extract(w.value, '$[1]') FROM d, json_each(d.windows) AS w "
                    "ORDER BY d.row, w.key").fetchall()
            finally:
                self._conn.execute("COMMIT")
        ids, enrolled, seen, part = zip(*base) if base else ((), (), (), ())
        return Columns.from_rows(ids, enrolled, seen, part, attrs, wins)

    def get(self, device_id: str) -> Device:
        """The device's record. Raises :class:`UnknownDevice`."""
        device_id = validate_device_id(device_id)
        with self._lock:
            self._read_ready()
            return self._get(device_id)

    def _get(self, device_id: str) -> Device:
        row = self._conn.execute(f"SELECT {COLUMNS} FROM devices WHERE device_id = ?",
                                 (device_id,)).fetchone()
        if row is None:
            raise UnknownDevice(device_id)
        return row_to_device(row)

    def touch(self, device_id: str, *, now: float) -> None:
        """Advance ``last_seen`` to ``now`` (never backwards), lazily once the device is
        known to be enrolled (see the module docstring). Raises :class:`UnknownDevice`."""
        device_id = validate_device_id(device_id)
        now = _check_time(now, "now")
        with self._lock:
            self._check_open()
            if device_id in self._present:
                if not self._seen:
                    self._seen_since = time.monotonic()
                self._seen[device_id] = max(self._seen.get(device_id, now), now)
                if time.monotonic() - self._seen_since >= TOUCH_DELAY_S:
                    self._read_ready()
                return
            with _Transaction(self, locked=True):
                cur = self._conn.execute("UPDATE devices SET last_seen = max(last_seen, ?) "
                                         "WHERE device_id = ?", (now, device_id))
                if cur.rowcount == 0:
                    raise UnknownDevice(device_id)
            if len(self._present) >= _MAX_PRESENT:
                self._present.clear()
            self._present.add(device_id)

    def remove(self, device_id: str) -> bool:
        """Forget the device and its outcomes; ``False`` if it was not enrolled."""
        device_id = validate_device_id(device_id)
        with self._write():
            self._present.discard(device_id)
            self._seen.pop(device_id, None)
            cur = self._conn.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
            return cur.rowcount > 0

    # -- outcomes ---------------------------------------------------------------------------

    def record_outcome(self, device_id: str, round: int, outcome: str, *, now: float) -> bool:
        """Record ``outcome`` for ``round`` (see :meth:`Registry.record_outcome`).

        Only the last ``history`` rounds are kept per device, so a replay of a round older
        than those is not recognised as one.
        """
        return self.record_outcomes([validate_device_id(device_id)], round, outcome,
                                    now=now) == 1

    def record_outcomes(self, device_ids: Sequence[str], round: int, outcome: str, *,
                        now: float) -> int:
        """Record one outcome for several devices in ``round``, in one transaction (see
        :meth:`Registry.record_outcomes`)."""
        ids = validate_device_ids(device_ids)
        round = _validate_round(round)
        outcome = validate_outcome(outcome)
        now = _check_time(now, "now")
        with self._write():
            known = self._known(ids)
            missing = next((i for i in ids if i not in known), None)
            if missing is not None:
                raise UnknownDevice(missing)
            return sum(self._record(i, round, outcome, now) for i in ids)

    def _known(self, ids: builtins.list[str]) -> set[str]:
        """Which of ``ids`` are enrolled (inside a transaction)."""
        out: set[str] = set()
        for start in range(0, len(ids), 500):  # SQLite's bound on parameters per statement
            chunk = ids[start:start + 500]
            out.update(r[0] for r in self._conn.execute(
                "SELECT device_id FROM devices WHERE device_id IN ("
                + ",".join("?" * len(chunk)) + ")", chunk))
        return out

    def _record(self, device_id: str, round: int, outcome: str, now: float) -> bool:
        """One outcome of an enrolled device, inside a write transaction."""
        prev = self._conn.execute("SELECT outcome FROM outcomes WHERE device_id = ? AND "
                                  "round = ?", (device_id, round)).fetchone()
        if prev is not None and prev[0] in (outcome, "accepted"):
            return False  # a replay, or a round the device already contributed to
        self._conn.execute("INSERT INTO outcomes (device_id, round, outcome, ts) "
                           "VALUES (?, ?, ?, ?) ON CONFLICT (device_id, round) DO UPDATE SET "
                           "outcome = excluded.outcome, ts = excluded.ts",
                           (device_id, round, outcome, now))
        if outcome == "accepted":
            self._conn.execute("UPDATE devices SET participation = participation + 1 "
                               "WHERE device_id = ?", (device_id,))
        self._conn.execute(
            "DELETE FROM outcomes WHERE device_id = ? AND round < ("
            "SELECT min(round) FROM (SELECT round FROM outcomes WHERE device_id = ? "
            "ORDER BY round DESC LIMIT ?))", (device_id, device_id, self.history))
        return True

    def outcomes(self, device_id: str) -> builtins.list[Outcome]:
        """The device's last ``history`` outcomes, oldest round first."""
        device_id = validate_device_id(device_id)
        with self._lock:
            self._read_ready()
            rows = self._conn.execute("SELECT round, outcome, ts FROM outcomes "
                                      "WHERE device_id = ? ORDER BY round", (device_id,)
                                      ).fetchall()
            if not rows:
                self._get(device_id)  # raises UnknownDevice if it is not enrolled
        return [Outcome(round=r, outcome=o, ts=t) for r, o, t in rows]

    # -- queries ----------------------------------------------------------------------------

    @staticmethod
    def _filters(where: Mapping[str, AttrValue] | None, seen_since: float | None
                 ) -> tuple[builtins.list[str], builtins.list[object]]:
        clauses: builtins.list[str] = []
        params: builtins.list[object] = []
        for name, value in validate_attributes(where).items():
            # Names are restricted to [A-Za-z0-9_-] by validate_attributes: the quoted JSON
            # path cannot be escaped, and it is still passed as a parameter.
            clauses.append("json_extract(attributes, ?) = ?")
            params += [f'$."{name}"', value]
        if seen_since is not None:
            clauses.append("last_seen >= ?")
            params.append(_check_time(seen_since, "seen_since"))
        return clauses, params

    def scan(self, *, where: Mapping[str, AttrValue] | None = None,
             seen_since: float | None = None, available_at: float | None = None,
             batch_size: int = 1000) -> Iterator[Device]:
        """Matching devices in device-id order, fetched ``batch_size`` at a time.

        The lock is held only while a batch is fetched, so a long scan does not stall
        writers; rows changed during the scan may or may not be seen, but none twice.
        """
        check_batch_size(batch_size)
        clauses, params = self._filters(where, seen_since)
        if available_at is not None:
            _check_time(available_at, "available_at")
        return self._scan(clauses, params, available_at, batch_size)

    def _scan(self, clauses: builtins.list[str], params: builtins.list[object],
              available_at: float | None, batch_size: int) -> Iterator[Device]:
        after = ""
        while True:
            sql = (f"SELECT {COLUMNS} FROM devices WHERE "
                   + " AND ".join([*clauses, "device_id > ?"])
                   + " ORDER BY device_id LIMIT ?")
            with self._lock:
                self._read_ready()
                rows = self._conn.execute(sql, (*params, after, batch_size)).fetchall()
            for row in rows:
                device = row_to_device(row)
                if available_at is None or device.available_at(available_at):
                    yield device
            if len(rows) < batch_size:
                return
            after = rows[-1][0]

    def list(self, *, where: Mapping[str, AttrValue] | None = None,
             seen_since: float | None = None, available_at: float | None = None,
             limit: int | None = None) -> builtins.list[Device]:
        """Matching devices in device-id order, at most ``limit`` (all if ``None``)."""
        check_limit(limit)
        it = self.scan(where=where, seen_since=seen_since, available_at=available_at)
        return builtins.list(itertools.islice(it, limit))

    def count(self, *, where: Mapping[str, AttrValue] | None = None,
              seen_since: float | None = None, available_at: float | None = None) -> int:
        """Number of matching devices (counted in SQL unless ``available_at`` is given)."""
        if available_at is not None:
            return sum(1 for _ in self.scan(where=where, seen_since=seen_since,
                                            available_at=available_at))
        clauses, params = self._filters(where, seen_since)
        sql = "SELECT count(*) FROM devices" + (" WHERE " + " AND ".join(clauses)
                                                if clauses else "")
        with self._lock:
            self._read_ready()
            return int(self._conn.execute(sql, params).fetchone()[0])


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the registry's lock; rolls back on error.

    IMMEDIATE takes the database's write lock up front, so two registries writing the same
    file queue on ``busy_timeout`` instead of failing half-way with a lock upgrade error.
    """

    def __init__(self, registry: SQLiteRegistry, *, locked: bool = False) -> None:
        self._r, self._locked = registry, locked  # locked: the caller holds the lock

    def _release(self) -> None:
        if not self._locked:
            self._r._lock.release()

    def __enter__(self) -> None:
        if not self._locked:
            self._r._lock.acquire()
        conn = self._r._conn
        try:
            self._r._check_open()
            conn.execute("BEGIN IMMEDIATE")
            self._r._write_seen()  # the touches kept in memory go first
        except sqlite3.Error as exc:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            finally:
                self._release()
            raise disk_failure(exc, self._r.path, "writing the registry") or RegistryError(
                f"registry {self._r.path}: cannot start a write: {exc}") from None
        except BaseException:
            self._release()
            raise

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        conn = self._r._conn
        try:
            if exc is None:
                try:
                    conn.execute("COMMIT")
                    self._r._seen.clear()
                    return
                except sqlite3.Error as commit_exc:
                    exc = commit_exc
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        finally:
            self._release()
        if isinstance(exc, sqlite3.Error):
            raise disk_failure(exc, self._r.path, "writing the registry; the write was "
                               "rolled back") or RegistryError(
                f"registry {self._r.path}: write failed and was rolled back: {exc}") from exc
