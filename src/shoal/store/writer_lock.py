"""The model store's writer lock: an exclusive ``flock`` on ``<store>/.lock``, held for one
change at a time, so several writers (threads, processes) can share one store.

A change (a commit, a promotion, a rollback) takes the lock, re-reads the index, writes and
releases it: the changes of all writers are serialised and each starts from the index the
previous one left. The kernel drops a ``flock`` when its holder dies, so a crashed writer
never leaves the store locked. The holder writes its process id into the file (in place, a
fixed width: no new disk block is needed, so even a full disk lets the lock be taken and the
write itself report the failure), which :class:`~shoal.store.model_versions.StoreLocked`
names when a writer waits past its timeout.

``flock`` is exact on one machine and on local file systems; on a network file system it is
only as good as that file system's locks (NFSv4 and CephFS honour them; see
``docs/scaling.md``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from shoal.store.model_versions import StoreLocked

__all__ = ["WriterLock"]

_PID_WIDTH = 20


class WriterLock:
    """``flock`` on ``path``, taken per change (:meth:`held`).

    Args:
        path: the lock file (created if missing).
        timeout: seconds to wait for another writer before giving up.

    Raises:
        OSError: the file cannot be created or opened for writing (the caller turns a disk
            failure into :class:`~shoal.store.disk.StorageError`).
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path, self.timeout = path, timeout
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self._threads = threading.Lock()  # flock is per open file: threads queue here

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the duration of the block.

        Raises:
            StoreLocked: another writer held it for longer than ``timeout`` seconds.
        """
        deadline = time.monotonic() + self.timeout
        if not self._threads.acquire(timeout=self.timeout):
            raise self._locked()
        try:
            fd = self._fd
            if fd is None:
                raise ValueError("the writer lock is closed")
            pause = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise self._locked() from None
                    time.sleep(pause)
                    pause = min(2 * pause, 0.05)
            try:
                os.pwrite(fd, str(os.getpid()).ljust(_PID_WIDTH).encode(), 0)
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def _locked(self) -> StoreLocked:
        try:
            with open(self.path, "rb") as f:
                pid: int | None = int(f.read(_PID_WIDTH).decode().strip() or "x")
        except (OSError, ValueError):
            pid = None
        holder = f"pid {pid}" if pid is not None else "another process"
        return StoreLocked(f"model store {self.path.parent} stayed locked by another writer "
                           f"({holder}) for {self.timeout:g} s; a change holds it for one "
                           "commit, promotion or rollback, so that writer is stuck",
                           path=str(self.path), pid=pid)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
