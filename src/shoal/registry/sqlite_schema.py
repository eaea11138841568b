"""The SQLite registry's on-disk layout (schema version 1; see ``docs/operations.md``).

:class:`~shoal.registry.sqlite.SQLiteRegistry` creates these tables in a new file and refuses
a file of another version; this module is the layout alone, what an operator or a migration
reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from shoal.registry.base import Device

__all__ = ["COLUMNS", "NUMBERED", "SCHEMA", "SCHEMA_VERSION", "row_to_device"]

#: Version of the on-disk layout this module describes.
SCHEMA_VERSION = 1

#: The tables and index of a new registry file.
SCHEMA = (
    """CREATE TABLE devices (
        device_id     TEXT PRIMARY KEY NOT NULL,
        attributes    TEXT NOT NULL,
        capabilities  TEXT NOT NULL,
        windows       TEXT NOT NULL,
        enrolled_at   REAL NOT NULL,
        last_seen     REAL NOT NULL,
        participation INTEGER NOT NULL DEFAULT 0 CHECK (participation >= 0)
    ) WITHOUT ROWID""",
    "CREATE INDEX devices_last_seen ON devices (last_seen)",
    """CREATE TABLE outcomes (
        device_id TEXT NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
        round     INTEGER NOT NULL,
        outcome   TEXT NOT NULL,
        ts        REAL NOT NULL,
        PRIMARY KEY (device_id, round)
    ) WITHOUT ROWID""",
)
#: A device row's columns, in the order :func:`row_to_device` reads them.
COLUMNS = "device_id, attributes, capabilities, windows, enrolled_at, last_seen, participation"
#: Every device with its row number in device-id order (the row of a ``Columns`` view).
NUMBERED = ("WITH d AS (SELECT attributes, windows, "
            "row_number() OVER (ORDER BY device_id) - 1 AS row FROM devices) ")


def row_to_device(row: Sequence[Any]) -> Device:
    """The :class:`~shoal.registry.base.Device` of a row of :data:`COLUMNS`."""
    return Device(device_id=row[0], attributes=json.loads(row[1]),
                  capabilities=json.loads(row[2]),
                  windows=tuple((int(a), int(b)) for a, b in json.loads(row[3])),
                  enrolled_at=row[4], last_seen=row[5], participation=row[6])
