"""When the disk under the aggregator's state fails: full, read-only, or broken.

:class:`StorageError` is what the model store and the SQLite registry raise when they cannot
write because of the disk (``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EIO``; SQLite's "database or
disk is full", "attempt to write a readonly database", "disk I/O error"), naming the path.
Nothing half-written is left behind (the store writes a temporary file and renames it, the
registry rolls its transaction back), so the aggregator stops with this error and a restart
on a disk with room resumes from the last committed version. :func:`disk_failure` tells a
disk failure from any other error.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from shoal.errors import ShoalError

__all__ = ["StorageError", "disk_failure"]

_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
           errno.EROFS: "the file system is read-only", errno.EIO: "disk I/O error"}
_SQLITE = {sqlite3.SQLITE_FULL: "the disk is full",
           sqlite3.SQLITE_READONLY: "the database is read-only",
           sqlite3.SQLITE_IOERR: "disk I/O error", sqlite3.SQLITE_CANTOPEN: "cannot open it"}


class StorageError(ShoalError):
    """The aggregator's state cannot be written: the disk is full, read-only or failing.

    Attributes:
        path: the file or directory that could not be written.
        cause: what the disk said (``"the disk is full"``, ...).
    """

    def __init__(self, path: str, cause: str, action: str) -> None:
        super().__init__(f"{path}: {cause} ({action}); free space or make it writable, "
                         f"then restart: committed model versions are intact and the "
                         f"aggregator resumes from the last one")
        self.path, self.cause = path, cause


def disk_failure(exc: BaseException, path: str, action: str) -> StorageError | None:
    """A :class:`StorageError` for ``exc`` if it is a disk failure writing ``path`` (while
    doing ``action``, e.g. ``"committing version 7"``), else ``None``."""
    if isinstance(exc, OSError) and exc.errno in _ERRNOS:
        return StorageError(str(exc.filename or path), _cause(path, _ERRNOS[exc.errno]),
                            action)
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary in _SQLITE:
            return StorageError(path, _cause(path, _SQLITE[primary]), action)
    return None


def _cause(path: str, said: str) -> str:
    """What the error said, unless the file system under ``path`` tells more: SQLite reports
    a read-only file system as "cannot open" (it cannot create its journal files)."""
    target = Path(path)
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        if os.statvfs(target).f_flag & os.ST_RDONLY:
            return "the file system is read-only"
    except OSError:
        pass
    return said
