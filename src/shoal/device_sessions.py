"""The sessions a device gateway keeps: one per coordinator task, and what the devices did.

:class:`SessionBook` is the bookkeeping half of :class:`~shoal.gateway.DeviceGateway`: the
open and recently closed sessions (a :class:`~shoal.device_task.DeviceTask`, or a
:class:`~shoal.device_secagg.SecAggDeviceRound` under secure aggregation), which task each
device was last given, the model versions and client settings tasks train with, and the
:class:`Outcome` of each device for the registry. It answers the lookups a device's call
needs -- including the session of an *earlier* round, so that a retry arriving after its
round closed is answered by the session that judged it -- and forgets all but the last
``keep_closed`` closed sessions.

Evaluation tasks have a session of their own
(:class:`~shoal.device_eval.EvalSession`). An evaluation task sent to a device becomes the
task its check-ins answer (until a later task replaces it); uploads of a training task it
still runs are answered by that task's session, as for any earlier task.

Sans-I/O and not thread-safe: the gateway calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from shoal.device_eval import EvalSession
from shoal.device_ckks import CkksDeviceRound, CkksSetup
from shoal.device_secagg import SecAggDeviceRound
from shoal.device_task import DeviceTask
from shoal.events import EvalTask, TrainTask

if TYPE_CHECKING:  # annotation only: the caller builds the secure rule (and loads its module)
    from shoal.privacy.secagg_rounds import SecAggAggregation

__all__ = ["GatewaySettings", "Outcome", "Session", "SessionBook", "is_closed"]

Session: TypeAlias = DeviceTask | SecAggDeviceRound | CkksDeviceRound


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
        absent_after_s: a device selected for a training task that has missed its latest
            appointment with the gateway by more than this is counted failed (``absent``)
            at once (:mod:`~shoal.device_absence`); ``0``: never, the task's deadline
            decides.
    """

    idle_retry_s: float = 2.0
    checkin_interval_s: float = 5.0
    roster_wait_s: float = 15.0
    stage_timeout_s: float = 10.0
    absent_after_s: float = 0.0


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
    if isinstance(s, (SecAggDeviceRound, CkksDeviceRound)):
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
             now: float, settings: GatewaySettings, *,
             secure: SecAggAggregation | CkksSetup | None,
             dim: int, target: int, min_accepted: int) -> bool:
        """Open the session of a new task sent to ``selected`` (their client ids
        ``client_ids``): a :class:`~shoal.device_task.DeviceTask`, or with ``secure`` a
        :class:`~shoal.device_secagg.SecAggDeviceRound` (``target`` and ``min_accepted``
        devices, input collection ending a stage before the task's deadline), or with a
        :class:`~shoal.device_ckks.CkksSetup` a :class:`~shoal.device_ckks.CkksDeviceRound`
        (collection ending a stage before the deadline: the key holder decrypts). Returns
        whether no earlier task trained the task's version. Older closed sessions and
        versions no open task needs are forgotten."""
        pace, retry = settings.checkin_interval_s, settings.idle_retry_s
        s: Session
        if secure is None:
            s = DeviceTask(task.task_id, task.round, task.version, selected,
                           deadline=task.deadline, client_ids=client_ids,
                           checkin_interval_s=pace, retry_spread_s=retry,
                           clip_norm=task.clip_norm)
        elif isinstance(secure, CkksSetup):
            s = CkksDeviceRound(task.task_id, task.round, task.version, selected,
                                target=target, min_accepted=min_accepted,
                                deadline=task.deadline - settings.stage_timeout_s, dim=dim,
                                setup=secure, client_ids=client_ids, checkin_interval_s=pace,
                                retry_spread_s=retry)
        else:
            s = SecAggDeviceRound(
                task.task_id, task.round, task.version, selected, target=target,
                min_accepted=min_accepted, opened_at=now,
                input_deadline=task.deadline - settings.stage_timeout_s, dim=dim,
                config_for=secure.config_for, roster_wait_s=settings.roster_wait_s,
                stage_timeout_s=settings.stage_timeout_s, client_ids=client_ids,
                checkin_interval_s=pace, retry_spread_s=retry, clip_norm=task.clip_norm)
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
        s = EvalSession(task, selected, client_ids,
                        checkin_interval_s=settings.checkin_interval_s,
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
