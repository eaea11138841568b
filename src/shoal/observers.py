"""Observers: typed hooks the coordinator calls as things happen, each a no-op by default.

The progress bar, the run directory, Prometheus metrics, logs, traces and (later) the
dashboard each subclass :class:`Observer` and override what they need (they live in
:mod:`shoal.telemetry`); core code never imports them. A carrier with traffic of its own (the
gRPC server: refused calls, check-ins, bytes, active uploads) also calls the hooks of
:class:`CarrierObserver`. An observer must not raise: :class:`Observers` fans a call out to
every observer and logs (never propagates) what one of them raises, so a broken dashboard
cannot stop a round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from shoal.records import RoundRecord

__all__ = ["CarrierObserver", "Observer", "Observers", "listens"]

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
        """Clients dropped out, timed out or were cancelled (``reason``)."""

    def version_committed(self, record: RoundRecord) -> None:
        """A new version (``record`` is its :class:`~shoal.records.RoundRecord`, before
        central evaluation)."""

    def version_evaluated(self, record: RoundRecord) -> None:
        """The run's final record of a round (``record.eval`` is empty when evaluation was
        skipped). Records arrive in round order, the initial model (round 0) first; the run
        (:class:`~shoal.experiment.Experiment`) calls this, not the coordinator."""

    def round_abandoned(self, record: RoundRecord, reason: str) -> None:
        """An aggregation was abandoned; the model is unchanged."""

    def privacy_spent(self, version: int, values: Mapping[str, float]) -> None:
        """The privacy stages' report for a release (``epsilon``, ``clip_norm``, ...)."""

    def secagg_dropouts(self, version: int, stage: str, count: int) -> None:
        """Secure aggregation lost ``count`` clients at ``stage``."""

    def edge_reported(self, report: object) -> None:
        """An edge aggregator's part in one task of its tier (``report`` is a
        :class:`~shoal.hierarchy.tiers.EdgeReport`: its devices, upload, failure)."""


class CarrierObserver(Observer):
    """An observer that also hears about a carrier's own traffic, below the rounds.

    The gRPC server calls these; the simulator has no such traffic. Every one is a no-op by
    default.
    """

    def call_refused(self, reason: str) -> None:
        """A call was refused before it reached a round (``revoked``, ``rate_limited``,
        ``identity``, ...)."""

    def checked_in(self, answer: str) -> None:
        """A device checked in and was answered ``answer`` (``task``, or why not)."""

    def bytes_moved(self, direction: str, n: int) -> None:
        """``n`` payload bytes went ``direction`` (``"up"``: device to server; ``"down"``)."""

    def uploads_active(self, delta: int) -> None:
        """The number of uploads being received changed by ``delta`` (+1 on start, -1 when
        one ends however it ends)."""

    def device_step(self, device_id: str, task_id: int, step: str, seconds: float,
                    outcome: str = "") -> None:
        """Device ``device_id`` finished ``step`` of task ``task_id`` just now, after
        ``seconds`` (``checkin``, ``download``, ``upload``, ``validate``, ``fold``);
        ``outcome`` is empty when the step went through, else why not (a refusal reason)."""

    def device_done(self, device_id: str, task_id: int, outcome: str) -> None:
        """Device ``device_id``'s part in task ``task_id`` ended with ``outcome``
        (``accepted``: its update waits for the commit; else why it left the round)."""


class Observers(CarrierObserver):
    """Several observers as one; a call reaches each in order.

    A carrier hook skips observers that are plain :class:`Observer` objects.
    """

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self.observers = tuple(observers)

    def __bool__(self) -> bool:
        return bool(self.observers)


def _fan_out(name: str) -> Callable[..., None]:
    # the hook's own signature is the one its Observer method declares
    def call(self: Observers, *args: Any, **kwargs: Any) -> None:
        for obs in self.observers:
            hook = getattr(obs, name, None)
            if hook is None:
                continue
            try:
                hook(*args, **kwargs)
            except Exception:  # an observer must never stop a round
                log.exception("observer %s failed in %s", type(obs).__name__, name)
    call.__name__ = name
    call.__doc__ = getattr(CarrierObserver, name).__doc__
    return call


for _cls in (Observer, CarrierObserver):
    for _name in [n for n in vars(_cls) if not n.startswith("_")]:
        setattr(Observers, _name, _fan_out(_name))


def listens(observer: object, hook: str) -> bool:
    """Whether ``observer`` does anything on ``hook``: it has a method of that name other
    than :class:`Observer`'s and :class:`CarrierObserver`'s no-ops (for :class:`Observers`,
    one of its members does). A carrier skips preparing a call nobody takes (e.g. looking
    up a device's task under the gateway's lock only to time its step)."""
    if isinstance(observer, Observers):
        return any(listens(o, hook) for o in observer.observers)
    method = getattr(observer, hook, None)
    if method is None:
        return False
    func = getattr(method, "__func__", method)
    return func not in (getattr(Observer, hook, None), getattr(CarrierObserver, hook, None))

