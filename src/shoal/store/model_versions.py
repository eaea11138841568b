"""What the model store hands out and refuses with: version and event records, the errors.

A :class:`ModelVersion` is one committed global model's metadata; a :class:`ModelEvent` is one
move of the production pointer. Both are read-only values built from the index by
:class:`~shoal.store.models.ModelStore`, which also raises the errors here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from shoal.errors import ShoalError

__all__ = [
    "STATUSES",
    "ModelEvent",
    "ModelStoreError",
    "ModelVersion",
    "PointerMoved",
    "StoreLocked",
    "UnknownVersion",
]

#: The statuses a version can have.
STATUSES = ("candidate", "production", "rolled_back")


class ModelStoreError(ShoalError):
    """A model-store operation was refused; the store is unchanged.

    Attributes:
        version: the version concerned, when there is one.
    """

    def __init__(self, message: str, *, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version


class UnknownVersion(ModelStoreError, LookupError):
    """No committed version has this id."""


class PointerMoved(ModelStoreError):
    """A compare-and-set of the production pointer found it elsewhere (another writer moved
    it); nothing was changed.

    Attributes:
        expected: where the caller believed it was (``None``: no production version).
        actual: where it is.
    """

    def __init__(self, message: str, *, expected: int | None, actual: int | None) -> None:
        super().__init__(message, version=actual)
        self.expected, self.actual = expected, actual


class StoreLocked(ModelStoreError):
    """Another process holds the store's writer lock.

    Attributes:
        path: the lock file.
        pid: the holder's process id as it recorded it, when readable.
    """

    def __init__(self, message: str, *, path: str, pid: int | None) -> None:
        super().__init__(message)
        self.path = path
        self.pid = pid


@dataclass(frozen=True)
class ModelVersion:
    """One committed global model (read-only).

    Attributes:
        id: version number, 1, 2, 3, ... in commit order, never reused.
        parent: the version it was trained from, or ``None``.
        round: the training round that produced it.
        created: commit time (UNIX seconds, as passed in).
        metrics: name -> number (e.g. evaluation accuracy).
        status: ``"candidate"``, ``"production"`` or ``"rolled_back"``.
        sha256: SHA-256 of the model file's bytes.
        path: the model file.
        rounds: ``(first, last)`` training rounds that produced it.
        config_hash: SHA-256 of the configuration it was trained under, or ``None`` (a
            checkpoint without one, or a store written before lineage was recorded).
        plan: the training plan (:func:`~shoal.store.lineage.plan_from_config`), or
            ``None`` likewise.
        signatures: kind (``"model"``, ``"plan"``) -> the operator's signature of the
            version's model or plan, as ``{"header": ..., "signature": ...}``
            (:meth:`SignedArtifact.to_json <shoal.lifecycle.signing.SignedArtifact.to_json>`);
            empty when the version was never signed.
    """

    id: int
    parent: int | None
    round: int
    created: float
    metrics: Mapping[str, float]
    status: str
    sha256: str
    path: Path
    rounds: tuple[int, int] = (0, 0)
    config_hash: str | None = None
    plan: Mapping[str, Any] | None = None
    signatures: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], directory: Path) -> ModelVersion:
        """The version an index entry describes (its file under ``directory``)."""
        # lineage and signature fields are absent from stores written before they existed
        rounds = entry.get("rounds") or (entry["round"], entry["round"])
        plan = entry.get("plan")
        signatures = {k: MappingProxyType(dict(v))
                      for k, v in (entry.get("signatures") or {}).items()}
        return cls(id=entry["id"], parent=entry["parent"], round=entry["round"],
                   created=entry["created"], metrics=MappingProxyType(dict(entry["metrics"])),
                   status=entry["status"], sha256=entry["sha256"],
                   path=directory / entry["file"], rounds=(int(rounds[0]), int(rounds[1])),
                   config_hash=entry.get("config_hash"),
                   plan=None if plan is None else MappingProxyType(plan),
                   signatures=MappingProxyType(signatures))

    def __hash__(self) -> int:
        return hash(self.id)  # metrics is unhashable; equal versions share an id

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (``shoal models show --json``); ``signatures`` only for a
        signed version."""
        out = {"id": self.id, "parent": self.parent, "round": self.round,
               "created": self.created, "metrics": dict(self.metrics),
               "status": self.status, "sha256": self.sha256, "file": self.path.name,
               "rounds": list(self.rounds), "config_hash": self.config_hash,
               "plan": None if self.plan is None else dict(self.plan)}
        if self.signatures:
            out["signatures"] = {k: dict(v) for k, v in self.signatures.items()}
        return out


@dataclass(frozen=True)
class ModelEvent:
    """One move of the production pointer.

    Attributes:
        at: when (UNIX seconds, as passed in).
        action: ``"promote"``, ``"rollback"`` or ``"reject"`` (a candidate refused, e.g. by
            a canary; production did not move).
        version: the version that became production (the refused one for ``"reject"``).
        previous: the production version before, or ``None``.
        reason: why, as the mover said (an operator's note, a canary's verdict), or ``""``.
    """

    at: float
    action: str
    version: int
    previous: int | None
    reason: str = ""
