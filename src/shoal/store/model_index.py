"""The model store's on-disk format: ``index.json`` and the names of the model files.

The index is the single source of truth of :class:`~shoal.store.models.ModelStore` (a version
exists once the index lists it); the module docstring there gives the directory layout and the
commit protocol. Here: the index's content (:class:`ModelIndex`) with the rules of its
production pointer (what may be promoted, rolled back to or rejected, and the move itself),
its strict parser, its atomic writer, and the file names the store owns (``v000001.npz``,
temporary files of a torn write).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType
from typing import Any

from shoal.store.atomic import replace_atomically
from shoal.errors import ConfigError
from shoal.store.model_versions import STATUSES, ModelStoreError, PointerMoved, UnknownVersion

__all__ = ["FORMAT", "INDEX_FILE", "MODEL_FILE", "TEMP_FILE", "ModelIndex", "file_sha256",
           "model_file_name"]

FORMAT = "shoal-models/1"
INDEX_FILE = "index.json"
MODEL_FILE = re.compile(r"v(\d{6,})\.npz\Z")
# Temporary files of save_checkpoint (".v000001.npz.XXXX.tmp") and of the index writer.
TEMP_FILE = re.compile(r"\.(v\d{6,}\.npz|index\.json)\..*\.tmp\Z")


def model_file_name(version: int) -> str:
    """The model file of ``version`` (``v000001.npz``)."""
    return f"v{version:06d}.npz"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ModelIndex:
    """The content of ``index.json``.

    Attributes:
        versions: version id -> its entry (the fields of
            :class:`~shoal.store.model_versions.ModelVersion`, the file's name as ``"file"``).
        production: the production version, or ``None``.
        events: every move of the production pointer, oldest first.
    """

    versions: dict[int, dict[str, Any]] = field(default_factory=dict)
    production: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    def entry(self, version: object) -> dict[str, Any]:
        """The entry of ``version``.

        Raises:
            ConfigError: ``version`` is not an int.
            UnknownVersion: the index does not list it.
        """
        if isinstance(version, bool) or not isinstance(version, int):
            raise ConfigError(f"version must be an int, got {version!r}", key="version")
        try:
            return self.versions[version]
        except KeyError:
            known = (f"1..{max(self.versions)}" if self.versions else "none yet")
            raise UnknownVersion(f"no model version {version} (versions: {known})",
                                 version=version) from None

    # The rules of the production pointer. Each check raises before anything changes; the
    # store verifies the model file between the check and the move.

    def promotable(self, version: int) -> bool:
        """Whether promoting ``version`` moves the pointer (``False``: it is production
        already, nothing to do).

        Raises:
            UnknownVersion, ConfigError: see :meth:`entry`.
            ModelStoreError: it was rolled back (never promoted again).
        """
        status = self.entry(version)["status"]
        if status == "rolled_back":
            raise ModelStoreError(f"version {version} was rolled back and cannot be promoted; "
                                  "commit it again as a new version if it is really good",
                                  version=version)
        return status != "production"

    def check_rollback(self, version: int) -> None:
        """Refuse a rollback to ``version`` unless there is a production to roll back from,
        and ``version`` is neither it nor rolled back itself.

        Raises:
            UnknownVersion, ConfigError: see :meth:`entry`.
            ModelStoreError: the reason.
        """
        entry = self.entry(version)
        if self.production is None:
            raise ModelStoreError("there is no production version to roll back from; use "
                                  "promote", version=version)
        if version == self.production:
            raise ModelStoreError(f"version {version} is the current production version; "
                                  "roll back to a different one", version=version)
        if entry["status"] == "rolled_back":
            raise ModelStoreError(f"version {version} was itself rolled back; choose a "
                                  "version that is not", version=version)

    def reject(self, version: int, now: float, reason: str = "") -> dict[str, Any]:
        """Mark candidate ``version`` ``rolled_back`` (production unchanged) and log the
        event; returns its entry.

        Raises:
            UnknownVersion, ConfigError: see :meth:`entry`.
            ModelStoreError: it is production or already rolled back.
        """
        entry = self.entry(version)
        if entry["status"] != "candidate":
            raise ModelStoreError(f"version {version} is {entry['status']}, not a "
                                  "candidate; only a candidate can be rejected",
                                  version=version)
        entry["status"] = "rolled_back"
        event = {"at": now, "action": "reject", "version": version,
                 "previous": self.production}
        if reason:
            event["reason"] = reason
        self.events.append(event)
        return entry

    def move_production(self, vid: int, action: str, now: float, reason: str = "") -> None:
        """Point production at ``vid`` (``action`` ``"promote"`` or ``"rollback"``: the
        previous production becomes ``candidate`` or ``rolled_back``) and log the event."""
        previous = self.production
        if previous is not None:
            self.versions[previous]["status"] = "rolled_back" if action == "rollback" \
                else "candidate"
        self.versions[vid]["status"] = "production"
        self.production = vid
        event = {"at": now, "action": action, "version": vid, "previous": previous}
        if reason:
            event["reason"] = reason
        self.events.append(event)

    def compare(self, expected: int | None | EllipsisType) -> None:
        """The compare of compare-and-set: refuse unless production is at ``expected``
        (``...``: anywhere).

        Raises:
            PointerMoved: it is elsewhere.
        """
        if expected is not ... and self.production != expected:
            raise PointerMoved(f"the production pointer is at {self.production}, not "
                               f"{expected} as expected: another writer moved it; read it "
                               "again and decide anew", expected=expected,
                               actual=self.production)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "production": self.production,
                "versions": [self.versions[k] for k in sorted(self.versions)],
                "events": self.events}

    def write(self, path: Path) -> None:
        """Write the index to ``path`` atomically (the caller fsyncs the directory)."""
        replace_atomically(path, json.dumps(self.to_json(), indent=1, sort_keys=True,
                                            allow_nan=False).encode())

    @classmethod
    def parse(cls, text: bytes) -> ModelIndex:
        """Parse and check ``index.json``: format, unique ids, file names, statuses, parents
        that exist, and a production pointer that agrees with the statuses.

        Raises:
            ValueError, KeyError, TypeError: the text is not a consistent index.
        """
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"not a shoal model index (format "
                             f"{doc.get('format') if isinstance(doc, dict) else None!r})")
        index = cls(production=doc["production"], events=list(doc["events"]))
        for entry in doc["versions"]:
            vid = entry["id"]
            if not isinstance(vid, int) or vid < 1 or vid in index.versions:
                raise ValueError(f"bad or duplicate version id {vid!r}")
            if entry["file"] != model_file_name(vid):
                raise ValueError(f"version {vid} names file {entry['file']!r}")
            if entry["status"] not in STATUSES:
                raise ValueError(f"version {vid} has unknown status {entry['status']!r}")
            if entry["parent"] is not None and entry["parent"] not in index.versions:
                raise ValueError(f"version {vid} has unknown parent {entry['parent']!r}")
            for key in ("round", "created", "metrics", "sha256"):
                entry[key]  # noqa: B018 -- presence check, KeyError is reported
            index.versions[vid] = entry
        in_production = [v for v, e in index.versions.items() if e["status"] == "production"]
        expected = [] if index.production is None else [index.production]
        if in_production != expected:
            raise ValueError(f"production pointer {index.production!r} disagrees with the "
                             f"versions marked production {in_production}")
        return index
