"""The carrier for devices that pull work: device messages in, coordinator events out.

::

    check_in / upload / secagg / tick ──▶ DeviceGateway ──▶ Coordinator.handle(event)
          (a device, at ``now``)             │  sessions        │
                                             ◀── commands ──────┘
        SendTask → open a DeviceTask (or a SecAggDeviceRound) for its devices
        CancelTask → close it (later uploads are "late") · WakeAt → a timer for tick()
        UpdateRefused → the refused device's answer
        CommitVersion · AbortRound · Finished → the backlog, carried out by carry_out()
        SendEval → open an EvalSession · EvalDone → the results, for take_evaluations()

:class:`DeviceGateway` has no round rule of its own: the coordinator's policy decides when a
task opens and closes and whether it commits, its pipeline judges every update. The gateway
keeps one session per task (:class:`~shoal.device_task.DeviceTask`: who was asked, their
keys, their answers; kept in a :class:`~shoal.device_sessions.SessionBook`), bounds each
update's weight (:class:`~shoal.device_weights.WeightCap`), turns an authenticated upload
into an ``UpdatesArrived`` event and
answers the device with the coordinator's verdict, at once. Secure-aggregation tasks run the
SecAgg+ machine (:class:`~shoal.device_secagg.SecAggDeviceRound`) as their session; its
unmasked sum reaches the coordinator as one :class:`~shoal.events.PartialAggregate`.

Evaluation tasks (:meth:`DeviceGateway.evaluate`, the coordinator's second task kind) run as
:class:`~shoal.device_eval.EvalSession` (the gateway's evaluation calls are
:class:`~shoal.device_eval.EvalDesk`): a device is offered one only if it can evaluate
and is served the version to evaluate (else the coordinator hears ``ClientsFailed``); its
report becomes an ``EvalReported`` whose segment is what the carrier says (the attribute the
device declared at Hello, never the report's), and a device that declines its task
(:meth:`DeviceGateway.decline`, e.g. a model whose signature failed) becomes
``ClientsFailed``. :meth:`DeviceGateway.serve` serves evaluation tasks alone, for a
coordinator that does not train (a canary after training).

The gRPC aggregator (:mod:`shoal.transport.server`) calls it from its handlers, and tests
call it directly with scripted devices (the in-memory transport): the same code commits the
same versions either way. It reads no clock (every call takes ``now``) and opens no socket.

Threads: every method takes the gateway's lock, so handlers may call it concurrently. The
commands that do I/O (persisting and evaluating a version, the run's end) and every command
after them are queued in order and carried out by :meth:`carry_out` *outside* the lock, by
one driving thread (:meth:`run`): a new task opens only after the version it trains is
persisted, while devices keep being answered. That driving half -- the commands, the backlog,
the timers of :meth:`tick` and the loop -- is :class:`~shoal.device_commands.CommandDesk`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from shoal.coordinator import Coordinator
from shoal.device_absence import Appointments
from shoal.device_ckks import CkksDeviceRound, CkksSetup
from shoal.device_commands import SECURE_SESSIONS, CommandDesk
from shoal.device_secagg import SecAggDeviceRound
from shoal.device_eval import EvalDesk, EvalSession
from shoal.device_secure import SecureDesk
from shoal.device_sessions import GatewaySettings, Outcome, Session, SessionBook, is_closed
from shoal.device_task import (PACE_WINDOW, ComeBack, DeviceTask, Task, TaskRefused,
                               UploadResult, paced)
from shoal.device_weights import WeightCap
from shoal.errors import ProtocolError, UpdateRejected
from shoal.evaluation import EvalResult
from shoal.observers import CarrierObserver, Observer
from shoal.events import ClientsFailed, ClientUpdate, Command, UpdateRefused, UpdatesArrived
from shoal.strategy import ServerState

if TYPE_CHECKING:  # annotation only: the caller builds the secure rule (and loads its module)
    from shoal.privacy.secagg_rounds import SecAggAggregation

__all__ = ["DeviceGateway", "GatewaySettings", "Outcome"]

log = logging.getLogger("shoal.aggregator")


class DeviceGateway(CommandDesk, EvalDesk, SecureDesk):
    """Devices behind a coordinator (see the module docstring).

    Args:
        devices: the device ids the coordinator's client ids index (sorted here).
        dim: the model length.
        settings: pacing and secure-aggregation timing.
        secure: the run's :class:`~shoal.privacy.secagg_rounds.SecAggAggregation` to run
            every task as a secure-aggregation round, its
            :class:`~shoal.device_ckks.CkksSetup` to run every task as a CKKS round, or
            ``None``.
        rng: jitter of come-back times (not security-relevant).
        observer: told about uploads the sessions refuse before they reach the
            coordinator (the coordinator tells its own observers about the rest).
        on_progress: called (under the lock) when a secure-aggregation stage advanced, so
            the carrier can wake devices waiting on a long poll.
        on_publish: called with ``(version, params)`` (under the lock) when a task trains
            from a version no earlier task did: make it downloadable.
        weights: bounds the weight of each device's update (its claimed example count);
            ``None``: claims are weighed as they are (the pipeline's validation still
            refuses absurd ones).
        serves: ``serves(device)`` -> the model-store version the device is served
            (``None``: nothing); an evaluation task is offered only to devices served its
            version. Without it no device is offered one.
    """

    def __init__(self, devices: Sequence[str], dim: int,
                 settings: GatewaySettings = GatewaySettings(), *,
                 secure: SecAggAggregation | CkksSetup | None = None,
                 rng: np.random.Generator | None = None,
                 observer: Observer | None = None,
                 on_progress: Callable[[], None] | None = None,
                 on_publish: Callable[[int, np.ndarray], None] | None = None,
                 weights: WeightCap | None = None,
                 serves: Callable[[str], int | None] | None = None) -> None:
        self.weights = weights
        self.serves = serves
        self._evaluated: list[EvalResult] = []
        self._trains = False  # started (training), not only serving evaluations
        self.observer = observer if observer is not None else Observer()
        self.on_progress = on_progress
        self.on_publish = on_publish
        self.devices = tuple(sorted(devices))
        self.dim = int(dim)
        self.settings = settings
        self.secure = secure
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.coordinator: Coordinator | None = None
        self._rng = rng if rng is not None else np.random.default_rng()
        self.sessions = SessionBook()  # one per task: open, and the last few closed
        # when each device should next be heard from; selected ones long past it are absent
        self.appointments = Appointments(settings.absent_after_s)
        self._timers: list[float] = []
        self._backlog: deque[Command] = deque()
        self._io_busy = False
        self._served = 0  # download bytes not yet reported to the coordinator
        self._fed: set[int] = set()  # secure tasks whose result reached the coordinator
        self._received: Counter[int] = Counter()  # secure task -> bytes received
        self.finished = ""
        self.rejections: Counter[str] = Counter()

    @property
    def num_clients(self) -> int:
        return len(self.devices)

    @property
    def aggregates_securely(self) -> bool:
        return self.secure is not None

    @property
    def ckks(self) -> CkksSetup | None:
        """The run's CKKS setup when its tasks are CKKS rounds."""
        return self.secure if isinstance(self.secure, CkksSetup) else None

    # -- starting and queries ------------------------------------------------------------------

    def start(self, coordinator: Coordinator, state: ServerState, now: float,
              stage_states: tuple | None = None) -> None:
        """Start ``coordinator`` from ``state``; its first task opens (or is queued behind
        the backlog)."""
        with self.changed:
            if self.coordinator is not None:
                raise ProtocolError("the gateway already serves a coordinator")
            self.coordinator, self._trains = coordinator, True
            self._carry(coordinator.start(state, now, stage_states), now)

    def _running(self) -> Coordinator:
        """The coordinator being served.

        Raises:
            ProtocolError: the gateway was not started.
        """
        if self.coordinator is None:
            raise ProtocolError("the gateway serves no coordinator yet: start it first")
        return self.coordinator

    def params(self, version: int) -> np.ndarray | None:
        """The model ``version`` while a task trains from it (else ``None``)."""
        with self.lock:
            return self.sessions.params(version)

    @property
    def latest_version(self) -> int | None:
        with self.lock:
            return self.sessions.latest_version

    def session(self, task_id: int) -> Session | None:
        with self.lock:
            return self.sessions.get(task_id)

    def take_outcomes(self) -> list[Outcome]:
        """The outcomes recorded since the last call (write them to the registry outside the
        gateway's lock)."""
        with self.lock:
            return self.sessions.take_outcomes()

    # -- device calls --------------------------------------------------------------------------

    def paced(self, now: float) -> float:
        """When a device no open task needs should come back: within 0.5-1.5 x
        ``checkin_interval_s`` of ``now``, uniformly (pace steering)."""
        return paced(now, self.settings.checkin_interval_s, self._rng)

    def check_in(self, device_id: str, now: float, *, clips: bool = True,
                 evaluates: bool = False, heartbeat_s: float = 0.0
                 ) -> tuple[Task | ComeBack, str, dict[str, float]]:
        """A device asks for work: ``(decision, kind, settings)``; kind ``"train"``,
        ``"secagg"`` or ``"evaluate"``, settings the task's client settings.

        ``clips``: whether the device's runtime clips its update to ``Task.clip_norm``;
        ``evaluates``: whether it answers evaluation tasks; ``heartbeat_s``: how often it
        will call :meth:`heartbeat` if given a training task (0: it will not, its task's
        deadline is its appointment). A device selected for an
        evaluation task it cannot do (it does not evaluate, or is not served the version)
        is told to come back with that reason (``cannot_evaluate``, ``not_served``) and the
        coordinator stops waiting for it.

        Raises:
            TaskRefused: ``runtime_too_old``: the device was selected for a task that asks
                for clipping and ``clips`` is false. The coordinator is told the client
                failed (the round does not wait for it); nothing else changes.
        """
        with self.changed:
            decision, kind, settings = self._check_in(device_id, now, clips, evaluates)
            # an appointment: the device should check in by its come-back time, heartbeat
            # within heartbeat_s, or upload (or check in) by its task's deadline
            self.appointments.expect(
                device_id, decision.at if isinstance(decision, ComeBack)
                else now + heartbeat_s if kind == "train" and heartbeat_s > 0
                else decision.deadline)
            return decision, kind, settings

    def _check_in(self, device_id: str, now: float, clips: bool, evaluates: bool
                  ) -> tuple[Task | ComeBack, str, dict[str, float]]:
        """:meth:`check_in` without the appointment (the lock held)."""
        s = self.sessions.current(device_id)
        if self.finished or s is None or (is_closed(s) and self.sessions.any_open()):
            return self._pace_out(now), "train", {}
        if s.clip_norm is not None and not clips and device_id in s.selected \
                and not is_closed(s):
            self._refuse_runtime(s, device_id, now)
        if isinstance(s, EvalSession):
            unfit = self._unfit_for_evaluation(s, device_id, evaluates, self.paced(now), now)
            if unfit is not None:
                return unfit, "evaluate", {}
        # a device this task does not need is paced as every other (paced()); one that
        # finds it closed comes back within idle_retry_s (the sessions' settings)
        decision = s.check_in(device_id, now, rng=self._rng)
        kind = "secagg" if isinstance(s, SecAggDeviceRound) else \
            "ckks" if isinstance(s, CkksDeviceRound) else \
            "evaluate" if isinstance(s, EvalSession) else "train"
        return decision, kind, self.sessions.settings(s.task_id)

    def upload(self, device_id: str, round: int, base_version: int, upload_key: str,
               num_examples: int, delta: np.ndarray, now: float, *,
               metrics: dict[str, float] | None = None, upload_bytes: int = 0,
               fingerprint: bytes | None = None) -> UploadResult:
        """A device's update: authenticated by its task's session, judged by the coordinator
        (validation, staleness, whether the round still takes it), answered at once.

        ``upload_bytes`` is what the carrier measured on the wire (a device's own claims
        are never trusted for accounting); ``fingerprint`` the payload's digest the carrier
        verified (see :meth:`DeviceTask.admit`). The update's weight is its claimed example count
        bounded by :attr:`weights`. An upload for an earlier round than the device's
        current task (a retry after a lost reply) is answered by that round's session while
        it is kept (the last few tasks): its original acceptance, or its refusal.

        Raises:
            UpdateRejected: with the session's or the coordinator's reason; nothing changed.
        """
        with self.changed:
            # the device is there: after its answer it checks in again, no later than a
            # paced device would (the next task)
            self.appointments.expect(
                device_id, now + PACE_WINDOW[1] * self.settings.checkin_interval_s)
            s = self.sessions.answering(device_id, round)
            if s is None:
                raise self._count(UpdateRejected("not_selected", "the device has no task",
                                                 client_id=device_id, round=round), -1, now)
            if isinstance(s, SECURE_SESSIONS):
                raise self._count(UpdateRejected(
                    "wrong_task", "this round aggregates securely: send the masked input "
                    "with the SecAgg call, or the ciphertexts of a CKKS round",
                    client_id=device_id, round=round), s.task_id, now)
            started = time.perf_counter()
            try:
                admitted = s.admit(device_id, round, base_version, upload_key, num_examples,
                                   delta, now, metrics=metrics, fingerprint=fingerprint)
            except UpdateRejected as exc:
                self._step(device_id, s.task_id, "validate", started, exc.reason)
                if exc.reason != "duplicate":  # a duplicate's first answer is on record
                    self._outcome(device_id, s, "late" if exc.reason == "late"
                                  else f"rejected:{exc.reason}", now)
                raise self._count(exc, s.task_id, now)
            if isinstance(admitted, UploadResult):
                return admitted  # an idempotent retry: answered as before, counted once
            started = self._step(device_id, s.task_id, "validate", started)
            measured = dict(admitted.metrics)
            measured.pop("download_bytes", None)
            measured["upload_bytes"] = float(upload_bytes)
            if self._served:
                measured["download_bytes"], self._served = float(self._served), 0
            claimed = admitted.num_examples
            weight = claimed  # anything but a count is the pipeline's to refuse (bad_weight)
            if self.weights is not None and isinstance(claimed, int | np.integer) \
                    and not isinstance(claimed, bool):
                weight = self.weights.weigh(int(claimed))
            update = ClientUpdate(admitted.client_id, admitted.delta, weight, measured,
                                  admitted.base_version)
            cmds = self._running().handle(UpdatesArrived(s.task_id, update, now))
            refusal = next((c for c in cmds if isinstance(c, UpdateRefused)
                            and c.task_id == s.task_id and update.client_id in c.client_ids),
                           None)
            # the coordinator's pipeline judges the update's values and folds it
            self._step(device_id, s.task_id, "fold", started,
                       refusal.reason if refusal is not None else "")
            if refusal is not None:
                error = s.refuse(device_id, refusal.reason, refusal.detail)
                self._outcome(device_id, s, "late" if refusal.reason == "late"
                              else f"rejected:{refusal.reason}", now)
                self._carry(cmds, now)
                self._settle(now, [s])
                self.rejections[error.reason] += 1  # the coordinator told its observers
                raise error
            receipt = s.accept(device_id, admitted, now,  # the claim, for retries
                               fingerprint=fingerprint)
            if self.weights is not None:
                self.weights.note(device_id, int(claimed))
            self._outcome(device_id, s, "accepted", now)
            self._carry(cmds, now)  # wakes the driver when there is work for it
            self._settle(now, [s])
            return receipt

    def after_upload(self, device_id: str, round: int, now: float) -> ComeBack | None:
        """When a device whose update for ``round`` was just accepted should check in again:
        what a check-in at ``now`` would answer it, so that the upload's reply saves it that
        call (pace steering). ``None`` if a newer task selected it meanwhile (it should check
        in at once). The time is also its appointment (:mod:`shoal.device_absence`)."""
        with self.changed:
            s = self.sessions.current(device_id)
            if s is not None and not is_closed(s) and not (
                    s is self.sessions.answering(device_id, round)
                    and isinstance(s, DeviceTask) and s.reported(device_id)):
                return None  # a task waits for it (a newer one, or its round's retry)
            # as _check_in's answer to a device whose task has its update (never a task:
            # the session has its update, or is closed)
            decision: Task | ComeBack
            if self.finished or s is None or (is_closed(s) and self.sessions.any_open()):
                decision = self._pace_out(now)
            else:  # already_reported (paced), or round_closed
                decision = s.check_in(device_id, now, rng=self._rng)
            if not isinstance(decision, ComeBack):
                return None
            self.appointments.expect(device_id, decision.at)
            return decision

    def _pace_out(self, now: float) -> ComeBack:
        """The answer to a device no task needs (the lock held): come back paced while a task
        is open (:meth:`paced`), within ``idle_retry_s`` while none is."""
        if not self.finished and self.sessions.any_open():
            return ComeBack(self.paced(now), "not_selected")
        return ComeBack(now + float(self._rng.uniform(0, self.settings.idle_retry_s)),
                        "no_round")

    def _refuse_runtime(self, s: Session, device_id: str, now: float) -> None:
        """Refuse ``device_id`` the clipping task ``s`` (its runtime does not clip); the
        coordinator stops waiting for it (once)."""
        if self.sessions.unfit(s, device_id):
            self.sessions.record(device_id, s, "rejected:runtime_too_old", now)
            if isinstance(s, DeviceTask):
                cid = s.client_id(device_id)
                self._carry(self._running().handle(
                    ClientsFailed(s.task_id, (cid,), "runtime_too_old", now)), now)
                self._settle(now, [s])
        raise TaskRefused("runtime_too_old", f"this task asks devices to clip their update "
                          f"to an L2 norm of {s.clip_norm:g} before sending it (central "
                          f"differential privacy), which this device's runtime does not "
                          f"declare it does: update it to shoal-client/3 or later")

    def heartbeat(self, device_id: str, round: int, now: float, *, every: float = 0.0
                  ) -> bool:
        """Whether the device's task is still open (a device may stop training if not).
        ``every`` > 0: the device heartbeats that often during its training task, so its
        next appointment is ``now + every``."""
        with self.lock:
            s = self.sessions.current(device_id)
            if s is None or s.round != round:
                return False
            if isinstance(s, SECURE_SESSIONS):
                return not s.status().done
            keep = s.is_open(now)
            if keep and every > 0 and not isinstance(s, EvalSession):
                self.appointments.expect(device_id, now + every)
            return keep

    def served(self, nbytes: int) -> None:
        """Count ``nbytes`` sent to devices (model downloads, secure-aggregation replies);
        reported with the next update to reach the coordinator."""
        with self.lock:
            self._served += int(nbytes)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _outcome(self, device_id: str, s: Session, outcome: str, now: float) -> None:
        self.sessions.record(device_id, s, outcome, now)
        if isinstance(self.observer, CarrierObserver):
            self.observer.device_done(device_id, s.task_id, outcome)

    def _step(self, device_id: str, task_id: int, step: str, started: float,
              outcome: str = "") -> float:
        """Tell a carrier observer that ``device_id`` finished ``step`` (begun at
        ``started``, a ``time.perf_counter()``); returns the time it ended."""
        ended = time.perf_counter()
        if isinstance(self.observer, CarrierObserver):
            self.observer.device_step(device_id, task_id, step, ended - started, outcome)
        return ended

    def task_of(self, device_id: str, round: int | None = None) -> int | None:
        """The task a message from ``device_id`` (for ``round``: an upload's) belongs to,
        if it has one: for tracing a device's calls."""
        with self.changed:
            s = self.sessions.current(device_id) if round is None else \
                self.sessions.answering(device_id, round)
            return None if s is None else s.task_id

    def _count(self, exc: UpdateRejected, task_id: int, now: float) -> UpdateRejected:
        self.rejections[exc.reason] += 1
        self.observer.update_rejected(task_id, exc.reason, 1, exc.detail, now)
        return exc

