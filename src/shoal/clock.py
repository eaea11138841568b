"""Time for the round engine: a wall clock in deployment, a simulated clock in simulation.

The coordinator never reads the time itself: every event carries it, and carriers get it
from a :class:`Clock`. A :class:`SimClock` only moves when the carrier advances it to the
next event, so a simulated hour of device traffic takes no wall time and tests never sleep
(the habit of Trio's ``MockClock``).
"""

from __future__ import annotations

import math
import time
from typing import Protocol, runtime_checkable

from shoal.errors import ConfigError

__all__ = ["Clock", "WallClock", "SimClock"]


@runtime_checkable
class Clock(Protocol):
    """Seconds as a float, never decreasing."""

    def now(self) -> float: ...


class WallClock:
    """Monotonic wall time (``time.monotonic``): deadlines survive a stepped system clock."""

    def now(self) -> float:
        return time.monotonic()


class SimClock:
    """Simulated time: starts at ``start`` and moves only by :meth:`advance_to`.

    Raises:
        ConfigError: ``start`` is not finite, or an advance would go back in time.
    """

    def __init__(self, start: float = 0.0) -> None:
        if not math.isfinite(start):
            raise ConfigError(f"SimClock start must be finite, got {start!r}", key="start")
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> None:
        """Jump to ``t`` (>= now); the simulator calls this as it pops the next event."""
        if not math.isfinite(t) or t < self._now:
            raise ConfigError(f"simulated time cannot move from {self._now} to {t!r}",
                              key="now")
        self._now = float(t)
