"""The coordinator's commands carried out at the device gateway, and the loop that drives it.

The driving half of :class:`~shoal.gateway.DeviceGateway` (a mixin, like
:class:`~shoal.device_eval.EvalDesk` and :class:`~shoal.device_secure.SecureDesk`):

* :meth:`CommandDesk._carry` takes the commands a coordinator call returned: ``SendTask``
  opens a session (:meth:`SessionBook.open <shoal.device_sessions.SessionBook.open>`),
  ``CancelTask`` closes one, ``WakeAt`` sets a timer for :meth:`~CommandDesk.tick`,
  ``SendEval``/``EvalDone`` go to the evaluation desk -- at once, under the lock. The commands
  that do I/O (``CommitVersion``, ``AbortRound``, ``Finished``) and every command after them
  are queued in order (the backlog);
* :meth:`~CommandDesk.carry_out` empties the backlog from one driving thread, the I/O
  *outside* the lock, so devices keep being answered while a version is persisted and a new
  task opens only after the version it trains is;
* :meth:`~CommandDesk.run` is that thread's loop: carry out the backlog, wait for a device
  call or the next timer (:meth:`~CommandDesk.next_wake`), :meth:`~CommandDesk.tick`;
  :meth:`~CommandDesk.stop` ends it from any thread;
* a plain session whose task the coordinator no longer waits for is closed
  (:meth:`~CommandDesk._settle`), and every session closes when the run finishes.

Sans-I/O: every call takes ``now`` (or the caller's clock); it uses the gateway's lock,
sessions and coordinator, and every public method takes the gateway's lock.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from shoal.coordinator import Coordinator
from shoal.device_absence import Appointments
from shoal.device_ckks import CkksDeviceRound, CkksSetup
from shoal.device_eval import EvalSession
from shoal.device_secagg import SecAggDeviceRound
from shoal.device_sessions import GatewaySettings, Session, SessionBook, is_closed
from shoal.device_task import DeviceTask
from shoal.device_weights import WeightCap
from shoal.events import (AbortRound, CancelTask, Command, CommitVersion, Finished, SendTask,
                          Tick, WakeAt)
from shoal.records import RoundRecord
from shoal.strategy import ServerState

if TYPE_CHECKING:  # annotation only: the caller builds the secure rule (and loads its module)
    from shoal.privacy.secagg_rounds import SecAggAggregation

__all__ = ["CommandDesk", "SECURE_SESSIONS"]

_IO = (CommitVersion, AbortRound, Finished)
SECURE_SESSIONS = (SecAggDeviceRound, CkksDeviceRound)  # sessions that aggregate themselves


class CommandDesk:
    """The gateway's command execution and driving loop (see the module docstring)."""

    # provided by DeviceGateway
    lock: threading.RLock
    changed: threading.Condition
    coordinator: Coordinator | None
    devices: tuple[str, ...]
    dim: int
    settings: GatewaySettings
    secure: SecAggAggregation | CkksSetup | None
    weights: WeightCap | None
    on_progress: Callable[[], None] | None
    on_publish: Callable[[int, np.ndarray], None] | None
    sessions: SessionBook
    finished: str
    _trains: bool
    _timers: list[float]
    _backlog: deque[Command]
    _io_busy: bool
    _fed: set[int]
    _running: Callable[[], Coordinator]
    start: Callable[[Coordinator, ServerState, float, tuple | None], None]
    _outcome: Callable[[str, Session, str, float], None]
    _secure_done: Callable[[int, SecAggDeviceRound | CkksDeviceRound, float], None]
    _evaluating: Callable[[], bool]
    _execute_eval: Callable[[Command], bool]
    _drop: Callable[[DeviceTask, str, str, float], None]
    appointments: Appointments

    # -- driving -------------------------------------------------------------------------------

    def run(self, coordinator: Coordinator, state: ServerState, now: Callable[[], float], *,
            stage_states: tuple | None = None,
            on_commit: Callable[[ServerState, RoundRecord], None] | None = None,
            on_abort: Callable[[RoundRecord, str, bool], None] | None = None,
            poll_s: float = 0.2, after_each: Callable[[], None] | None = None) -> str:
        """Serve ``coordinator`` from ``state`` until it finishes (the driving thread's loop:
        carry out the backlog, wait for device calls or the next timer, tick). ``now`` is the
        clock the devices' deadlines are on; ``after_each`` runs after every pass (outside
        the lock: e.g. write outcomes to the registry). Returns why the run finished."""
        self.start(coordinator, state, now(), stage_states)
        return self._drive(now, lambda: False, on_commit, on_abort, poll_s, after_each)

    def carry_out(self, now: Callable[[], float],
                  on_commit: Callable[[ServerState, RoundRecord], None] | None = None,
                  on_abort: Callable[[RoundRecord, str, bool], None] | None = None) -> str:
        """Carry out the backlog in order -- the I/O commands outside the lock -- until it is
        empty; returns why the run finished, or ``""`` while it runs. One thread only (the
        driver)."""
        while True:
            with self.changed:
                if not self._backlog:
                    return self.finished
                cmd = self._backlog.popleft()
                if not isinstance(cmd, _IO):
                    self._execute(cmd, now())
                    continue
                self._io_busy = True
            try:
                if isinstance(cmd, CommitVersion) and on_commit is not None:
                    on_commit(cmd.state, cmd.record)
                elif isinstance(cmd, AbortRound) and on_abort is not None:
                    on_abort(cmd.record, cmd.reason, cmd.retry)
            finally:
                with self.changed:
                    self._io_busy = False
                    if isinstance(cmd, Finished):
                        self._finish(cmd.reason)
                    self.changed.notify_all()

    def _drive(self, now: Callable[[], float], until: Callable[[], bool],
               on_commit: Callable[[ServerState, RoundRecord], None] | None,
               on_abort: Callable[[RoundRecord, str, bool], None] | None,
               poll_s: float, after_each: Callable[[], None] | None) -> str:
        try:
            while True:
                reason = self.carry_out(now, on_commit, on_abort)
                if reason:
                    return reason
                with self.changed:
                    if not self._backlog:
                        wake = self.next_wake()
                        wait = poll_s if wake is None else min(poll_s, max(0.0, wake - now()))
                        self.changed.wait(wait)
                self.tick(now())
                if after_each is not None:
                    after_each()
                if until():
                    return "done"
        finally:
            with self.changed:
                if not self.finished:
                    self._finish("the carrier stopped")

    def stop(self, reason: str) -> None:
        """End the run now (thread-safe): the driving thread's :meth:`run` returns
        ``reason`` once the command it is carrying out (if any) is done; the backlog is
        dropped, sessions close, devices are told to come back later."""
        with self.changed:
            self._backlog.clear()
            if not self.finished:
                self._finish(reason)
            self.changed.notify_all()

    # -- time ----------------------------------------------------------------------------------

    def next_wake(self) -> float | None:
        """When :meth:`tick` next has something to do (a coordinator timer or a secure
        stage's deadline), or ``None``."""
        with self.lock:
            times = list(self._timers[:1])
            for s in self.sessions.all():
                if isinstance(s, SECURE_SESSIONS) and not s.status().done:
                    times.append(s.roster_deadline if s.phase == "roster" else s.stage_deadline)
            return min(times) if times else None

    def tick(self, now: float) -> None:
        """Let time pass: run due coordinator timers and secure-aggregation stages, and
        count absent devices failed."""
        with self.changed:
            if self.coordinator is None:
                return
            progressed = False
            for s in self.sessions.all():
                if isinstance(s, SECURE_SESSIONS) and s.task_id not in self._fed:
                    progressed |= s.tick(now)
                    if s.status().done:
                        self._secure_done(s.task_id, s, now)
            progressed |= self._drop_absent(now)
            due = False
            while self._timers and self._timers[0] <= now:
                heapq.heappop(self._timers)
                due = True
            # a coordinator served only for evaluation takes time while an evaluation is open
            if due and (self._trains or self._evaluating()):
                self._carry(self.coordinator.handle(Tick(now)), now)
                self._settle(now)
            if progressed or due:
                self.changed.notify_all()
            if progressed and self.on_progress is not None:
                self.on_progress()

    def _drop_absent(self, now: float) -> bool:
        """Count as failed (``absent``) the devices of the open training tasks that have
        missed their appointment (:class:`~shoal.device_absence.Appointments`: waiting for
        their task, or holding it without the heartbeats it asked for), at most every
        ``sweep_every``; returns whether any was."""
        if not self.appointments.due_sweep(now):
            return False
        gone = [(s, d) for s in self.sessions.all()
                if isinstance(s, DeviceTask) and not isinstance(s, EvalSession)
                and not s.closed
                # a task holder only before its deadline: after it, the coordinator's
                # timeout decides (it is "late"), absent or not
                for d in self.appointments.absent(
                    now, s.devices_with("waiting")
                    + (s.devices_with("tasked") if now < s.deadline else ()))]
        for s, d in gone:
            if not s.closed:  # an earlier drop may have ended the task
                self._drop(s, d, "absent", now)
        return bool(gone)

    # -- commands ------------------------------------------------------------------------------

    def _carry(self, cmds: list[Command], now: float) -> None:
        for cmd in cmds:
            if self._backlog or self._io_busy or isinstance(cmd, _IO):
                self._backlog.append(cmd)
            else:
                self._execute(cmd, now)
        if self._backlog:
            self.changed.notify_all()

    def _execute(self, cmd: Command, now: float) -> None:
        if isinstance(cmd, SendTask):
            self._open(cmd, now)
        elif isinstance(cmd, CancelTask):
            s = self.sessions.get(cmd.task_id)
            if s is not None:
                self._close(s, cmd.reason, now)
        elif isinstance(cmd, WakeAt):
            if math.isfinite(cmd.at):
                heapq.heappush(self._timers, cmd.at)
        else:
            self._execute_eval(cmd)

    def _open(self, cmd: SendTask, now: float) -> None:
        if self.weights is not None:
            self.weights.refresh()  # one cap for every update of the task
        selected = [self.devices[int(c)] for c in cmd.client_ids]
        policy = self._running().policy
        target = min(getattr(policy, "target", None) or len(selected), len(selected))
        least = policy.min_accepted() if hasattr(policy, "min_accepted") else 1
        if self.sessions.open(cmd.task, selected, [int(c) for c in cmd.client_ids], now,
                              self.settings, secure=self.secure, dim=self.dim, target=target,
                              min_accepted=max(1, min(least, target))) \
                and self.on_publish is not None:
            self.on_publish(cmd.task.version, cmd.task.params)

    def _close(self, s: Session, reason: str, now: float) -> None:
        if isinstance(s, SECURE_SESSIONS):
            s.close(reason)
            self._fed.add(s.task_id)
            return
        if not isinstance(s, EvalSession):  # evaluation is not participation
            for d in s.devices_with("tasked"):
                self._outcome(d, s, "late", now)
        s.close(reason)

    def _settle(self, now: float, sessions: Sequence[DeviceTask] | None = None) -> None:
        """Close the plain sessions (of ``sessions``, default all) whose task the
        coordinator no longer waits for.

        The coordinator sends ``CancelTask`` only for a task with clients still pending;
        one whose clients all reported, failed or timed out (a round closed by its
        deadline or with everyone in, a FedBuff task) simply ends. Its session must end
        too: otherwise it counts as open forever, keeps its model version in memory, and
        its dropouts are never recorded.
        """
        coordinator = self._running()
        for s in self.sessions.all() if sessions is None else sessions:
            if isinstance(s, DeviceTask) and not isinstance(s, EvalSession) and not s.closed \
                    and not coordinator.outstanding(s.task_id):
                self._close(s, "task over", now)

    def _finish(self, reason: str) -> None:
        self.finished = reason
        for s in self.sessions.all():
            if not is_closed(s):
                s.close(f"run finished: {reason}")
