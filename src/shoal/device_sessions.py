"""The sessions a device gateway keeps: one per coordinator task, and what the devices did.

:class:`SessionBook` is the bookkeeping half of :class:`~shoal.gateway.DeviceGateway`: the
open and recently closed sessions (a :class:`~shoal.device_task.DeviceTask`, or a
:class:`~shoal.device_secagg.SecAggDeviceRound` under secure aggregation), which task each
device was last given, the model versions and client settings tasks train with, and the
:class:`Outcome` of each device for the registry. It answers the lookups a device's call
needs -- including the session of an *earlier* round, so that a retry arriving after its
round closed is answered by the session that judged it -- and forgets all but the last
``keep_closed`` closed sessions.

Evaluation tasks (federated evaluation, :class:`~shoal.events.EvalTask`) have a session of
their own, :class:`EvalSession`: who was asked, the key each was given, who reported. Its
model is the one the device is *served* (a model-store version fetched with ``GetModel``), so
a device can only ever evaluate what it may hold -- a canary's candidate inside the canary,
production outside it. An evaluation task sent to a device becomes the task its check-ins
answer (until a later task replaces it); uploads of a training task it still runs are
answered by that task's session, as for any earlier task.

Sans-I/O and not thread-safe: the gateway calls it under its lock.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from shoal.device_secagg import SecAggDeviceRound
from shoal.device_task import ComeBack, DeviceTask
from shoal.errors import UpdateRejected
from shoal.evaluation import EvalResult
from shoal.events import (ClientsFailed, Command, EvalReported, EvalReports, EvalTask,
                          SendEval, TrainTask, UpdateRefused)

if TYPE_CHECKING:  # annotation only: the caller builds the secure rule (and loads its module)
    from shoal.coordinator import Coordinator
    from shoal.privacy.secagg_rounds import SecAggAggregation

__all__ = ["DECLINE_REASONS", "EvalDesk", "EvalSession", "GatewaySettings", "MAX_EXAMPLES",
           "Outcome", "Session", "SessionBook", "is_closed"]

#: The most held-out examples one evaluation report may claim (its weight).
MAX_EXAMPLES = 10**9
#: Why a device may decline its task (``Decline``): the model or plan it was sent failed
#: its signature check, it could not download it, it cannot evaluate, it is not served the
#: model it was asked to evaluate, or its evaluation failed.
DECLINE_REASONS = ("signature_rejected", "download_failed", "cannot_evaluate", "not_served",
                   "evaluation_failed")


class EvalSession(DeviceTask):
    """One evaluation task as the devices it was sent to see it.

    A device checks in and gets a :class:`~shoal.device_task.Task` (kind ``"evaluate"``,
    its ``round`` the task id, its ``model_version`` the served store version, a one-time
    key); its report must name the task, the version and the key. Report checks, in order:
    those of :meth:`~shoal.device_task.DeviceTask.authenticate` (``not_selected``,
    ``wrong_round``, ``stale``, ``bad_key``), then an idempotent retry (the same report
    again is answered as before; a different one is ``duplicate``), ``late``, ``bad_weight``
    (the example count is not an int in ``[0, MAX_EXAMPLES]``) and ``bad_metrics`` (none, or
    what :meth:`~shoal.device_task.DeviceTask.admit` refuses in an upload's metrics). A
    refused report changes nothing.

    Args:
        task: the coordinator's evaluation task.
        selected, client_ids: the devices asked and their client ids.
        pace_spread_s, retry_spread_s: as for :class:`~shoal.device_task.DeviceTask`.
    """

    kind = "evaluate"

    def __init__(self, task: EvalTask, selected: Sequence[str], client_ids: Sequence[int],
                 *, pace_spread_s: float, retry_spread_s: float) -> None:
        super().__init__(task.task_id, task.task_id, task.version, selected,
                         client_ids=client_ids, deadline=task.deadline,
                         pace_spread_s=pace_spread_s, retry_spread_s=retry_spread_s)
        self.purpose = task.purpose
        self._reports: dict[str, bytes] = {}  # device -> fingerprint of its taken report

    def admit_report(self, device_id: str, model_version: int, upload_key: str,
                     num_examples: int, metrics: Mapping[str, float], now: float
                     ) -> tuple[int, Mapping[str, float]] | None:
        """Check a report; returns ``(client id, metrics)`` to hand the coordinator, or
        ``None`` for a retry of a report already taken.

        Raises:
            UpdateRejected: with the reason; the session is unchanged.
        """
        self.authenticate(device_id, self.round, model_version, upload_key)
        digest = _report_digest(num_examples, metrics)
        if device_id in self._reports:
            if self._reports[device_id] == digest:
                return None
            raise self._reject("duplicate", "this device already reported for this "
                               "evaluation task; this report differs", device_id)
        if not self.is_open(now):
            raise self._reject("late", f"the evaluation task closed "
                               f"({self.closed or 'deadline passed'})", device_id)
        if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer) \
                or not 0 <= num_examples <= MAX_EXAMPLES:
            raise self._reject("bad_weight", f"num_examples must be an int in [0, "
                               f"{MAX_EXAMPLES}], got {num_examples!r}", device_id)
        clean = self._check_metrics(metrics, device_id)
        if not clean:
            raise self._reject("bad_metrics", "an evaluation report carries at least one "
                               "metric", device_id)
        return self.client_id(device_id), clean

    def take_report(self, device_id: str, num_examples: int, metrics: Mapping[str, float]
                    ) -> None:
        """The coordinator took the device's report: later check-ins are answered
        ``already_reported``, the same report again is answered as taken."""
        self._reports[device_id] = _report_digest(num_examples, metrics)
        self.answered(device_id)



def _report_digest(num_examples: object, metrics: Mapping[str, float]) -> bytes:
    try:
        text = json.dumps([repr(num_examples), sorted((str(k), repr(v))
                                                      for k, v in metrics.items())])
    except (AttributeError, TypeError):
        text = repr((num_examples, metrics))
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


Session: TypeAlias = DeviceTask | SecAggDeviceRound


@dataclass(frozen=True)
class GatewaySettings:
    """How the gateway paces devices and runs secure aggregation.

    Attributes:
        idle_retry_s: devices that find no task come back within this (jittered).
        checkin_interval_s: devices a task does not need come back within
            [0.5, 1.5] x this (pace steering spreads their check-ins).
        roster_wait_s: secure aggregation: longest wait for the selected devices to check
            in before the roster closes.
        stage_timeout_s: secure aggregation: length of the key and unmasking stages; input
            collection ends this long before the task's deadline, so that unmasking fits.
    """

    idle_retry_s: float = 2.0
    checkin_interval_s: float = 5.0
    roster_wait_s: float = 15.0
    stage_timeout_s: float = 10.0


@dataclass(frozen=True)
class Outcome:
    """What one device did for one task, for the registry (participation, fairness)."""

    device_id: str
    task_id: int
    round: int
    outcome: str  # "accepted", "late", "dropped" or "rejected:<reason>"
    now: float


def is_closed(s: Session) -> bool:
    """Whether a session's task is over (closed, or its secure protocol finished)."""
    if isinstance(s, SecAggDeviceRound):
        return s.status().done
    return bool(s.closed)


class SessionBook:
    """The sessions of a gateway's tasks (see the module docstring).

    Args:
        keep_closed: closed sessions kept to answer late uploads and retries.
    """

    def __init__(self, keep_closed: int = 8) -> None:
        self.keep_closed = keep_closed
        self._sessions: dict[int, Session] = {}
        self._task_of: dict[str, int] = {}  # device -> its latest task
        self._params: dict[int, np.ndarray] = {}  # version -> params, while a task needs it
        self._settings: dict[int, dict[str, float]] = {}
        self._outcomes: list[Outcome] = []
        self._unfit: set[tuple[int, str]] = set()  # (task, device) refused for its runtime

    # -- lookups ------------------------------------------------------------------------------

    def all(self) -> list[Session]:
        """The kept sessions, oldest first."""
        return list(self._sessions.values())

    def get(self, task_id: int) -> Session | None:
        return self._sessions.get(task_id)

    def current(self, device_id: str) -> Session | None:
        """The session of the latest task ``device_id`` was selected for (kept)."""
        tid = self._task_of.get(device_id)
        return self._sessions.get(tid) if tid is not None else None

    def answering(self, device_id: str, round: int) -> Session | None:
        """The session a message from ``device_id`` for ``round`` answers to: its latest
        task's, or a kept earlier one of that round which selected it (a late retry)."""
        latest = self.current(device_id)
        if isinstance(latest, EvalSession):  # its round is its task id: never a match
            latest = None
        if latest is not None and latest.round == round:
            return latest
        earlier = [s for s in self._sessions.values() if not isinstance(s, EvalSession)
                   and s.round == round and device_id in s.selected]
        return earlier[-1] if earlier else latest

    def secure(self, device_id: str, round: int) -> SecAggDeviceRound | None:
        """The secure-aggregation session ``device_id`` takes part in for ``round``."""
        s = self.current(device_id)
        return s if isinstance(s, SecAggDeviceRound) and s.round == round else None

    def any_open(self) -> bool:
        return any(not is_closed(s) for s in self._sessions.values())

    def params(self, version: int) -> np.ndarray | None:
        """The model ``version`` while a task trains from it (else ``None``)."""
        return self._params.get(version)

    @property
    def latest_version(self) -> int | None:
        return max(self._params) if self._params else None

    def settings(self, task_id: int) -> dict[str, float]:
        """A copy of the client settings of the task."""
        return dict(self._settings.get(task_id, {}))

    # -- changes ------------------------------------------------------------------------------

    def open(self, task: TrainTask, selected: Sequence[str], client_ids: Sequence[int],
             now: float, settings: GatewaySettings, *, secure: SecAggAggregation | None,
             dim: int, target: int, min_accepted: int) -> bool:
        """Open the session of a new task sent to ``selected`` (their client ids
        ``client_ids``): a :class:`~shoal.device_task.DeviceTask`, or with ``secure`` a
        :class:`~shoal.device_secagg.SecAggDeviceRound` (``target`` and ``min_accepted``
        devices, input collection ending a stage before the task's deadline). Returns
        whether no earlier task trained the task's version. Older closed sessions and
        versions no open task needs are forgotten."""
        pace, retry = settings.checkin_interval_s, settings.idle_retry_s
        s: Session
        if secure is None:
            s = DeviceTask(task.task_id, task.round, task.version, selected,
                           deadline=task.deadline, client_ids=client_ids, pace_spread_s=pace,
                           retry_spread_s=retry, clip_norm=task.clip_norm)
        else:
            s = SecAggDeviceRound(
                task.task_id, task.round, task.version, selected, target=target,
                min_accepted=min_accepted, opened_at=now,
                input_deadline=task.deadline - settings.stage_timeout_s, dim=dim,
                config_for=secure.config_for, roster_wait_s=settings.roster_wait_s,
                stage_timeout_s=settings.stage_timeout_s, client_ids=client_ids,
                pace_spread_s=pace, retry_spread_s=retry, clip_norm=task.clip_norm)
        new_version = task.version not in self._params
        self._sessions[task.task_id] = s
        self._settings[task.task_id] = {k: float(v) for k, v in task.settings.items()}
        self._params[task.version] = task.params
        for d in selected:
            self._task_of[d] = task.task_id
        self._prune()
        return new_version

    def open_eval(self, task: EvalTask, selected: Sequence[str], client_ids: Sequence[int],
                  settings: GatewaySettings) -> EvalSession:
        """Open the session of evaluation task ``task`` sent to ``selected``."""
        s = EvalSession(task, selected, client_ids, pace_spread_s=settings.checkin_interval_s,
                        retry_spread_s=settings.idle_retry_s)
        self._sessions[task.task_id] = s
        for d in selected:
            self._task_of[d] = task.task_id
        self._prune()
        return s

    def _prune(self) -> None:
        closed = [tid for tid, s in self._sessions.items() if is_closed(s)]
        for tid in closed[:max(0, len(closed) - self.keep_closed)]:
            s = self._sessions.pop(tid)
            self._settings.pop(tid, None)
            for d in s.selected:
                if self._task_of.get(d) == tid:
                    del self._task_of[d]
        self._unfit = {k for k in self._unfit if k[0] in self._sessions}
        needed = {s.model_version for s in self._sessions.values()
                  if not is_closed(s) and not isinstance(s, EvalSession)}
        newest = max(self._params) if self._params else None
        for v in list(self._params):
            if v not in needed and v != newest:
                del self._params[v]

    def unfit(self, s: Session, device_id: str) -> bool:
        """Mark ``device_id`` as out of ``s``'s task (refused it for its runtime or
        capabilities, or it declined the task); returns whether it was the first time."""
        key = (s.task_id, device_id)
        first = key not in self._unfit
        self._unfit.add(key)
        return first

    def record(self, device_id: str, s: Session, outcome: str, now: float) -> None:
        """Note what ``device_id`` did for ``s``'s task (for :meth:`take_outcomes`)."""
        self._outcomes.append(Outcome(device_id, s.task_id, s.round, outcome, now))

    def take_outcomes(self) -> list[Outcome]:
        """The outcomes recorded since the last call."""
        out, self._outcomes = self._outcomes, []
        return out


class EvalDesk:
    """The evaluation calls of :class:`~shoal.gateway.DeviceGateway` (a mixin: it uses the
    gateway's lock, coordinator, sessions and refusal counters). Every method takes the
    gateway's lock."""

    # provided by DeviceGateway
    lock: threading.RLock
    changed: threading.Condition
    sessions: SessionBook
    serves: Callable[[str], int | None] | None
    _evaluated: list[EvalResult]
    _running: Callable[[], Coordinator]
    _carry: Callable[[list[Command], float], None]
    _count: Callable[[UpdateRejected, int, float], UpdateRejected]
    _settle: Callable[[float, Sequence[DeviceTask] | None], None]
    _outcome: Callable[[str, Session, str, float], None]

    def evaluate(self, params: np.ndarray, version: int, now: float, *,
                 clients: np.ndarray, deadline: float = math.inf, purpose: str = "") -> int:
        """Open an evaluation task of served store ``version`` (``params``) on ``clients``
        (client ids); returns its task id. Its result comes out of
        :meth:`take_evaluations` once every device reported or failed, or the deadline
        passed.

        Raises:
            ConfigError: no client, or one outside the population.
            ProtocolError: the gateway serves no coordinator.
        """
        with self.changed:
            cmds = self._running().evaluate(params, version, now, clients=clients,
                                            deadline=deadline, purpose=purpose)
            task_id = next(c.task.task_id for c in cmds if isinstance(c, SendEval))
            self._carry(cmds, now)
            self.changed.notify_all()
            return task_id

    def take_evaluations(self) -> list[EvalResult]:
        """The evaluation results closed since the last call."""
        with self.lock:
            out, self._evaluated = self._evaluated, []
            return out

    def report_eval(self, device_id: str, task_id: int, model_version: int, upload_key: str,
                    num_examples: int, metrics: dict[str, float], now: float, *,
                    segment: str = "") -> None:
        """A device's evaluation report, judged by its session
        (:meth:`EvalSession.admit_report <shoal.device_sessions.EvalSession.admit_report>`)
        and the coordinator (which refuses metric names other than the first report's:
        ``malformed``); ``segment`` is the carrier's, from what the device declared.

        Raises:
            UpdateRejected: with the reason (``not_selected`` when no such evaluation task
                was issued to the device); nothing changed.
        """
        with self.changed:
            s = self.sessions.get(task_id)
            if not isinstance(s, EvalSession) or device_id not in s.selected:
                raise self._count(UpdateRejected(
                    "not_selected", "no evaluation task was issued to this device under this "
                    "task id: the report is refused and nothing is kept",
                    client_id=device_id), task_id, now)
            try:
                admitted = s.admit_report(device_id, model_version, upload_key, num_examples,
                                          metrics, now)
            except UpdateRejected as exc:
                raise self._count(exc, task_id, now)
            if admitted is None:
                return  # the same report again: taken before, counted once
            cid, clean = admitted
            reports = EvalReports(np.array([cid], np.int64),
                                  np.array([int(num_examples)], np.int64),
                                  {k: np.array([v], np.float64) for k, v in clean.items()},
                                  (segment,))
            cmds = self._running().handle(EvalReported(task_id, reports, now))
            refusal = next((c for c in cmds if isinstance(c, UpdateRefused)
                            and c.task_id == task_id and cid in c.client_ids), None)
            if refusal is None:
                s.take_report(device_id, num_examples, clean)
            self._carry(cmds, now)
            if refusal is not None:
                raise self._count(s.refuse(device_id, refusal.reason, refusal.detail),
                                  task_id, now)
            self.changed.notify_all()

    def decline(self, device_id: str, task_id: int, round: int, upload_key: str,
                model_version: int, reason: str, now: float) -> None:
        """``device_id`` will not carry out its task ``task_id`` (e.g. the model it was sent
        failed its signature check): the coordinator stops waiting for it
        (``ClientsFailed``), its outcome is ``rejected:<reason>``. Declining twice is
        declining once.

        Raises:
            UpdateRejected: ``not_selected`` (no such task for this device), ``malformed``
                (a reason outside :data:`~shoal.device_sessions.DECLINE_REASONS`), or the
                session's authentication reasons; nothing changed.
        """
        with self.changed:
            s = self.sessions.get(task_id)
            if not isinstance(s, DeviceTask) or device_id not in s.selected:
                raise self._count(UpdateRejected(
                    "not_selected", "no such task was issued to this device",
                    client_id=device_id), task_id, now)
            if reason not in DECLINE_REASONS:
                raise self._count(UpdateRejected(
                    "malformed", f"a task is declined for one of {DECLINE_REASONS}",
                    client_id=device_id), task_id, now)
            try:
                s.authenticate(device_id, round, model_version, upload_key)
            except UpdateRejected as exc:
                raise self._count(exc, task_id, now)
            if device_id not in s.devices_with("accepted"):
                self._drop(s, device_id, reason, now)

    def _drop(self, s: DeviceTask, device_id: str, reason: str, now: float) -> None:
        """``device_id`` is out of ``s``'s task for ``reason``: done with it (later check-ins
        are answered ``already_reported``), and the coordinator told once."""
        if self.sessions.unfit(s, device_id):
            s.answered(device_id)
            if not isinstance(s, EvalSession):
                self._outcome(device_id, s, f"rejected:{reason}", now)
            self._carry(self._running().handle(
                ClientsFailed(s.task_id, (s.client_id(device_id),), reason, now)), now)
            self._settle(now, [s])
            self.changed.notify_all()

    def _unfit_for_evaluation(self, s: EvalSession, device_id: str, evaluates: bool,
                              soon: float, now: float) -> ComeBack | None:
        """At check-in: a come-back for a device of ``s`` that cannot evaluate
        (``cannot_evaluate``) or is not served ``s``'s version (``not_served``), dropped
        from the task; ``None`` when it may have the task."""
        if is_closed(s) or device_id not in s.selected \
                or device_id in s.devices_with("accepted"):
            return None
        why = "" if evaluates else "cannot_evaluate"
        if not why and (self.serves is None or self.serves(device_id) != s.model_version):
            why = "not_served"
        if not why:
            return None
        self._drop(s, device_id, why, now)
        return ComeBack(soon, why)
