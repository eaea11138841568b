"""Structured logs: one JSON object per line, for log shippers and `jq`.

Every record carries ``ts`` (UNIX seconds), ``level``, ``logger`` and ``msg``; extra fields
passed as ``logger.info("...", extra={"fields": {...}})`` are merged in, so events such as a
refused upload are machine-readable (device, round, reason) as well as readable.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TextIO

__all__ = ["JsonFormatter", "configure_json_logging"]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_json_logging(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send the ``shoal`` loggers' records to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("shoal")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
