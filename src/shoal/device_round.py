"""The server side of one synchronous device round, sans-I/O: check-in, task, upload, close.

Follows the round protocol of K. Bonawitz et al., "Towards Federated Learning at Scale: System
Design", MLSys 2019: devices *pull* work. A device checks in and receives either a
:class:`Task` (round, model version, a one-time upload key, the deadline) or a
:class:`ComeBack` telling it when to try again (pace steering). Selected devices train and
upload; the round is over when ``target`` updates have been accepted (over-selected stragglers
are then refused as ``"late"``, detail "target reached", as in the paper) or when the deadline
passes. It commits if at least ``ceil(min_fraction * target)`` updates were accepted and is
abandoned otherwise.

:class:`DeviceRound` holds no socket, thread or clock: time is always the ``now`` argument
(seconds), jitter comes from a ``numpy.random.Generator`` argument, and only upload keys come
from :mod:`secrets` (they are credentials, so never from numpy). The gRPC server feeds it
messages; a ``GrpcClientPool.train`` drains accepted updates into the coordinator. It is not
thread-safe: the server must serialise calls on one round (one lock or one event loop).

Rejections raise :class:`~shoal.errors.UpdateRejected` with a machine-readable ``reason``; the
round (tasks, accepted set, queue) is then exactly as before, and only the observability
counter ``rejections[reason]`` grows by one. Memory is O(len(selected)) bookkeeping plus the
accepted updates still waiting in the queue; :meth:`DeviceRound.drain` hands them over.
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

from shoal.events import ClientUpdate
from shoal.errors import ConfigError, UpdateRejected

__all__ = [
    "CheckInDecision",
    "ComeBack",
    "DeviceRound",
    "REJECTION_REASONS",
    "RoundStatus",
    "Task",
    "UploadResult",
]

#: Every ``UpdateRejected.reason`` :meth:`DeviceRound.upload` can raise, in checking order.
REJECTION_REASONS = (
    "not_selected", "wrong_round", "stale", "bad_key", "duplicate", "late", "wrong_dtype",
    "wrong_shape", "non_finite", "norm_too_large", "bad_weight", "bad_metrics",
)

# The float widths WeightedMean folds exactly (float64 sum); anything accepted here folds there.
_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_REAL = (int, float, np.integer, np.floating)


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """Work for a selected device: train ``model_version`` for ``round`` and upload by
    ``deadline``, presenting ``upload_key``.

    Attributes:
        round: the round number.
        model_version: the global model version to download and train from.
        upload_key: a one-time 128-bit hex token (from :mod:`secrets`) the upload must carry.
        deadline: the round's deadline (seconds, same clock as ``now``); uploads at or after
            it are ``"late"``.
    """

    round: int
    model_version: int
    upload_key: str
    deadline: float

    def __repr__(self) -> str:  # keep the credential out of logs
        return (f"Task(round={self.round}, model_version={self.model_version}, "
                f"upload_key='…', deadline={self.deadline})")


@dataclass(frozen=True)
class ComeBack:
    """No work now: check in again at ``at`` (seconds).

    Attributes:
        at: when to come back, always >= the check-in's ``now``.
        reason: ``"not_selected"``, ``"round_closed"`` or ``"already_reported"``.
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
        round: the round.
        num_examples: the update's weight.
        accepted_at: the ``now`` of the accepting call.
        position: 1 for the round's first accepted update, 2 for the second, ...
    """

    device_id: str
    client_id: int
    round: int
    num_examples: int
    accepted_at: float
    position: int


@dataclass(frozen=True)
class RoundStatus:
    """Where a round stands at some ``now``.

    Attributes:
        accepted: updates accepted so far.
        outstanding: tasks handed out whose update has not been accepted.
        done: the target was reached, the round was closed, or the deadline has passed.
        commit: ``done`` and ``accepted >= min_accepted``: aggregate and step the model.
        abandoned: ``done`` and not ``commit``: discard the round.
        min_accepted: ``ceil(min_fraction * target)``.
        closed_by: ``"open"``, ``"target_reached"``, ``"closed"`` or ``"deadline"``.
    """

    accepted: int
    outstanding: int
    done: bool
    commit: bool
    abandoned: bool
    min_accepted: int
    closed_by: str


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _int_at_least(value: object, name: str, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}", key=name)
    return int(value)


def _finite(value: object, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, _REAL) \
            or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}", key=name)
    return float(value)


def _positive(value: object, name: str, *, allow_zero: bool = False) -> float:
    v = _finite(value, name)
    if v < 0.0 or (v == 0.0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {value!r}", key=name)
    return v


# Per-device progress. A device is "selected" (no task yet), "tasked" or "reported".
_SELECTED, _TASKED, _REPORTED = 0, 1, 2


class DeviceRound:
    """The server's state machine for one synchronous round over pulling devices.

    Args:
        round: the round number (>= 0).
        model_version: the version of the global model this round trains from (>= 0).
        selected: the device ids asked to train (already over-selected, e.g.
            ``ceil(1.3 * target)`` of them), unique non-empty strings, at least ``target``.
        target: accepted updates after which the round closes (>= 1).
        opened_at: when the round opened (seconds).
        deadline_s: how long it stays open (> 0); the deadline is ``opened_at + deadline_s``.
        min_fraction: in (0, 1]; the round commits with at least
            ``ceil(min_fraction * target)`` accepted updates.
        dim: the model length every delta must have (>= 1).
        max_norm: refuse deltas whose L2 norm exceeds this (> 0), or ``None`` for no bound.
        client_ids: the int each device carries in :class:`ClientUpdate` (unique, >= 0,
            one per selected device); default ``0 .. len(selected) - 1`` in ``selected`` order.
            A ``GrpcClientPool`` passes the coordinator's cohort here.
        max_examples: the largest plausible ``num_examples`` (>= 1); more is ``"bad_weight"``.
        pace_spread_s: unselected and already-reported devices come back at the deadline plus
            uniform jitter in ``[0, pace_spread_s]`` (default ``deadline_s``: the next round's
            check-ins spread over a round's length instead of stampeding at one instant).
        retry_spread_s: devices that find the round closed come back within
            ``[now, now + retry_spread_s]`` (default 10 s), when the next round may be open.

    Raises:
        ConfigError: an argument is out of range; the message and ``key`` name it. Every
            method also raises it (``key="now"``) for a ``now`` that is not a finite number:
            that is a bug in the driving server, not a device fault.
    """

    def __init__(self, round: int, model_version: int, selected: Sequence[str], target: int,
                 opened_at: float, deadline_s: float, min_fraction: float, dim: int,
                 max_norm: float | None, *, client_ids: Sequence[int] | None = None,
                 max_examples: int = 10_000_000, pace_spread_s: float | None = None,
                 retry_spread_s: float = 10.0) -> None:
        self.round = _int_at_least(round, "round", 0)
        self.model_version = _int_at_least(model_version, "model_version", 0)
        self.target = _int_at_least(target, "target", 1)
        self.opened_at = _finite(opened_at, "opened_at")
        self.deadline_s = _positive(deadline_s, "deadline_s")
        self.deadline = self.opened_at + self.deadline_s
        mf = _finite(min_fraction, "min_fraction")
        if not 0.0 < mf <= 1.0:
            raise ConfigError(f"min_fraction must be in (0, 1], got {min_fraction!r}",
                              key="min_fraction")
        self.min_fraction = mf
        # 1e-9 tolerance: 0.7 * 10 is 7.000000000000001 in floating point and means 7.
        self.min_accepted = max(1, math.ceil(mf * self.target - 1e-9))
        self.dim = _int_at_least(dim, "dim", 1)
        self.max_norm = None if max_norm is None else _positive(max_norm, "max_norm")
        self.max_examples = _int_at_least(max_examples, "max_examples", 1)
        self.pace_spread_s = (self.deadline_s if pace_spread_s is None
                              else _positive(pace_spread_s, "pace_spread_s", allow_zero=True))
        self.retry_spread_s = _positive(retry_spread_s, "retry_spread_s", allow_zero=True)

        devices = list(selected) if not isinstance(selected, str) else None
        if devices is None or not all(isinstance(d, str) and d for d in devices):
            raise ConfigError("selected must be a sequence of non-empty device-id strings",
                              key="selected")
        if len(set(devices)) != len(devices):
            dup = sorted(d for d, n in Counter(devices).items() if n > 1)[0]
            raise ConfigError(f"selected lists device {dup!r} more than once", key="selected")
        if len(devices) < self.target:
            raise ConfigError(f"selected has {len(devices)} devices, fewer than target = "
                              f"{self.target}", key="selected")
        if client_ids is None:
            ints = list(range(len(devices)))
        else:
            ints = [_int_at_least(c, "client_ids", 0) for c in client_ids]
            if len(ints) != len(devices) or len(set(ints)) != len(ints):
                raise ConfigError(f"client_ids must be {len(devices)} unique ints, one per "
                                  f"selected device", key="client_ids")
        self._client_id: dict[str, int] = dict(zip(devices, ints))
        self._device_of: dict[int, str] = dict(zip(ints, devices))
        # O(selected) bookkeeping; the per-device entries below are filled lazily.
        self._state: dict[str, int] = dict.fromkeys(devices, _SELECTED)
        self._task: dict[str, Task] = {}
        self._receipt: dict[str, UploadResult] = {}
        self._digest: dict[str, bytes] = {}
        self._queue: list[ClientUpdate] = []
        self._accepted = 0
        self._tasked = 0
        self._closed_by: str | None = None  # "target_reached" or "closed"
        self._rejections: Counter[str] = Counter()
        self._replays = 0

    # -- queries ------------------------------------------------------------------------------

    @property
    def selected(self) -> tuple[str, ...]:
        """The selected device ids, in construction order."""
        return tuple(self._state)

    @property
    def rejections(self) -> dict[str, int]:
        """A copy of reason -> number of uploads refused with it."""
        return dict(self._rejections)

    @property
    def replays(self) -> int:
        """Idempotent retries answered with the original :class:`UploadResult`."""
        return self._replays

    @property
    def queued(self) -> int:
        """Accepted updates waiting for :meth:`drain`."""
        return len(self._queue)

    def client_id(self, device_id: str) -> int:
        """The int ``device_id`` carries in :class:`ClientUpdate` (KeyError if unselected)."""
        return self._client_id[device_id]

    def device_id(self, client_id: int) -> str:
        """The device behind a :class:`ClientUpdate`'s ``client_id`` (KeyError if unknown)."""
        return self._device_of[client_id]

    def status(self, now: float) -> RoundStatus:
        """The round's progress at ``now`` (a pure query: nothing changes)."""
        now = _finite(now, "now")
        if self._closed_by is not None:
            closed_by = self._closed_by
        elif now >= self.deadline:
            closed_by = "deadline"
        else:
            closed_by = "open"
        done = closed_by != "open"
        commit = done and self._accepted >= self.min_accepted
        return RoundStatus(accepted=self._accepted, outstanding=self._tasked - self._accepted,
                           done=done, commit=commit, abandoned=done and not commit,
                           min_accepted=self.min_accepted, closed_by=closed_by)

    def _open(self, now: float) -> bool:
        return self._closed_by is None and now < self.deadline

    # -- check-in -----------------------------------------------------------------------------

    def check_in(self, device_id: str, now: float, *, rng: np.random.Generator
                 ) -> CheckInDecision:
        """Answer a device's check-in with a :class:`Task` or a :class:`ComeBack`.

        A selected device without a task gets a fresh one; asking again before uploading
        returns the *same* task (same key), so a lost response costs nothing. Otherwise:

        * round closed (target reached, :meth:`close`, or ``now >= deadline``):
          ``ComeBack(now + U[0, retry_spread_s], "round_closed")``;
        * not selected: ``ComeBack(deadline + U[0, pace_spread_s], "not_selected")``;
        * update already accepted: ``ComeBack(deadline + U[0, pace_spread_s],
          "already_reported")``.

        ``rng`` is drawn from only for a ComeBack (one uniform), so results are a function of
        the call sequence, ``now`` and the generator's state.
        """
        now = _finite(now, "now")
        if not self._open(now):
            return ComeBack(at=now + float(rng.uniform(0.0, self.retry_spread_s)),
                            reason="round_closed")
        state = self._state.get(device_id)
        if state is None or state == _REPORTED:
            reason = "not_selected" if state is None else "already_reported"
            return ComeBack(at=self.deadline + float(rng.uniform(0.0, self.pace_spread_s)),
                            reason=reason)
        if state == _TASKED:
            return self._task[device_id]
        task = Task(round=self.round, model_version=self.model_version,
                    upload_key=secrets.token_hex(16), deadline=self.deadline)
        self._task[device_id] = task
        self._state[device_id] = _TASKED
        self._tasked += 1
        return task

    # -- upload -------------------------------------------------------------------------------

    def _reject(self, reason: str, detail: str, device_id: object) -> UpdateRejected:
        self._rejections[reason] += 1
        return UpdateRejected(reason, detail, client_id=device_id, round=self.round)

    def upload(self, device_id: str, round: int, base_version: int, upload_key: str,
               num_examples: int, delta: np.ndarray, now: float, *,
               metrics: Mapping[str, float] | None = None) -> UploadResult:
        """Accept a device's update into the queue, or refuse it with a reason.

        Checks, in this order (the first failure is the reason): ``not_selected`` (unknown or
        unselected device), ``wrong_round``, ``stale`` (``base_version`` is not the round's
        model version), ``bad_key`` (not the key of this device's task, or no task issued),
        then the retry rule, then ``late`` (``now >= deadline``, or the round closed; detail
        "target reached" once ``target`` updates are in), ``wrong_dtype`` (not an ndarray, or
        not float16/32/64), ``wrong_shape`` (not ``(dim,)``), ``non_finite``,
        ``norm_too_large`` (L2 norm > ``max_norm``), ``bad_weight`` (``num_examples`` not an
        int in ``[1, max_examples]``), ``bad_metrics`` (not str -> finite number).

        Retry rule: a device whose update was already accepted and that resends the same
        payload (same key, examples and delta bytes) gets its original :class:`UploadResult`
        back and nothing is counted twice -- *even after the round closed*, which is why this
        rule comes before ``late``: a device whose acceptance response was lost must not be
        told its counted update was late. A different payload is ``"duplicate"``. (A
        different key fails earlier as ``"bad_key"``: a device only ever holds one key.)

        The delta is copied (read-only) into the queue, so the caller may reuse its buffer.
        Reaching ``target`` closes the round.

        Returns:
            The acceptance (or, for a retry, the original one).

        Raises:
            UpdateRejected: with ``reason`` as above, ``client_id`` the device id and
                ``round`` this round. Tasks, accepted set and queue are then unchanged; only
                ``rejections[reason]`` grows by one.
        """
        now = _finite(now, "now")
        self.authenticate(device_id, round, base_version, upload_key)
        state = self._state[device_id]
        if state == _REPORTED:
            if _digest(num_examples, delta) == self._digest[device_id]:
                self._replays += 1
                return self._receipt[device_id]
            raise self._reject("duplicate", "an update from this device was already "
                               "accepted; this one differs", device_id)
        if not self._open(now):
            if self._closed_by == "target_reached":
                detail = "target reached"
            elif self._closed_by == "closed":
                detail = "round closed"
            else:
                detail = f"deadline {self.deadline} passed (now = {now})"
            raise self._reject("late", detail, device_id)
        self._check_delta(delta, device_id)
        if isinstance(num_examples, (bool, np.bool_)) \
                or not isinstance(num_examples, (int, np.integer)) \
                or not 1 <= num_examples <= self.max_examples:
            raise self._reject("bad_weight", f"num_examples must be an int in [1, "
                               f"{self.max_examples}], got {num_examples!r}", device_id)
        clean = self._check_metrics(metrics, device_id)

        # Accept: everything below succeeds, so a rejection above left no trace.
        copy = np.array(delta, copy=True)
        copy.flags.writeable = False
        cid = self._client_id[device_id]
        self._accepted += 1
        receipt = UploadResult(device_id=device_id, client_id=cid, round=self.round,
                               num_examples=int(num_examples), accepted_at=now,
                               position=self._accepted)
        self._queue.append(ClientUpdate(client_id=cid, delta=copy,
                                        num_examples=int(num_examples), metrics=clean))
        self._receipt[device_id] = receipt
        self._digest[device_id] = _digest(num_examples, copy)
        self._state[device_id] = _REPORTED
        if self._accepted >= self.target:
            self._closed_by = "target_reached"
        return receipt

    def authenticate(self, device_id: str, round: int, base_version: int, upload_key: str
                     ) -> int:
        """Check that a message comes from a tasked device of this round, trained from its
        model version, with its task's key; return the device's client id.

        The first checks of :meth:`upload` (``not_selected``, ``wrong_round``, ``stale``,
        ``bad_key``, in that order); a secure-aggregation round authenticates every protocol
        message with them. Raises :class:`UpdateRejected` (counted in ``rejections``).
        """
        state = self._state.get(device_id) if isinstance(device_id, str) else None
        if state is None:
            raise self._reject("not_selected", "device is not selected for this round",
                               device_id)
        if isinstance(round, bool) or round != self.round:
            raise self._reject("wrong_round", f"update is for round {round!r}, this is round "
                               f"{self.round}", device_id)
        if isinstance(base_version, bool) or base_version != self.model_version:
            raise self._reject("stale", f"trained from model version {base_version!r}, the "
                               f"round serves version {self.model_version}", device_id)
        task = self._task.get(device_id)
        if task is None or not isinstance(upload_key, str) \
                or not secrets.compare_digest(upload_key.encode(), task.upload_key.encode()):
            detail = "no task was issued to this device" if task is None else \
                "upload key does not match the device's task"
            raise self._reject("bad_key", detail, device_id)
        return self._client_id[device_id]

    @property
    def tasked(self) -> tuple[str, ...]:
        """Devices that received a task (in selection order)."""
        return tuple(d for d, st in self._state.items() if st != _SELECTED)

    def _check_delta(self, delta: object, device_id: str) -> None:
        if not isinstance(delta, np.ndarray):
            raise self._reject("wrong_dtype", f"delta must be a numpy.ndarray, got "
                               f"{type(delta).__name__}", device_id)
        if delta.dtype not in _DTYPES:
            raise self._reject("wrong_dtype", f"delta must be float16, float32 or float64, "
                               f"got {delta.dtype}", device_id)
        if delta.shape != (self.dim,):
            raise self._reject("wrong_shape", f"delta has shape {delta.shape}, expected "
                               f"({self.dim},)", device_id)
        finite = np.isfinite(delta)
        if not finite.all():
            first = int(np.argmin(finite))
            raise self._reject("non_finite", f"element {first} is {delta[first]}", device_id)
        if self.max_norm is not None:
            # float64 accumulation: squares of finite float32 values can overflow float32.
            norm = math.sqrt(float(np.einsum("i,i->", delta, delta, dtype=np.float64)))
            if norm > self.max_norm:
                raise self._reject("norm_too_large", f"L2 norm {norm:.6g} exceeds max_norm "
                                   f"= {self.max_norm}", device_id)

    def _check_metrics(self, metrics: Mapping[str, float] | None, device_id: str
                       ) -> Mapping[str, float]:
        if metrics is None:
            return MappingProxyType({})
        ok = isinstance(metrics, Mapping) and all(
            isinstance(k, str) and not isinstance(v, (bool, np.bool_))
            and isinstance(v, _REAL) and math.isfinite(v) for k, v in metrics.items())
        if not ok:
            raise self._reject("bad_metrics", "metrics must map names to finite numbers",
                               device_id)
        return MappingProxyType({k: float(v) for k, v in metrics.items()})

    # -- hand-over and closing ----------------------------------------------------------------

    def drain(self) -> list[ClientUpdate]:
        """Hand the accepted updates queued since the last drain to the caller, in acceptance
        order, and forget them (the round keeps only their receipts)."""
        out, self._queue = self._queue, []
        return out

    def close(self, now: float) -> RoundStatus:
        """Close the round early (operator stop, server shutdown); idempotent. Later uploads
        are ``"late"`` and check-ins ``"round_closed"``. Returns the status at ``now``."""
        now = _finite(now, "now")
        if self._closed_by is None and now < self.deadline:
            self._closed_by = "closed"
        return self.status(now)


def _digest(num_examples: object, delta: object) -> bytes:
    """A fingerprint of an upload's payload, to tell an idempotent retry from a new update."""
    h = hashlib.blake2b(digest_size=16)
    # np.int64(5) and 5 are the same weight: normalise before hashing.
    weight = int(num_examples) if isinstance(num_examples, (int, np.integer)) else num_examples
    h.update(repr(weight).encode())
    if isinstance(delta, np.ndarray):
        h.update(f"{delta.dtype.str}{delta.shape}".encode())
        h.update(np.ascontiguousarray(delta).data)
    else:
        h.update(repr(type(delta)).encode())
    return h.digest()
