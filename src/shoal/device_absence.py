"""Which selected devices are gone: the gateway's appointments with its devices.

A pull-based aggregator only hears from a device when the device calls. Every answer the
gateway gives is also an appointment: a device told to come back at ``t`` should check in by
``t``; a device given a task should upload (or check in) by the task's deadline; a device
whose upload was answered checks in again within a check-in interval. A device selected for
a task that has missed its latest appointment by more than ``grace`` seconds is *absent*:
dead, switched off, or gone from the network. Counting it as failed at once (the
coordinator's ``ClientsFailed``, reason ``"absent"``) lets the round close as soon as the
devices that are there have reported, instead of holding it until its deadline -- and a
device that never comes back, such as a killed edge aggregator, no longer costs every later
round a full deadline.

Only devices this gateway has answered are judged (a device enrolled in an earlier run and
not heard from since has no appointment here). A device that holds a task has its deadline
as its appointment -- which the coordinator already enforces -- unless the task asked it for
heartbeats (``Task.heartbeat_s``): then each beat is its next appointment, and a device that
dies holding its task is found absent before the deadline.

Sans-I/O and not thread-safe (the gateway calls it under its lock). Memory: one float per
device that has called.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["Appointments"]


class Appointments:
    """The latest time each device should be heard from by, and who has missed it.

    Args:
        grace: how late past its appointment a device may be before it is absent (> 0;
            ``0`` or ``inf``: never absent, nothing is kept).
        sweep_every: the least time between two :meth:`due_sweep` that say yes (a sweep
            looks at every selected device of the open tasks; default ``grace / 4``, so a
            device is found absent ``grace`` to ``1.25 x grace`` after its appointment).
    """

    def __init__(self, grace: float, sweep_every: float | None = None) -> None:
        if not isinstance(grace, int | float) or isinstance(grace, bool) \
                or math.isnan(grace) or grace < 0:
            raise ValueError(f"grace must be a number >= 0, got {grace!r}")
        self.grace = float(grace)
        self.enabled = 0 < self.grace < math.inf
        self.sweep_every = self.grace / 4 if sweep_every is None else float(sweep_every)
        self._due: dict[str, float] = {}
        self._next_sweep = -math.inf

    def expect(self, device_id: str, by: float) -> None:
        """``device_id`` was answered: it should be heard from again by ``by`` (``inf``: no
        appointment, e.g. a task without a deadline)."""
        if self.enabled:
            self._due[device_id] = by

    def due_sweep(self, now: float) -> bool:
        """Whether a sweep is due at ``now`` (then the next one is ``sweep_every`` later)."""
        if not self.enabled or now < self._next_sweep:
            return False
        self._next_sweep = now + self.sweep_every
        return True

    def absent(self, now: float, devices: Iterable[str]) -> list[str]:
        """Those of ``devices`` whose latest appointment is more than ``grace`` before
        ``now``, in the order given (a device never answered is not judged)."""
        if not self.enabled:
            return []
        limit = now - self.grace
        due = self._due
        return [d for d in devices if due.get(d, math.inf) < limit]
