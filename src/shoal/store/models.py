"""The model store: every committed global model as a numbered version with lineage.

Layout under ``<root>/models/``::

    index.json      the metadata of every version and the production pointer (the truth)
    v000001.npz     one checkpoint per version (``shoal.store.checkpoint`` format)
    v000002.npz
    .lock           held (``fcntl.flock``) by the one writer

A version is committed in two atomic steps: the checkpoint file is written (temporary file,
fsync, rename -- :func:`~shoal.store.checkpoint.save_checkpoint`) and the directory fsync'ed,
then ``index.json`` is rewritten the same way. The index is the single source of truth: a
version exists once the index lists it. A crash between the two steps leaves a model file the
index does not know; the next writer to open the store deletes it (and stray temporary files)
and reports them in :attr:`ModelStore.recovered`. Readers never look at unlisted files.

Why a JSON index and not SQLite: the store has one writer and a few records per version, the
index must be readable by an operator with ``cat`` or ``jq`` during an incident, and writing it
with the same rename protocol as the model files keeps one crash-safety mechanism for the whole
directory, which stays a plain set of files to back up or rsync (no WAL side files). Rewriting
the whole index per change costs O(versions); at ~300 bytes a version that stays well under a
few megabytes for tens of thousands of versions.

Statuses and the production pointer: at most one version is ``"production"`` (what clients are
served); :meth:`ModelStore.promote` moves the pointer and returns the previous production to
``"candidate"`` (still a good model, just not served); :meth:`ModelStore.rollback` marks the
current production ``"rolled_back"`` (a bad model, never promoted again) and points production
at an earlier good version. Every pointer move is logged in :meth:`ModelStore.history`.

Single writer: one aggregator process per store. The writer holds an exclusive ``flock`` on
``.lock`` for the lifetime of the :class:`ModelStore`; a second writer is refused with
:class:`StoreLocked`. Readers (``readonly=True``) take no lock and may run alongside the writer:
each query re-reads the index, which is always either the old or the new complete file.

The index's format and the file names are :mod:`shoal.store.model_index`; the records the store
returns (:class:`ModelVersion`, :class:`ModelEvent`) and its errors are
:mod:`shoal.store.model_versions`.
"""

from __future__ import annotations

import builtins
import fcntl
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from shoal.errors import ConfigError, DataError
from shoal.store.atomic import fsync_dir
from shoal.store.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shoal.store.disk import disk_failure
from shoal.store.lineage import config_hash, plan_from_config
from shoal.store.model_index import (INDEX_FILE, MODEL_FILE, TEMP_FILE, ModelIndex,
                                     file_sha256, model_file_name)
from shoal.store.model_versions import (STATUSES, ModelEvent, ModelStoreError, ModelVersion,
                                        StoreLocked, UnknownVersion)

__all__ = ["ModelStore"]

_LOCK = ".lock"


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}", key=name)
    return value


def _check_rounds(rounds: object, round: int) -> tuple[int, int]:
    if rounds is None:
        return (round, round)
    if not isinstance(rounds, (tuple, list)) or len(rounds) != 2:
        raise ConfigError(f"rounds must be (first, last), got {rounds!r}", key="rounds")
    first = _check_int(rounds[0], "rounds[0]", 0)
    last = _check_int(rounds[1], "rounds[1]", first)
    if last != round:
        raise ConfigError(f"rounds must end at round {round}, got {rounds!r}", key="rounds")
    return (first, last)


def _check_reason(reason: object) -> str:
    if not isinstance(reason, str):
        raise ConfigError(f"reason must be a string, got {reason!r}", key="reason")
    return reason


def _check_now(now: object) -> float:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ConfigError(f"now must be a finite number of seconds, got {now!r}", key="now")
    return float(now)


def _check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"metrics must be a mapping, got {type(metrics).__name__}",
                          key="metrics")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"metric names must be non-empty strings, got {name!r}",
                              key="metrics")
        if isinstance(value, (np.integer, np.floating)):
            value = value.item()  # evaluation code often hands back numpy scalars
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ConfigError(f"metric {name!r} must be a finite number, got {value!r}",
                              key=f"metrics.{name}")
        out[name] = value
    return out


class ModelStore:
    """Numbered model versions with lineage, promotion and rollback, under ``<root>/models``.

    Args:
        root: the store's root directory (``<root>/models`` is created by a writer).
        readonly: open without the writer lock (inspection, ``shoal models list``); mutating
            methods then raise :class:`ModelStoreError`.

    Raises:
        StoreLocked: another writer holds the store.
        StorageError: the disk refused to create or write it (full, read-only, failing).
        DataError: the index is unreadable or inconsistent, or is missing while model files
            exist; a read-only store does not exist.
    """

    def __init__(self, root: str | Path, *, readonly: bool = False) -> None:
        self.root = Path(root)
        self.dir = self.root / "models"
        self.readonly = readonly
        #: Files the opening writer deleted: uncommitted models and temporary files left by
        #: a crash (names relative to :attr:`dir`).
        self.recovered: tuple[str, ...] = ()
        self._lock_fd: int | None = None
        self._cache: ModelIndex | None = None
        if readonly:
            if not self.dir.is_dir():
                raise DataError(f"no model store at {self.dir}", path=str(self.dir))
            self._read()
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._acquire_lock()
        except OSError as exc:
            raise disk_failure(exc, str(self.dir), "opening the model store") or exc
        try:
            self._cache = self._read_disk(create=True)
            self.recovered = self._clean_orphans(self._cache)
        except BaseException as exc:
            self.close()
            failure = disk_failure(exc, str(self.dir), "opening the model store")
            if failure is not None:
                raise failure from exc
            raise

    # -- lifecycle --------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        path = self.dir / _LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid: int | None = int(os.pread(fd, 32, 0).decode().strip() or "x")
            except ValueError:
                pid = None
            os.close(fd)
            holder = f"pid {pid}" if pid is not None else "another process"
            raise StoreLocked(
                f"model store {self.dir} is locked by another writer ({holder}); shoal runs "
                "one aggregator process per store. Open it with readonly=True to inspect it.",
                path=str(path), pid=pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Release the writer lock (a crashed process releases it automatically)."""
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._cache = None
        self.readonly = True  # a closed writer can still answer queries, read-only

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "writer"
        return f"ModelStore({str(self.root)!r}, {mode})"

    # -- the index --------------------------------------------------------------------------

    def _read(self) -> ModelIndex:
        if self._cache is not None:  # the writer's copy is authoritative (single writer)
            return self._cache
        return self._read_disk(create=False)

    def _model_files(self) -> builtins.list[str]:
        return [p.name for p in self.dir.iterdir() if MODEL_FILE.match(p.name)]

    def _read_disk(self, *, create: bool) -> ModelIndex:
        path = self.dir / INDEX_FILE
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            files = self._model_files()
            if files:
                raise DataError(
                    f"{path} is missing but {len(files)} model files exist in {self.dir}; "
                    "restore the index from a backup or move the files away (refusing to "
                    "guess which versions were committed)", path=str(path)) from None
            index = ModelIndex()
            if create:
                index.write(path)
                fsync_dir(self.dir)
            return index
        try:
            return ModelIndex.parse(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"model index {path} is unreadable or inconsistent: {exc}",
                            path=str(path)) from None

    def _clean_orphans(self, index: ModelIndex) -> tuple[str, ...]:
        """Delete what a crashed commit left: model files above the last committed id and
        temporary files. Files of other names are left alone (and never read)."""
        last = max(index.versions, default=0)
        removed = []
        for p in sorted(self.dir.iterdir()):
            m = MODEL_FILE.match(p.name)
            if (m and int(m.group(1)) > last) or TEMP_FILE.match(p.name):
                p.unlink(missing_ok=True)
                removed.append(p.name)
        if removed:
            fsync_dir(self.dir)
        return tuple(removed)

    def _write(self, index: ModelIndex) -> None:
        index.write(self.dir / INDEX_FILE)
        self._cache = index  # on disk from here on, whatever happens next
        fsync_dir(self.dir)

    def _writable(self) -> ModelIndex:
        if self.readonly:
            raise ModelStoreError(f"model store {self.dir} is open read-only (or closed)")
        assert self._cache is not None
        # Work on a copy: the cached index changes only once the new one is on disk.
        return ModelIndex(versions={k: dict(v) for k, v in self._cache.versions.items()},
                      production=self._cache.production, events=list(self._cache.events))

    def _version(self, entry: Mapping[str, Any]) -> ModelVersion:
        # lineage fields are absent from stores written before they were recorded
        rounds = entry.get("rounds") or (entry["round"], entry["round"])
        plan = entry.get("plan")
        return ModelVersion(id=entry["id"], parent=entry["parent"], round=entry["round"],
                            created=entry["created"],
                            metrics=MappingProxyType(dict(entry["metrics"])),
                            status=entry["status"], sha256=entry["sha256"],
                            path=self.dir / entry["file"],
                            rounds=(int(rounds[0]), int(rounds[1])),
                            config_hash=entry.get("config_hash"),
                            plan=None if plan is None else MappingProxyType(plan))

    @staticmethod
    def _entry(index: ModelIndex, version: object) -> dict[str, Any]:
        if isinstance(version, bool) or not isinstance(version, int):
            raise ConfigError(f"version must be an int, got {version!r}", key="version")
        try:
            return index.versions[version]
        except KeyError:
            known = (f"1..{max(index.versions)}" if index.versions else "none yet")
            raise UnknownVersion(f"no model version {version} (versions: {known})",
                                 version=version) from None

    # -- queries ----------------------------------------------------------------------------

    def get(self, version: int) -> ModelVersion:
        """The metadata of ``version``. Raises :class:`UnknownVersion`."""
        return self._version(self._entry(self._read(), version))

    def list(self) -> builtins.list[ModelVersion]:
        """Every committed version, oldest first."""
        index = self._read()
        return [self._version(index.versions[k]) for k in sorted(index.versions)]

    def latest(self, status: str | None = None) -> ModelVersion | None:
        """The newest version (with ``status``, if given), or ``None``."""
        if status is not None and status not in STATUSES:
            raise ConfigError(f"status must be one of {STATUSES}, got {status!r}", key="status")
        index = self._read()
        for k in sorted(index.versions, reverse=True):
            if status is None or index.versions[k]["status"] == status:
                return self._version(index.versions[k])
        return None

    def production(self) -> ModelVersion | None:
        """The version clients are served, or ``None`` before the first promotion."""
        index = self._read()
        return None if index.production is None else self._version(
            index.versions[index.production])

    def lineage(self, version: int) -> builtins.list[ModelVersion]:
        """``version``, its parent, its parent's parent, ... back to a root."""
        index = self._read()
        chain = [self._version(self._entry(index, version))]
        while chain[-1].parent is not None:
            chain.append(self._version(index.versions[chain[-1].parent]))
        return chain

    def history(self) -> builtins.list[ModelEvent]:
        """Every promotion and rollback, oldest first."""
        return [ModelEvent(at=e["at"], action=e["action"], version=e["version"],
                           previous=e["previous"], reason=e.get("reason", ""))
                for e in self._read().events]

    def _verified_path(self, entry: Mapping[str, Any]) -> Path:
        path = self.dir / entry["file"]
        try:
            digest = file_sha256(path)
        except FileNotFoundError:
            raise DataError(f"model file {path} (version {entry['id']}) is missing",
                            path=str(path)) from None
        if digest != entry["sha256"]:
            raise DataError(f"model file {path} (version {entry['id']}) is corrupt: SHA-256 "
                            f"{digest[:16]}... does not match the index's "
                            f"{entry['sha256'][:16]}...", path=str(path))
        return path

    def load(self, version: int) -> Checkpoint:
        """The checkpoint of ``version``, after checking the file's SHA-256.

        Raises:
            UnknownVersion: no such version.
            DataError: the file is missing or corrupt (the message names the file).
        """
        return load_checkpoint(self._verified_path(self._entry(self._read(), version)))

    def verify(self) -> dict[int, str]:
        """Check every version's file; returns version -> problem (empty if all are intact)."""
        problems = {}
        for k, entry in sorted(self._read().versions.items()):
            try:
                self._verified_path(entry)
            except DataError as exc:
                problems[k] = str(exc)
        return problems

    # -- changes ----------------------------------------------------------------------------

    def commit(self, checkpoint: Checkpoint, *, round: int, metrics: Mapping[str, float],
               now: float, parent: int | None = None,
               status: Literal["candidate", "production"] = "candidate",
               rounds: tuple[int, int] | None = None) -> ModelVersion:
        """Store ``checkpoint`` as the next version, with its lineage.

        The configuration hash and the training plan come from ``checkpoint.meta["config"]``
        when it has one (:mod:`shoal.store.lineage`).

        Args:
            checkpoint: the model (and server state) to keep.
            round: the training round that produced it.
            rounds: ``(first, last)`` rounds that trained it since ``parent`` (default
                ``(round, round)``: only the last is known).
            metrics: name -> finite number, stored with the version.
            now: the commit time.
            parent: the version it was trained from (must exist), or ``None``.
            status: ``"candidate"``, or ``"production"`` to commit and promote in one step.

        Raises:
            ConfigError: an argument is invalid (nothing is written).
            UnknownVersion: ``parent`` does not exist.
            StorageError: the disk is full, read-only or failing (naming the store); the
                partial model file is removed and the store is unchanged.
            OSError: writing failed otherwise; the same holds. After a hard crash the next
                writer cleans up instead.
        """
        if not isinstance(checkpoint, Checkpoint):
            raise ConfigError(f"checkpoint must be a shoal.store.Checkpoint, got "
                              f"{type(checkpoint).__name__}", key="checkpoint")
        round = _check_int(round, "round", 0)
        metrics = _check_metrics(metrics)
        now = _check_now(now)
        if status not in ("candidate", "production"):
            raise ConfigError(f"a new version's status must be 'candidate' or 'production', "
                              f"got {status!r}", key="status")
        span = _check_rounds(rounds, round)
        config = checkpoint.meta.get("config") if isinstance(checkpoint.meta, Mapping) \
            else None
        try:
            lineage = {"config_hash": None, "plan": None} if not isinstance(config, Mapping) \
                else {"config_hash": config_hash(config), "plan": plan_from_config(config)}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"the checkpoint's config cannot be hashed: {exc}",
                              key="checkpoint.meta") from None
        index = self._writable()
        if parent is not None:
            self._entry(index, parent)
        vid = max(index.versions, default=0) + 1
        path = self.dir / model_file_name(vid)
        try:
            save_checkpoint(path, checkpoint)
            fsync_dir(self.dir)  # the file's name is durable before the index points at it
            index.versions[vid] = {"id": vid, "parent": parent, "round": round,
                                   "created": now, "metrics": metrics, "status": "candidate",
                                   "sha256": file_sha256(path), "file": path.name,
                                   "rounds": list(span), **lineage}
            if status == "production":
                self._move_production(index, vid, "promote", now)
            self._write(index)
        except BaseException as exc:
            if self._cache is not index:  # the index never listed it: remove the file
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # e.g. a read-only file system: the next writer cleans up
                    pass
            failure = disk_failure(exc, str(self.dir), f"committing version {vid}")
            if failure is not None:
                raise failure from exc
            raise
        return self._version(index.versions[vid])

    @staticmethod
    def _move_production(index: ModelIndex, vid: int, action: str, now: float,
                         reason: str = "") -> None:
        previous = index.production
        if previous is not None:
            index.versions[previous]["status"] = "rolled_back" if action == "rollback" \
                else "candidate"
        index.versions[vid]["status"] = "production"
        index.production = vid
        event = {"at": now, "action": action, "version": vid, "previous": previous}
        if reason:
            event["reason"] = reason
        index.events.append(event)

    def promote(self, version: int, *, now: float, reason: str = "") -> ModelVersion:
        """Make ``version`` the production model; the previous one returns to ``candidate``.

        Promoting the current production version changes nothing. ``reason`` is kept with
        the event in :meth:`history` (the audit trail).

        Raises:
            UnknownVersion: no such version.
            ModelStoreError: the version was rolled back, or the store is read-only.
            DataError: its file is missing or corrupt (production never points at one).
        """
        now, reason = _check_now(now), _check_reason(reason)
        index = self._writable()
        entry = self._entry(index, version)
        if entry["status"] == "production":
            return self._version(entry)
        if entry["status"] == "rolled_back":
            raise ModelStoreError(f"version {version} was rolled back and cannot be promoted; "
                                  "commit it again as a new version if it is really good",
                                  version=version)
        self._verified_path(entry)
        self._move_production(index, version, "promote", now, reason)
        self._write(index)
        return self._version(index.versions[version])

    def rollback(self, version: int, *, now: float, reason: str = "") -> ModelVersion:
        """Mark the current production ``rolled_back`` and make ``version`` production
        (``reason`` as for :meth:`promote`).

        Raises:
            UnknownVersion: no such version.
            ModelStoreError: there is no production version, ``version`` is the current
                production or was rolled back itself, or the store is read-only.
            DataError: its file is missing or corrupt.
        """
        now, reason = _check_now(now), _check_reason(reason)
        index = self._writable()
        entry = self._entry(index, version)
        current = index.production
        if current is None:
            raise ModelStoreError("there is no production version to roll back from; use "
                                  "promote", version=version)
        if version == current:
            raise ModelStoreError(f"version {version} is the current production version; "
                                  "roll back to a different one", version=version)
        if entry["status"] == "rolled_back":
            raise ModelStoreError(f"version {version} was itself rolled back; choose a "
                                  "version that is not", version=version)
        self._verified_path(entry)
        self._move_production(index, version, "rollback", now, reason)
        self._write(index)
        return self._version(index.versions[version])
