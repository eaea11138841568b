"""An append-only audit log of lifecycle decisions: one JSON object per line.

Each canary step (start, every evaluation, every verdict, the promotion or rollback) and each
drift alarm is appended with its time and the figures it was decided on, so an operator can
replay why a model reached or left production. With a path, every entry is written and
flushed as it happens (a crash loses at most the line being written; a torn last line is
skipped by :func:`read_audit`); without one the log lives in memory (simulations, tests).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shoal.errors import ConfigError

__all__ = ["AuditLog", "read_audit"]


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; "not measured"
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    return value


class AuditLog:
    """Append-only decisions.

    Args:
        path: a JSON-lines file to append to (created with its directory), or ``None``.
        listener: called with every entry once it is written (the live dashboard); what it
            raises is the caller's.
    """

    def __init__(self, path: str | Path | None = None, *,
                 listener: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.listener = listener
        self.entries: list[dict[str, Any]] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, at: float, action: str, **fields: Any) -> dict[str, Any]:
        """Record ``action`` at time ``at`` with ``fields``; returns the entry.

        Raises:
            ConfigError: ``action`` is empty.
        """
        if not action or not isinstance(action, str):
            raise ConfigError("an audit entry needs an action", key="action")
        entry = {"at": float(at), "action": action} | _plain(fields)
        line = json.dumps(entry, sort_keys=True, allow_nan=False)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.entries.append(entry)
        if self.listener is not None:
            self.listener(entry)
        return entry


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    """The entries of an audit file, oldest first (a torn last line is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
