"""The devices' side of one coordinator task, sans-I/O: check-in, task, upload authentication.

Follows the round protocol of K. Bonawitz et al., "Towards Federated Learning at Scale: System
Design", MLSys 2019: devices *pull* work. A device checks in and receives either a
:class:`Task` (round, model version, a one-time upload key, the deadline) or a
:class:`ComeBack` telling it when to try again (pace steering).

A :class:`DeviceTask` is the session of one coordinator :class:`~shoal.events.TrainTask`
over the devices it was sent to. It holds *no round rule*: when a round closes, whether it
commits, how stale an update may be, whether an update is well-formed -- all of that is the
coordinator's (its policy and pipeline). The session only knows who was asked, which key
each tasked device holds, which devices were answered, and whether the coordinator has
closed the task (``close``, on its ``CancelTask``) or its deadline has passed. It turns an
authenticated upload into a :class:`~shoal.events.ClientUpdate` for the coordinator
(:meth:`DeviceTask.admit`) and remembers the coordinator's verdict (:meth:`accept`,
:meth:`refuse`) so that a device retrying after a lost reply gets the same answer and is
never counted twice.

Nothing here holds a socket, thread or clock: time is the ``now`` argument, jitter comes from
a ``numpy.random.Generator`` argument, and only upload keys come from :mod:`secrets` (they are
credentials). Rejections raise :class:`~shoal.errors.UpdateRejected` with a machine-readable
``reason``; the session is then exactly as before, and only the counter
``rejections[reason]`` grows. Not thread-safe: the carrier serialises calls.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias

import numpy as np

from shoal.errors import ConfigError, ShoalError, UpdateRejected, int_at_least
from shoal.events import ClientUpdate

__all__ = ["CheckInDecision", "ComeBack", "DeviceTask", "MAX_METRICS", "MAX_METRIC_VALUE",
           "PACE_WINDOW", "SESSION_REASONS", "Task", "TaskRefused", "UploadResult", "paced"]

#: Every ``UpdateRejected.reason`` :meth:`DeviceTask.admit` can raise, in checking order
#: (the coordinator's pipeline adds its own: ``wrong_shape``, ``non_finite``, ...).
SESSION_REASONS = ("not_selected", "wrong_round", "stale", "bad_key", "duplicate", "late",
                   "bad_metrics")
#: Most metrics one update may carry, and the largest magnitude of one (device-reported
#: numbers such as the local loss reach the round's record: they must stay finite and sane).
MAX_METRICS = 32
MAX_METRIC_VALUE = 1e9

_REAL = (int, float, np.integer, np.floating)


@dataclass(frozen=True)
class Task:
    """Work for a selected device: train ``model_version`` and upload by ``deadline``,
    presenting ``upload_key``.

    Attributes:
        round: the task's round number (the coordinator's stream key).
        model_version: the global model version to download and train from.
        upload_key: a one-time 128-bit hex token (from :mod:`secrets`) the upload must carry.
        deadline: uploads at or after it are ``"late"`` (seconds, same clock as ``now``).
        clip_norm: clip the update to this L2 norm and weigh it as one example before it
            leaves the device (``None``: not asked); see :class:`~shoal.events.TrainTask`.
        task_id: the coordinator's task (evaluation reports and declines name it).
    """

    round: int
    model_version: int
    upload_key: str
    deadline: float
    clip_norm: float | None = None
    task_id: int = 0

    def __repr__(self) -> str:  # keep the credential out of logs
        return (f"Task(round={self.round}, model_version={self.model_version}, "
                f"upload_key='…', deadline={self.deadline}, clip_norm={self.clip_norm}, "
                f"task_id={self.task_id})")


@dataclass(frozen=True)
class ComeBack:
    """No work now: check in again at ``at`` (seconds).

    Attributes:
        at: when to come back, always >= the check-in's ``now``.
        reason: ``"no_round"``, ``"not_selected"``, ``"round_closed"`` or
            ``"already_reported"``.
    """

    at: float
    reason: str


CheckInDecision: TypeAlias = Task | ComeBack


@dataclass(frozen=True)
class UploadResult:
    """The acceptance of one device's update (a retry gets this very object back).

    Attributes:
        device_id: the uploading device.
        client_id: the int it carries in :class:`~shoal.events.ClientUpdate`.
        round: the task's round.
        num_examples: the update's weight.
        accepted_at: the ``now`` of the accepting call.
        position: 1 for the task's first accepted update, 2 for the second, ...
    """

    device_id: str
    client_id: int
    round: int
    num_examples: int
    accepted_at: float
    position: int


def _time(value: object, name: str, *, allow_inf: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, _REAL) \
            or math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ConfigError(f"{name} must be a finite number, got {value!r}", key=name)
    return float(value)


def _spread(value: object, name: str) -> float:
    v = _time(value, name)
    if v < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}", key=name)
    return v


#: The window of :func:`paced`, in multiples of the check-in interval.
PACE_WINDOW = (0.5, 1.5)


def paced(now: float, interval: float, rng: np.random.Generator) -> float:
    """When a device no open task needs should come back (pace steering): within
    :data:`PACE_WINDOW` (0.5-1.5) x ``interval`` of ``now``, uniformly, so a population told
    to wait together does not return together. One uniform drawn from ``rng``."""
    return now + interval * float(rng.uniform(*PACE_WINDOW))


# Per-device progress: selected (no task yet), tasked, accepted.
_SELECTED, _TASKED, _ACCEPTED = 0, 1, 2


class DeviceTask:
    """One coordinator task as the devices it was sent to see it.

    Args:
        task_id: the coordinator's task id.
        round: the task's round number (devices echo it in their upload).
        model_version: the version the task trains from (>= 0); an upload from another is
            ``"stale"``.
        selected: the device ids asked to train, unique non-empty strings.
        client_ids: the int each device carries in :class:`ClientUpdate` (unique, >= 0, one
            per selected device); default ``0 .. len(selected) - 1``.
        deadline: uploads at or after it are ``"late"`` (``inf``: none is late by time).
        checkin_interval_s: unselected and already-reported devices come back within
            0.5-1.5 x this of ``now``, uniformly (:func:`paced`).
        retry_spread_s: devices that find the task closed come back within
            ``[now, now + retry_spread_s]``, when the next task may be open.
        clip_norm: what every :class:`Task` of this session asks devices to clip to
            (``None``, or a finite number > 0).

    Raises:
        ConfigError: an argument is out of range; the message and ``key`` name it. Every
            method also raises it (``key="now"``) for a ``now`` that is not a finite number:
            that is a bug in the driving carrier, not a device fault.
    """

    def __init__(self, task_id: int, round: int, model_version: int, selected: Sequence[str],
                 *, client_ids: Sequence[int] | None = None, deadline: float = math.inf,
                 checkin_interval_s: float = 10.0, retry_spread_s: float = 10.0,
                 clip_norm: float | None = None) -> None:
        self.task_id = int_at_least(task_id, "task_id", 0)
        if clip_norm is not None and not (_time(clip_norm, "clip_norm") > 0):
            raise ConfigError(f"clip_norm must be a finite number > 0, got {clip_norm!r}",
                              key="clip_norm")
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.round = int_at_least(round, "round", 0)
        self.model_version = int_at_least(model_version, "model_version", 0)
        self.deadline = _time(deadline, "deadline", allow_inf=True)
        self.checkin_interval_s = _spread(checkin_interval_s, "checkin_interval_s")
        self.retry_spread_s = _spread(retry_spread_s, "retry_spread_s")
        devices = list(selected) if not isinstance(selected, str) else None
        if not devices or not all(isinstance(d, str) and d for d in devices):
            raise ConfigError("selected must be a non-empty sequence of non-empty device-id "
                              "strings", key="selected")
        if len(set(devices)) != len(devices):
            dup = sorted(d for d, n in Counter(devices).items() if n > 1)[0]
            raise ConfigError(f"selected lists device {dup!r} more than once", key="selected")
        if client_ids is None:
            ints = list(range(len(devices)))
        else:
            ints = [int_at_least(c, "client_ids", 0) for c in client_ids]
            if len(ints) != len(devices) or len(set(ints)) != len(ints):
                raise ConfigError(f"client_ids must be {len(devices)} unique ints, one per "
                                  f"selected device", key="client_ids")
        self._client_id: dict[str, int] = dict(zip(devices, ints))
        self._device_of: dict[int, str] = dict(zip(ints, devices))
        self._state: dict[str, int] = dict.fromkeys(devices, _SELECTED)
        self._task: dict[str, Task] = {}
        self._receipt: dict[str, UploadResult] = {}
        self._digest: dict[str, bytes] = {}
        self._accepted = 0
        self._closed = ""
        self._rejections: Counter[str] = Counter()
        self.replays = 0

    # -- queries ------------------------------------------------------------------------------

    @property
    def selected(self) -> tuple[str, ...]:
        """The selected device ids, in construction order."""
        return tuple(self._state)

    @property
    def tasked(self) -> tuple[str, ...]:
        """Devices that received a task (in selection order)."""
        return tuple(d for d, st in self._state.items() if st != _SELECTED)

    @property
    def accepted(self) -> int:
        return self._accepted

    @property
    def rejections(self) -> dict[str, int]:
        """A copy of reason -> number of uploads refused with it (coordinator verdicts
        included)."""
        return dict(self._rejections)

    @property
    def closed(self) -> str:
        """Why the coordinator closed the task, or ``""`` while it is open."""
        return self._closed

    def is_open(self, now: float) -> bool:
        return not self._closed and _time(now, "now") < self.deadline

    def reported(self, device_id: str) -> bool:
        """Whether ``device_id``'s update was accepted (a check-in then gets no task)."""
        return self._state.get(device_id) == _ACCEPTED

    def client_id(self, device_id: str) -> int:
        """The int ``device_id`` carries in :class:`ClientUpdate` (KeyError if unselected)."""
        return self._client_id[device_id]

    def device_id(self, client_id: int) -> str:
        """The device behind a ``client_id`` (KeyError if unknown)."""
        return self._device_of[client_id]

    def devices_with(self, state: str) -> tuple[str, ...]:
        """The devices that are ``"waiting"`` (selected, not given their task yet),
        ``"tasked"`` (given a key, not accepted yet) or ``"accepted"``."""
        code = {"waiting": _SELECTED, "tasked": _TASKED, "accepted": _ACCEPTED}[state]
        return tuple(d for d, st in self._state.items() if st == code)

    # -- check-in -----------------------------------------------------------------------------

    def check_in(self, device_id: str, now: float, *, rng: np.random.Generator
                 ) -> CheckInDecision:
        """Answer a device's check-in with a :class:`Task` or a :class:`ComeBack`.

        A selected device without a task gets a fresh one; asking again before its verdict
        returns the *same* task (same key), so a lost response costs nothing. Otherwise:
        task closed or past its deadline → ``ComeBack(now + U[0, retry_spread_s],
        "round_closed")``; not selected, or already answered → ``ComeBack(now +
        U[0.5, 1.5] x checkin_interval_s, "not_selected" | "already_reported")``
        (:func:`paced`). ``rng`` is drawn from only
        for a ComeBack (one uniform).
        """
        if not self.is_open(now):
            return ComeBack(at=now + float(rng.uniform(0.0, self.retry_spread_s)),
                            reason="round_closed")
        state = self._state.get(device_id)
        if state is None or state == _ACCEPTED:
            reason = "not_selected" if state is None else "already_reported"
            return ComeBack(at=paced(now, self.checkin_interval_s, rng), reason=reason)
        if state == _TASKED:
            return self._task[device_id]
        task = Task(round=self.round, model_version=self.model_version,
                    upload_key=secrets.token_hex(16), deadline=self.deadline,
                    clip_norm=self.clip_norm, task_id=self.task_id)
        self._task[device_id] = task
        self._state[device_id] = _TASKED
        return task

    # -- upload -------------------------------------------------------------------------------

    def _reject(self, reason: str, detail: str, device_id: object) -> UpdateRejected:
        self._rejections[reason] += 1
        return UpdateRejected(reason, detail, client_id=device_id, round=self.round)

    def authenticate(self, device_id: str, round: int, base_version: int, upload_key: str
                     ) -> int:
        """Check that a message comes from a tasked device of this task, trained from its
        model version, with its task's key; return the device's client id.

        Reasons, in order: ``not_selected``, ``wrong_round``, ``stale``, ``bad_key``. A
        secure-aggregation round authenticates every protocol message with them, also after
        :meth:`close`.
        """
        state = self._state.get(device_id) if isinstance(device_id, str) else None
        if state is None:
            raise self._reject("not_selected", "device is not selected for this task",
                               device_id)
        if isinstance(round, bool) or round != self.round:
            raise self._reject("wrong_round", f"update is for round {round!r}, this task is "
                               f"round {self.round}", device_id)
        if isinstance(base_version, bool) or base_version != self.model_version:
            raise self._reject("stale", f"trained from model version {base_version!r}, the "
                               f"task serves version {self.model_version}", device_id)
        task = self._task.get(device_id)
        if task is None or not isinstance(upload_key, str) \
                or not secrets.compare_digest(upload_key.encode(), task.upload_key.encode()):
            detail = "no task was issued to this device" if task is None else \
                "upload key does not match the device's task"
            raise self._reject("bad_key", detail, device_id)
        return self._client_id[device_id]

    def admit(self, device_id: str, round: int, base_version: int, upload_key: str,
              num_examples: int, delta: np.ndarray, now: float, *,
              metrics: Mapping[str, float] | None = None,
              fingerprint: bytes | None = None) -> ClientUpdate | UploadResult:
        """Authenticate an upload and turn it into the :class:`ClientUpdate` the coordinator
        judges -- or, for an idempotent retry, return the original :class:`UploadResult`.

        Checks :meth:`authenticate`, then the retry rule, then ``late`` (task closed or
        ``now >= deadline``), then ``bad_metrics`` (at most :data:`MAX_METRICS` names of 1-64
        printable characters, each a finite number within :data:`MAX_METRIC_VALUE`). Retry
        rule: a device whose update was accepted and that resends the same payload (same examples
        and delta bytes) gets its original acceptance back -- *even after the task closed*,
        which is why this rule comes before ``late`` -- and nothing is counted twice; a
        different payload is ``"duplicate"``. A refused update changes nothing: the device
        may send a corrected one. The shape, values and weight of the delta are the coordinator's to
        judge (one validation path for every carrier): pass its verdict to :meth:`accept` or
        :meth:`refuse`. ``fingerprint`` is a digest of the payload the delta was decoded from
        that the carrier has verified (the upload's SHA-256): the retry rule compares it
        instead of hashing the decoded delta again (a retry resends the same bytes). A
        retry without one, of an update accepted with one, is ``"duplicate"``.

        Raises:
            UpdateRejected: with ``reason`` as above; the session is unchanged.
        """
        now = _time(now, "now")
        self.authenticate(device_id, round, base_version, upload_key)
        state = self._state[device_id]
        if state == _ACCEPTED:
            if _digest(num_examples, delta, fingerprint) != self._digest.get(device_id):
                raise self._reject("duplicate", "an update from this device was already "
                                   "accepted for this task; this one differs", device_id)
            self.replays += 1
            return self._receipt[device_id]
        if not self.is_open(now):
            detail = f"round closed ({self._closed})" if self._closed else \
                f"deadline {self.deadline} passed (now = {now})"
            raise self._reject("late", detail, device_id)
        clean = self._check_metrics(metrics, device_id)
        return ClientUpdate(client_id=self._client_id[device_id], delta=delta,
                            num_examples=num_examples, metrics=clean,
                            base_version=self.model_version)

    def accept(self, device_id: str, update: ClientUpdate, now: float, *,
               fingerprint: bytes | None = None) -> UploadResult:
        """Record the coordinator's acceptance of ``update`` (from :meth:`admit`, with the
        same ``fingerprint``)."""
        self._accepted += 1
        receipt = UploadResult(device_id=device_id, client_id=update.client_id,
                               round=self.round, num_examples=int(update.num_examples),
                               accepted_at=_time(now, "now"), position=self._accepted)
        self._state[device_id] = _ACCEPTED
        self._digest[device_id] = _digest(update.num_examples, update.delta, fingerprint)
        self._receipt[device_id] = receipt
        return receipt

    def answered(self, device_id: str) -> None:
        """Count ``device_id`` as done with the task without an update (it declined it, or
        reported an evaluation): its check-ins are answered ``already_reported``."""
        self._state[device_id] = _ACCEPTED

    def refuse(self, device_id: str, reason: str, detail: str) -> UpdateRejected:
        """Count the coordinator's refusal of the device's update (nothing else changes: the
        device keeps its task); returns the error to raise."""
        return self._reject(reason, detail, device_id)

    def _check_metrics(self, metrics: Mapping[str, float] | None, device_id: str
                       ) -> Mapping[str, float]:
        """The device's metrics (device-reported: the server cannot check them), bounded:
        at most :data:`MAX_METRICS` names of 1-64 printable characters, each a finite
        number of magnitude at most :data:`MAX_METRIC_VALUE`."""
        if metrics is None:
            return MappingProxyType({})
        why = ""
        if not isinstance(metrics, Mapping):
            why = "metrics must map names to finite numbers"
        elif len(metrics) > MAX_METRICS:
            why = f"at most {MAX_METRICS} metrics, got {len(metrics)}"
        for k, v in metrics.items() if not why else ():
            if not (isinstance(k, str) and 1 <= len(k) <= 64 and k.isprintable()):
                why = f"metric name {str(k)[:70]!r} must be 1-64 printable characters"
            elif isinstance(v, (bool, np.bool_)) or not isinstance(v, _REAL) \
                    or not math.isfinite(v):
                why = f"metric {k!r} must be a finite number, got {v!r}"
            elif abs(v) > MAX_METRIC_VALUE:
                why = f"metric {k!r} = {v:g} is beyond the bound +-{MAX_METRIC_VALUE:g}"
            if why:
                break
        if why:
            raise self._reject("bad_metrics", why, device_id)
        return MappingProxyType({k: float(v) for k, v in metrics.items()})

    def close(self, reason: str) -> None:
        """The coordinator closed the task (its ``CancelTask``); idempotent. Later uploads
        are ``"late"`` and check-ins ``"round_closed"``; authentication still works."""
        if not self._closed:
            self._closed = reason or "closed"


class TaskRefused(ShoalError):
    """A selected device may not take its task (nothing about the task changed).

    Attributes:
        reason: machine-readable (``"runtime_too_old"``: the task asks for clipping the
            device's runtime does not do).
        detail: for people.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _digest(num_examples: object, delta: object, fingerprint: bytes | None = None) -> bytes:
    """A fingerprint of an upload, to tell an idempotent retry from a new update: its weight
    and the carrier's verified digest of its payload, else (none given) its decoded delta."""
    h = hashlib.blake2b(digest_size=16)
    # np.int64(5) and 5 are the same weight: normalise before hashing.
    weight = int(num_examples) if isinstance(num_examples, (int, np.integer)) else num_examples
    h.update(repr(weight).encode())
    if fingerprint is not None:
        h.update(b"payload:" + fingerprint)
    elif isinstance(delta, np.ndarray):
        h.update(f"{delta.dtype.str}{delta.shape}".encode())
        h.update(np.ascontiguousarray(delta).data)
    else:
        h.update(repr(type(delta)).encode())
    return h.digest()
