"""A device's heartbeats while it carries out a task (``Task.heartbeat_s``).

A device training for minutes is silent to a pull-based aggregator until it uploads: if it
dies meanwhile, the round can only find out at its deadline. A task may therefore ask the
device to call ``Heartbeat`` at least every ``heartbeat_s`` seconds; the aggregator counts a
device that falls silent for longer (plus its grace, ``deploy.absent_after_s``) as absent.

:class:`Heartbeats` is the device side: a daemon thread that calls ``Heartbeat`` every
``interval`` until the block it guards ends. A failed call is not retried (the next one is
due soon) and never stops the task; the aggregator's answer (``keep_going``) is kept for the
runtime to read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

__all__ = ["Heartbeats"]


class Heartbeats:
    """``beat()`` every ``interval`` seconds on a thread of its own, from entering the
    ``with`` block until it ends (``interval <= 0``: never; the block just runs).

    Args:
        beat: one heartbeat call; returns whether the task is still open. Any exception it
            raises is logged at DEBUG and the beating goes on.
        interval: seconds between calls (the first one ``interval`` after entering).
        log: where failed calls go.
    """

    def __init__(self, beat: Callable[[], bool], interval: float,
                 log: logging.Logger | None = None) -> None:
        self._beat, self.interval = beat, float(interval)
        self._log = log or logging.getLogger("shoal.client")
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        #: the aggregator's last answer: ``False`` once it said the task is over
        self.keep_going = True

    def __enter__(self) -> Heartbeats:
        if self.interval > 0:
            self._thread = threading.Thread(target=self._run, name="shoal-heartbeat",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, self.interval))

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.keep_going = bool(self._beat())
                self.sent += 1
            except Exception as exc:  # noqa: BLE001 -- the next beat is due soon
                self._log.debug("heartbeat failed: %s", exc)
