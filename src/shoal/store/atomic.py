"""Crash-safe file replacement: write a temporary file, fsync it, rename it over the target.

A reader sees the old file or the new one, never a torn write. The rename is durable once the
directory is fsync'ed too (:func:`fsync_dir`), which callers do when the name must survive a
power loss before they act on it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["replace_atomically", "fsync_dir"]


def replace_atomically(path: str | Path, data: bytes | memoryview, *, mode: int | None = None
                       ) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file in the same directory,
    flush, fsync, ``os.replace``). ``mode`` sets the permissions before the rename (e.g.
    ``0o600`` for keys), so the file is never visible with looser ones."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
