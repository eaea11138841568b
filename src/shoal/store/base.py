"""The model store's interface: what the aggregator, the dashboard and ``shoal models`` use.

:class:`Store` is a ``typing.Protocol``; :class:`~shoal.store.models.ModelStore` (a
directory of files, the default) implements it. What every implementation promises:

* **versions are immutable**: a commit allocates the next id (1, 2, 3, ..., never reused) and
  writes that version's model once; its model and metadata never change afterwards, only its
  status (``candidate``, ``production``, ``rolled_back``);
* **several writers are safe**: commits, promotions and rollbacks from several threads or
  processes are serialised, each applied to the state the previous one left, none lost;
* **the production pointer moves by compare-and-set**: :meth:`Store.promote` and
  :meth:`Store.rollback` with ``expected`` move it only if it still points there, and raise
  :class:`~shoal.store.model_versions.PointerMoved` (changing nothing) otherwise;
* a refused call changes nothing, and a crash mid-commit leaves the previous state.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from types import EllipsisType
from typing import Literal, Protocol, runtime_checkable

from shoal.store.checkpoint import Checkpoint
from shoal.store.model_versions import ModelEvent, ModelVersion

__all__ = ["Store"]


@runtime_checkable
class Store(Protocol):
    """Numbered, immutable model versions with lineage and a production pointer (see the
    module docstring for the guarantees)."""

    def get(self, version: int) -> ModelVersion:
        """The metadata of ``version``; raises ``UnknownVersion``."""
        ...

    def list(self) -> builtins.list[ModelVersion]:
        """Every committed version, oldest first."""
        ...

    def latest(self, status: str | None = None) -> ModelVersion | None:
        """The newest version (with ``status``, if given)."""
        ...

    def production(self) -> ModelVersion | None:
        """The version clients are served, if any."""
        ...

    def lineage(self, version: int) -> builtins.list[ModelVersion]:
        """``version`` and its ancestors, newest first."""
        ...

    def history(self) -> builtins.list[ModelEvent]:
        """Every move of the production pointer, oldest first."""
        ...

    def load(self, version: int) -> Checkpoint:
        """The model of ``version``, checked against its recorded digest."""
        ...

    def verify(self) -> dict[int, str]:
        """Version -> problem for every damaged version (empty if all are intact)."""
        ...

    def commit(self, checkpoint: Checkpoint, *, round: int, metrics: Mapping[str, float],
               now: float, parent: int | None = None,
               status: Literal["candidate", "production"] = "candidate",
               rounds: tuple[int, int] | None = None) -> ModelVersion:
        """Store ``checkpoint`` as the next version."""
        ...

    def promote(self, version: int, *, now: float, reason: str = "",
                expected: int | None | EllipsisType = ...) -> ModelVersion:
        """Point production at ``version`` (if it is still at ``expected``, when given)."""
        ...

    def rollback(self, version: int, *, now: float, reason: str = "",
                 expected: int | None | EllipsisType = ...) -> ModelVersion:
        """Mark production rolled back and point it at ``version`` (compare-and-set as
        :meth:`promote`)."""
        ...

    def reject(self, version: int, *, now: float, reason: str = "") -> ModelVersion:
        """Mark candidate ``version`` rolled back without moving production (a failed
        canary)."""
        ...

    def close(self) -> None:
        """Stop writing through this object."""
        ...
