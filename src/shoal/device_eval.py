"""Evaluation tasks at the device gateway: their sessions and the gateway's evaluation calls.

Federated evaluation's second task kind (:class:`~shoal.events.EvalTask`,
:meth:`Coordinator.evaluate <shoal.coordinator.Coordinator.evaluate>`) as devices see it:

* :class:`EvalSession`: who was asked, the key each was given, who reported. Its model is the
  one the device is *served* (a model-store version fetched with ``GetModel``), so a device
  can only ever evaluate what it may hold -- a canary's candidate inside the canary,
  production outside it.
* :class:`EvalDesk`: the evaluation calls of :class:`~shoal.gateway.DeviceGateway` (a mixin):
  open an evaluation task, take a device's report or its refusal (``Decline``), offer a task
  only to a device that can evaluate and is served its version, carry out the coordinator's
  ``SendEval``/``EvalDone``, and serve a coordinator that only evaluates (a canary after
  training).

Sans-I/O: every method takes ``now``; the gateway's lock guards them.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from shoal.device_task import ComeBack, DeviceTask
from shoal.errors import ProtocolError, UpdateRejected
from shoal.evaluation import EvalResult
from shoal.events import (ClientsFailed, Command, EvalDone, EvalReported, EvalReports,
                          EvalTask, SendEval, UpdateRefused)

if TYPE_CHECKING:  # annotations only: the gateway's parts (which import this module)
    from shoal.coordinator import Coordinator
    from shoal.device_sessions import GatewaySettings, Session, SessionBook

__all__ = ["DECLINE_REASONS", "EvalDesk", "EvalSession", "MAX_EXAMPLES"]

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
        checkin_interval_s, retry_spread_s: as for :class:`~shoal.device_task.DeviceTask`.
    """

    kind = "evaluate"

    def __init__(self, task: EvalTask, selected: Sequence[str], client_ids: Sequence[int],
                 *, checkin_interval_s: float, retry_spread_s: float) -> None:
        super().__init__(task.task_id, task.task_id, task.version, selected,
                         client_ids=client_ids, deadline=task.deadline,
                         checkin_interval_s=checkin_interval_s,
                         retry_spread_s=retry_spread_s)
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


class EvalDesk:
    """The evaluation calls of :class:`~shoal.gateway.DeviceGateway` (a mixin: it uses the
    gateway's lock, coordinator, sessions and refusal counters). Every method takes the
    gateway's lock."""

    # provided by DeviceGateway
    lock: threading.RLock
    changed: threading.Condition
    coordinator: Coordinator | None
    devices: tuple[str, ...]
    settings: GatewaySettings
    sessions: SessionBook
    _drive: Callable[..., str]
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
        (:meth:`EvalSession.admit_report <shoal.device_eval.EvalSession.admit_report>`)
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
                (a reason outside :data:`DECLINE_REASONS`), or the
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
        if s.closed or device_id not in s.selected \
                or device_id in s.devices_with("accepted"):
            return None
        why = "" if evaluates else "cannot_evaluate"
        if not why and (self.serves is None or self.serves(device_id) != s.model_version):
            why = "not_served"
        if not why:
            return None
        self._drop(s, device_id, why, now)
        return ComeBack(soon, why)

    def serve(self, coordinator: Coordinator, now: Callable[[], float], *,
              until: Callable[[], bool], poll_s: float = 0.2,
              after_each: Callable[[], None] | None = None) -> str:
        """Serve the evaluation tasks of ``coordinator``, which is not started (it does not
        train: a canary after training), until ``until()`` (checked after every pass, like
        ``after_each``, which is where the caller asks for evaluations and takes their
        results). Returns why it stopped (``"done"`` when ``until()`` held)."""
        with self.changed:
            if self.coordinator is not None:
                raise ProtocolError("the gateway already serves a coordinator")
            self.coordinator = coordinator
        return self._drive(now, until, None, None, poll_s, after_each)

    def _evaluating(self) -> bool:
        """Whether an evaluation task is open (a coordinator that only evaluates takes time
        only then)."""
        return any(isinstance(x, EvalSession) and not x.closed for x in self.sessions.all())

    def _execute_eval(self, cmd: Command) -> bool:
        """Carry out ``SendEval`` (open its session) or ``EvalDone`` (close it, keep the
        result); returns whether ``cmd`` was one of them."""
        if isinstance(cmd, SendEval):
            self.sessions.open_eval(cmd.task, [self.devices[int(c)] for c in cmd.client_ids],
                                    [int(c) for c in cmd.client_ids], self.settings)
        elif isinstance(cmd, EvalDone):
            s = self.sessions.get(cmd.task_id)
            if isinstance(s, EvalSession) and not s.closed:
                s.close("evaluation done")
            self._evaluated.append(cmd.result)
        else:
            return False
        return True
