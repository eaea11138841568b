"""The model store: every committed global model as a numbered version with lineage.

Layout under ``<root>/models/``::

    index.json      the metadata of every version and the production pointer (the truth)
    v000001.npz     one checkpoint per version (``shoal.store.checkpoint`` format)
    v000002.npz
    .lock           held (``fcntl.flock``) by a writer while it changes the store

A version is committed in two atomic steps: the checkpoint file is written (temporary file,
fsync, rename -- :func:`~shoal.store.checkpoint.save_checkpoint`) and the directory fsync'ed,
then ``index.json`` is rewritten the same way. The index is the single source of truth: a
version exists once the index lists it. A crash between the two steps leaves a model file the
index does not know; the next writer to open the store deletes it (and stray temporary files)
and reports them in :attr:`ModelStore.recovered`. Readers never look at unlisted files.

Why a JSON index and not SQLite: the store has few writers and a few records per version, the
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

Several writers (threads or processes, e.g. an aggregator and the dashboard moving the
production pointer) may share a store: every change -- a commit, a promotion, a rollback --
holds the exclusive ``flock`` on ``.lock`` (:class:`~shoal.store.writer_lock.WriterLock`)
while it re-reads the index, writes and renames, so the changes are serialised and none is
lost. Versions are immutable: an id is allocated under the lock, its file is written once and
never rewritten. The production pointer moves by compare-and-set: ``promote(v,
expected=p)`` and ``rollback(v, expected=p)`` move it only if it still points at ``p``, and
raise :class:`PointerMoved` (changing nothing) if another writer moved it first. A writer
that cannot get the lock within ``lock_timeout`` seconds raises :class:`StoreLocked`. Queries
take no lock: each reads the current index (cached until the file is replaced), which is
always either the old or the new complete file. Readers (``readonly=True``) cannot change
the store.

The index's format and the file names are :mod:`shoal.store.model_index`; the records the store
returns (:class:`ModelVersion`, :class:`ModelEvent`) and its errors are
:mod:`shoal.store.model_versions`.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import EllipsisType
from typing import Any, Literal

from shoal.errors import ConfigError, DataError, int_at_least
from shoal.store.atomic import fsync_dir
from shoal.store.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shoal.store.disk import disk_failure
from shoal.store.lineage import config_hash, plan_from_config
from shoal.store.model_checks import (Signatures, check_metrics, check_now,
                                      check_reason, check_rounds, check_signatures)
from shoal.store.model_index import (INDEX_FILE, MODEL_FILE, TEMP_FILE, ModelIndex,
                                     file_sha256, model_file_name)
from shoal.store.model_versions import (STATUSES, ModelEvent, ModelStoreError, ModelVersion,
                                        PointerMoved, UnknownVersion)
from shoal.store.writer_lock import WriterLock

__all__ = ["ModelStore"]

_LOCK = ".lock"


class ModelStore:
    """Numbered model versions with lineage, promotion and rollback, under ``<root>/models``.

    Args:
        root: the store's root directory (``<root>/models`` is created by a writer).
        readonly: open for queries only (inspection, ``shoal models list``); mutating
            methods then raise :class:`ModelStoreError`.
        lock_timeout: seconds a change waits for another writer's change to finish.

    Raises:
        StoreLocked: another writer held the lock for ``lock_timeout`` (opening a writer
            takes it once, to clean up after a crash).
        StorageError: the disk refused to create or write it (full, read-only, failing).
        DataError: the index is unreadable or inconsistent, or is missing while model files
            exist; a read-only store does not exist.
    """

    def __init__(self, root: str | Path, *, readonly: bool = False,
                 lock_timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.dir = self.root / "models"
        self.readonly = readonly
        #: Files the opening writer deleted: uncommitted models and temporary files left by
        #: a crash (names relative to :attr:`dir`).
        self.recovered: tuple[str, ...] = ()
        self._lock: WriterLock | None = None
        self._cache: tuple[tuple[int, int, int], ModelIndex] | None = None
        #: The index :meth:`_write` last put on disk (a failed commit checks it: was its
        #: model file listed before the failure?).
        self._written: ModelIndex | None = None
        if readonly:
            if not self.dir.is_dir():
                raise DataError(f"no model store at {self.dir}", path=str(self.dir))
            self._read()
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = WriterLock(self.dir / _LOCK, lock_timeout)
        except OSError as exc:
            raise disk_failure(exc, str(self.dir), "opening the model store") or exc
        try:
            # under the lock, a model file the index does not list is no other writer's
            # commit in progress: it is a crashed one's
            with self._lock.held():
                self.recovered = self._clean_orphans(self._read_disk(create=True))
        except BaseException as exc:
            self.close()
            failure = disk_failure(exc, str(self.dir), "opening the model store")
            if failure is not None:
                raise failure from exc
            raise

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop writing through this object (it still answers queries, read-only)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self.readonly = True

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "writer"
        return f"ModelStore({str(self.root)!r}, {mode})"

    # -- the index --------------------------------------------------------------------------

    def _read(self) -> ModelIndex:
        """The current index: cached while ``index.json`` is the same file (every change
        renames a new one in, which changes its inode)."""
        try:
            st = os.stat(self.dir / INDEX_FILE)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return self._read_disk(create=False)  # refused unless the store is empty
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._read_disk(create=False))
        return self._cache[1]

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
        self._written = index  # on disk from here on, whatever happens next
        fsync_dir(self.dir)

    def _writer(self) -> WriterLock:
        if self.readonly or self._lock is None:
            raise ModelStoreError(f"model store {self.dir} is open read-only (or closed)")
        return self._lock

    def _writable(self) -> ModelIndex:
        """A private copy of the index as another writer may have left it (under the lock);
        the cached index is never changed in place."""
        return self._read_disk(create=False)

    def _version(self, entry: Mapping[str, Any]) -> ModelVersion:
        return ModelVersion.from_entry(entry, self.dir)

    # -- queries ----------------------------------------------------------------------------

    def get(self, version: int) -> ModelVersion:
        """The metadata of ``version``. Raises :class:`UnknownVersion`."""
        return self._version(self._read().entry(version))

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
        chain = [self._version(index.entry(version))]
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
        return load_checkpoint(self._verified_path(self._read().entry(version)))

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
               rounds: tuple[int, int] | None = None,
               sign: Signatures | None = None) -> ModelVersion:
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
            sign: ``sign(version id, plan)`` -> kind -> ``{"header", "signature"}``, called
                under the writer lock once the id is allocated: the operator's signatures
                of the version's model and plan, kept beside it (:meth:`sign`).

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
        round = int_at_least(round, "round", 0)
        metrics = check_metrics(metrics)
        now = check_now(now)
        if status not in ("candidate", "production"):
            raise ConfigError(f"a new version's status must be 'candidate' or 'production', "
                              f"got {status!r}", key="status")
        span = check_rounds(rounds, round)
        config = checkpoint.meta.get("config") if isinstance(checkpoint.meta, Mapping) \
            else None
        try:
            lineage = {"config_hash": None, "plan": None} if not isinstance(config, Mapping) \
                else {"config_hash": config_hash(config), "plan": plan_from_config(config)}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"the checkpoint's config cannot be hashed: {exc}",
                              key="checkpoint.meta") from None
        with self._writer().held():
            return self._commit(checkpoint, round, metrics, now, parent, status, span,
                                lineage, sign)

    def _commit(self, checkpoint: Checkpoint, round: int, metrics: dict[str, float],
                now: float, parent: int | None, status: str, span: tuple[int, int],
                lineage: dict[str, Any], sign: Signatures | None) -> ModelVersion:
        index = self._writable()
        if parent is not None:
            index.entry(parent)
        vid = max(index.versions, default=0) + 1
        if sign is not None:  # before any file is written: a failing signer leaves nothing
            lineage = {**lineage, "signatures": check_signatures(sign(vid, lineage["plan"]))}
        path = self.dir / model_file_name(vid)
        self._written = None
        try:
            save_checkpoint(path, checkpoint)
            fsync_dir(self.dir)  # the file's name is durable before the index points at it
            index.versions[vid] = {"id": vid, "parent": parent, "round": round,
                                   "created": now, "metrics": metrics, "status": "candidate",
                                   "sha256": file_sha256(path), "file": path.name,
                                   "rounds": list(span), **lineage}
            if status == "production":
                index.move_production(vid, "promote", now)
            self._write(index)
        except BaseException as exc:
            if self._written is not index:  # the index never listed it: remove the file
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # e.g. a read-only file system: the next writer cleans up
                    pass
            failure = disk_failure(exc, str(self.dir), f"committing version {vid}")
            if failure is not None:
                raise failure from exc
            raise
        return self._version(index.versions[vid])

    def promote(self, version: int, *, now: float, reason: str = "",
                expected: int | None | EllipsisType = ...) -> ModelVersion:
        """Make ``version`` the production model; the previous one returns to ``candidate``.

        Promoting the current production version changes nothing. ``reason`` is kept with
        the event in :meth:`history` (the audit trail). With ``expected`` (a version, or
        ``None`` for "no production yet") the pointer moves only if it still points there.

        Raises:
            UnknownVersion: no such version.
            PointerMoved: the production pointer is not at ``expected`` (nothing changed).
            ModelStoreError: the version was rolled back, or the store is read-only.
            DataError: its file is missing or corrupt (production never points at one).
        """
        return self._move(self._promote, version, now, reason, expected)

    def _move(self, apply: Callable[[ModelIndex, int, float, str], ModelVersion],
              version: int, now: float, reason: str,
              expected: int | None | EllipsisType) -> ModelVersion:
        """A move of the production pointer: ``apply`` to the index as it is under the lock,
        if the pointer is at ``expected``."""
        now, reason = check_now(now), check_reason(reason)
        with self._writer().held():
            index = self._writable()
            index.compare(expected)
            return apply(index, version, now, reason)

    def _promote(self, index: ModelIndex, version: int, now: float, reason: str
                 ) -> ModelVersion:
        entry = index.entry(version)
        if not index.promotable(version):
            return self._version(entry)
        self._verified_path(entry)
        index.move_production(version, "promote", now, reason)
        self._write(index)
        return self._version(index.versions[version])

    def reject(self, version: int, *, now: float, reason: str = "") -> ModelVersion:
        """Mark candidate ``version`` ``rolled_back`` without moving production: a canary
        that failed (it was only ever served to the canary's devices). Logged in
        :meth:`history` as ``"reject"`` with production unchanged in ``previous``.

        Raises:
            UnknownVersion: no such version.
            ModelStoreError: the version is production (use :meth:`rollback`) or already
                rolled back, or the store is read-only.
        """
        now, reason = check_now(now), check_reason(reason)
        with self._writer().held():  # re-read under the lock: another writer may have acted
            index = self._writable()
            entry = index.reject(version, now, reason)
            self._write(index)
            return self._version(entry)

    def sign(self, version: int, signatures: Mapping[str, Mapping[str, str]]
             ) -> ModelVersion:
        """Keep the operator's ``signatures`` (kind -> ``{"header", "signature"}``) beside
        ``version``, replacing those of the same kinds (a version committed before the
        operator had a key, or signed with a key since replaced). The version itself is
        unchanged: a signature is a statement about it, checked by whoever receives it.

        Raises:
            UnknownVersion: no such version.
            ConfigError: malformed signatures (nothing changes).
            ModelStoreError: the store is read-only.
        """
        signatures = check_signatures(signatures)
        with self._writer().held():
            index = self._writable()
            entry = index.entry(version)
            entry["signatures"] = {**(entry.get("signatures") or {}), **signatures}
            self._write(index)
            return self._version(entry)

    def rollback(self, version: int, *, now: float, reason: str = "",
                 expected: int | None | EllipsisType = ...) -> ModelVersion:
        """Mark the current production ``rolled_back`` and make ``version`` production
        (``reason`` and ``expected`` as for :meth:`promote`).

        Raises:
            UnknownVersion: no such version.
            PointerMoved: the production pointer is not at ``expected`` (nothing changed).
            ModelStoreError: there is no production version, ``version`` is the current
                production or was rolled back itself, or the store is read-only.
            DataError: its file is missing or corrupt.
        """
        return self._move(self._rollback, version, now, reason, expected)

    def _rollback(self, index: ModelIndex, version: int, now: float, reason: str
                  ) -> ModelVersion:
        index.check_rollback(version)
        self._verified_path(index.entry(version))
        index.move_production(version, "rollback", now, reason)
        self._write(index)
        return self._version(index.versions[version])
