"""The dashboard's state-changing side: the operator token and the model store's pointer.

:class:`ModelControl` drives the real :class:`~shoal.store.ModelStore` -- the aggregator's own
writer, handed over with the lock its commits hold, because a store has one writer and its
index is rewritten whole on every change (a promote racing a commit would lose one of them).
The operator token is 32 random bytes (``secrets``), kept in a file readable by its owner only;
:func:`check_token` compares in constant time.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.store.checkpoint import load_checkpoint

from shoal.errors import ConfigError
from shoal.store import ModelStore

__all__ = ["ModelControl", "check_token", "load_or_create_token"]

_MIN_TOKEN_CHARS = 32


def load_or_create_token(path: str | Path) -> str:
    """The operator token in ``path``; a fresh one (mode 0600) if the file does not exist.

    Raises:
        ConfigError: (key ``dashboard.token_file``) the file holds fewer than 32 characters
            or is readable by others than its owner.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    if p.stat().st_mode & 0o077:
        raise ConfigError(f"operator token file {p} is readable by others (chmod 600 it)",
                          key="dashboard.token_file")
    token = p.read_text().strip()
    if len(token) < _MIN_TOKEN_CHARS:
        raise ConfigError(f"operator token in {p} is shorter than {_MIN_TOKEN_CHARS} "
                          "characters", key="dashboard.token_file")
    return token


def check_token(expected: str, authorization: str | None) -> bool:
    """Whether an ``Authorization`` header is ``Bearer <expected>`` (constant time)."""
    if not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(authorization[len("Bearer "):].strip().encode(),
                               expected.encode())


class ModelControl:
    """Lists, promotes and rolls back versions of a model store for the dashboard.

    Args:
        store: the store (a writer for promote and rollback; a read-only one lists only).
        lock: held around every write; the aggregator holds the same one when it commits.
        clock: the time recorded with a promotion or rollback (UNIX seconds).
        span: wraps each write, called as ``span("store.rollback", version=3)`` (a tracer's
            :meth:`~shoal.telemetry.tracing.TracingObserver.span`).
    """

    def __init__(self, store: ModelStore, lock: threading.Lock | None = None, *,
                 clock: Callable[[], float] = time.time,
                 span: Callable[..., contextlib.AbstractContextManager[Any]] | None = None
                 ) -> None:
        self.store = store
        self.lock = lock if lock is not None else threading.Lock()
        self.clock = clock
        self.span = span

    def listing(self) -> dict[str, Any]:
        """Every version (newest first), the production pointer and its history."""
        with self.lock:
            versions = self.store.list()
            production = self.store.production()
            history = self.store.history()
        return {"available": True, "writable": not self.store.readonly,
                "production": production.id if production else None,
                "versions": [{"id": v.id, "parent": v.parent, "round": v.round,
                              "created": v.created, "status": v.status,
                              "metrics": dict(v.metrics)} for v in reversed(versions)],
                "history": [{"at": e.at, "action": e.action, "version": e.version,
                             "previous": e.previous} for e in history]}

    def act(self, action: str, version: int) -> dict[str, Any]:
        """``promote`` or ``rollback`` to ``version``; returns the new :meth:`listing`.

        Raises:
            ConfigError: an unknown action.
            ModelStoreError: what the store refuses (unknown or rolled-back version, no
                production to roll back from, a read-only or closed store); nothing changed.
        """
        if action not in ("promote", "rollback"):
            raise ConfigError(f"unknown action {action!r}: promote or rollback",
                              key="action")
        traced = (self.span(f"store.{action}", version=version) if self.span is not None
                  else contextlib.nullcontext())
        with traced, self.lock:
            move = self.store.promote if action == "promote" else self.store.rollback
            move(version, now=self.clock())
        return self.listing()

    def num_params(self) -> int:
        """The model's size, read from the newest version's checkpoint (0 before the first
        commit)."""
        with self.lock:
            latest = self.store.latest()
        return 0 if latest is None else int(load_checkpoint(latest.path).state.params.size)
