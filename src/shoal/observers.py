"""Observers: typed hooks the coordinator calls as things happen, each a no-op by default.

The progress bar, the run directory, Prometheus metrics, logs, traces and (later) the
dashboard each subclass :class:`Observer` and override what they need; core code never
imports them. An observer must not raise: :class:`Observers` fans a call out to every
observer and logs (never propagates) what one of them raises, so a broken dashboard cannot
stop a round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

__all__ = ["Observer", "Observers"]

log = logging.getLogger("shoal.observers")


class Observer:
    """Override any of these; every one does nothing by default."""

    def task_sent(self, task_id: int, version: int, clients: int, now: float) -> None:
        """A task went to ``clients`` clients."""

    def update_accepted(self, task_id: int, clients: int, staleness: int, now: float) -> None:
        """``clients`` updates were folded into the open aggregation."""

    def update_rejected(self, task_id: int, reason: str, count: int, detail: str,
                        now: float) -> None:
        """``count`` updates were refused with ``reason`` (nothing changed)."""

    def clients_failed(self, task_id: int, clients: int, reason: str, now: float) -> None:
        """Clients dropped out, timed out or were cancelled."""

    def version_committed(self, record: object) -> None:
        """A new version (``record`` is the :class:`~shoal.coordinator.RoundRecord`)."""

    def round_abandoned(self, record: object, reason: str) -> None:
        """An aggregation was abandoned; the model is unchanged."""

    def privacy_spent(self, version: int, values: Mapping[str, float]) -> None:
        """The privacy stages' report for a release (``epsilon``, ``clip_norm``, ...)."""

    def secagg_dropouts(self, version: int, stage: str, count: int) -> None:
        """Secure aggregation lost ``count`` clients at ``stage``."""


class Observers(Observer):
    """Several observers as one; a call reaches each in order."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self.observers = tuple(observers)

    def __bool__(self) -> bool:
        return bool(self.observers)


def _fan_out(name: str):
    def call(self: Observers, *args, **kwargs) -> None:
        for obs in self.observers:
            try:
                getattr(obs, name)(*args, **kwargs)
            except Exception:  # an observer must never stop a round
                log.exception("observer %s failed in %s", type(obs).__name__, name)
    call.__name__ = name
    call.__doc__ = getattr(Observer, name).__doc__
    return call


for _name in [n for n in vars(Observer) if not n.startswith("_")]:
    setattr(Observers, _name, _fan_out(_name))
