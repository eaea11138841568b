"""The server side of one secure-aggregation round over pulling devices, sans-I/O.

A :class:`SecAggDeviceRound` runs the SecAgg / SecAgg+ server machine of
:mod:`shoal.privacy.secagg_server` (Bonawitz et al., CCS 2017; Bell et al., CCS 2020) over
devices that check in, as in Bonawitz et al., "Towards Federated Learning at Scale: System
Design" (MLSys 2019), whose Secure Aggregation runs in the round's phases:

1. **Roster.** Selected devices check in and receive a :class:`~shoal.device_task.Task`
   (with its one-time key) exactly as in a plain round. The roster closes when every selected
   device has a task or ``roster_wait_s`` has passed; it is the set of tasked devices.
2. **AdvertiseKeys, ShareKeys.** Each device fetches the ``RoundSetup``, advertises two
   public keys, receives its neighbours' keys and sends them encrypted Shamir shares. These
   stages last at most ``stage_timeout_s`` each; devices train while they run.
3. **MaskedInputCollection.** Devices that shared keys send their masked, fixed-point
   encoded update. The stage ends when every such device has reported, when ``target``
   inputs are in (over-selected stragglers are then dropouts whose masks are recovered), or
   at the round's deadline.
4. **Unmasking.** Survivors reveal shares; the server removes the masks and holds
   sum(w x), sum(w) over the included devices -- nothing about any single one.

Devices are the *pulling* side: every call is an :meth:`SecAggDeviceRound.exchange` that
optionally carries the device's message for the current stage and returns the device's next
server message, a :class:`Wait` (poll again) or an :class:`End`. A message is authenticated
with the task's key (the checks of :meth:`DeviceTask.authenticate`) and its sender must be
the device's own client id. A re-sent message for a stage the device already answered (a
retry after a lost reply) is answered like a poll and counted in ``replays``; it changes
nothing. Any other refusal raises :class:`~shoal.errors.UpdateRejected` with a reason and
leaves the round unchanged.

Time is the ``now`` argument and the caller decides when to call :meth:`tick`; nothing here
sleeps, reads a clock or opens a socket. Not thread-safe: serialise calls (one lock).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shoal.device_task import CheckInDecision, DeviceTask
from shoal.errors import ConfigError, ProtocolError, UpdateRejected
from shoal.events import PartialAggregate
from shoal.privacy import crypto
from shoal.privacy.rotation import rotation_seed
from shoal.privacy.secagg_driver import SecAggConfig
from shoal.privacy.secagg_encoding import ring_bytes
from shoal.privacy.secagg_messages import (
    ClientMessage,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    SecAggAborted,
    SecAggParams,
    ServerMessage,
    Stage,
    UnmaskingShares,
)
from shoal.privacy.secagg_server import SecAggServer
from shoal.privacy.secagg_session import SESSION_BYTES

__all__ = ["End", "SecAggDeviceRound", "SecAggStatus", "Wait"]

_ORDER = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING)
_STAGE_OF = {KeyAdvertisement: Stage.ADVERTISE_KEYS, EncryptedShares: Stage.SHARE_KEYS,
             MaskedInput: Stage.MASKED_INPUT, UnmaskingShares: Stage.UNMASKING}


@dataclass(frozen=True)
class Wait:
    """Nothing for this device yet: call again (``stage`` is what the round is collecting,
    or ``"roster"`` while devices still check in)."""

    stage: str


@dataclass(frozen=True)
class End:
    """The round is over for this device.

    Attributes:
        outcome: ``"done"`` (its input is in the sum), ``"dropped"`` (it missed a stage; its
            masks were or will be removed), ``"excluded"`` (not on the roster) or
            ``"aborted"`` (the round revealed nothing and was abandoned).
        detail: for people.
    """

    outcome: str
    detail: str = ""


@dataclass(frozen=True)
class SecAggStatus:
    """Where a secure round stands.

    Attributes:
        phase: ``"roster"``, ``"protocol"``, ``"done"`` or ``"aborted"``.
        stage: the protocol stage being collected (``None`` outside the protocol).
        roster: devices on the roster (0 before it closes).
        included: devices whose input is in the sum (known from MaskedInput on).
        done: ``phase`` is ``"done"`` or ``"aborted"``; commit: ``phase == "done"``.
        error: why the round was aborted ("" otherwise).
    """

    phase: str
    stage: Stage | None
    roster: int
    included: int
    done: bool
    commit: bool
    error: str


class SecAggDeviceRound:
    """One secure-aggregation round over pulling devices (see the module docstring).

    Args:
        task_id, round, model_version, selected, client_ids: as for
            :class:`~shoal.device_task.DeviceTask`.
        target: masked inputs after which input collection closes early (>= 1). Keep it
            above the threshold t: every included device needs t live neighbours among the
            included ones, or the round aborts (for the complete graph, target >= t + 1).
        min_accepted: fewest included devices for the round to commit; with fewer masked
            inputs the round aborts *before* unmasking, so nothing is revealed.
        opened_at: when the task was sent (seconds).
        input_deadline: when masked-input collection closes at the latest (the carrier
            leaves the unmasking stage time before the coordinator's deadline); ``inf``
            waits for every device of the roster.
        dim: model length d (the ring vector has d + 1 entries: w x, then w).
        config_for: k, t and the encoding for a roster of n devices
            (e.g. :meth:`~shoal.privacy.secagg_rounds.SecAggAggregation.config_for`).
        roster_wait_s: longest wait for selected devices to check in (> 0).
        stage_timeout_s: length of the AdvertiseKeys, ShareKeys and Unmasking stages (> 0);
            input collection runs to ``input_deadline`` (at least this long).
        checkin_interval_s, retry_spread_s: ComeBack jitter, as for ``DeviceTask``.
        clip_norm: devices clip their update to this L2 norm and weigh it 1 before masking
            (central DP: the server only sees the sum), as for ``DeviceTask``.

    Raises:
        ConfigError: an argument out of range (the message names it).
    """

    def __init__(self, task_id: int, round: int, model_version: int, selected: Sequence[str],
                 *, target: int, min_accepted: int, opened_at: float, input_deadline: float,
                 dim: int, config_for: Callable[[int], SecAggConfig],
                 roster_wait_s: float, stage_timeout_s: float,
                 client_ids: Sequence[int] | None = None, checkin_interval_s: float = 10.0,
                 retry_spread_s: float = 10.0, clip_norm: float | None = None) -> None:
        self._devices = DeviceTask(task_id, round, model_version, selected,
                                   client_ids=client_ids, checkin_interval_s=checkin_interval_s,
                                   retry_spread_s=retry_spread_s, clip_norm=clip_norm)
        self.clip_norm = self._devices.clip_norm
        for name, value in (("target", target), ("min_accepted", min_accepted), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}", key=name)
        for name, seconds in (("roster_wait_s", roster_wait_s),
                              ("stage_timeout_s", stage_timeout_s)):
            if not (isinstance(seconds, (int, float)) and math.isfinite(seconds)
                    and seconds > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {seconds!r}",
                                  key=name)
        if not (isinstance(opened_at, (int, float)) and math.isfinite(opened_at)):
            raise ConfigError(f"opened_at must be a finite number, got {opened_at!r}",
                              key="opened_at")
        if not isinstance(input_deadline, (int, float)) or math.isnan(input_deadline):
            raise ConfigError(f"input_deadline must be a number, got {input_deadline!r}",
                              key="input_deadline")
        self.task_id = self._devices.task_id
        self.round = self._devices.round
        self.model_version = self._devices.model_version
        self.dim = dim
        self.target = target
        self.min_accepted = min_accepted
        self.config_for = config_for
        self.roster_deadline = float(opened_at) + roster_wait_s
        self.deadline = float(input_deadline)
        self.stage_timeout_s = float(stage_timeout_s)
        self.phase = "roster"
        self.config: SecAggConfig | None = None
        self.params: SecAggParams | None = None
        self.server: SecAggServer | None = None
        self.error = ""
        self.roster: tuple[int, ...] = ()
        self.stage_deadline = self.roster_deadline
        self._outbox: dict[int, ServerMessage] = {}
        self._answered: dict[int, int] = {}  # client id -> index in _ORDER of its last answer
        self._rejections: Counter[str] = Counter()
        self.replays = 0
        self.dropped_at: Counter[str] = Counter()  # stage -> devices that missed it

    # -- queries ------------------------------------------------------------------------------

    @property
    def rejections(self) -> dict[str, int]:
        """reason -> refused messages (those of the check-in round included)."""
        out = Counter(self._devices.rejections)
        out.update(self._rejections)
        return dict(out)

    @property
    def selected(self) -> tuple[str, ...]:
        return self._devices.selected

    def device_id(self, client_id: int) -> str:
        return self._devices.device_id(client_id)

    def client_id(self, device_id: str) -> int:
        """The client id (protocol identity) of a selected device (KeyError otherwise)."""
        return self._devices.client_id(device_id)

    def status(self, now: float | None = None) -> SecAggStatus:
        """Where the round stands (``now`` is accepted for symmetry with
        :meth:`DeviceTask.is_open <shoal.device_task.DeviceTask.is_open>`; the state changes
        only in :meth:`tick`)."""
        included = len(self.server.included) if self.server is not None else 0
        return SecAggStatus(
            phase=self.phase,
            stage=self.server.stage if self.phase == "protocol" and self.server else None,
            roster=len(self.roster), included=included,
            done=self.phase in ("done", "aborted"), commit=self.phase == "done",
            error=self.error)

    def result(self) -> tuple[np.ndarray, frozenset[int]]:
        """``(sum of the included ring vectors mod 2^b, included client ids)``.

        Raises:
            ProtocolError: the round has not finished successfully.
        """
        if self.phase != "done" or self.server is None:
            raise ProtocolError(f"no result: the round is {self.phase}")
        return self.server.aggregate, self.server.included

    def partial(self, metrics: Mapping[str, float] | None = None) -> PartialAggregate:
        """The finished round as the coordinator's arrival: the decoded weighted mean of the
        included devices' updates, its weight, and what to record (included, dropped by
        stage, the SecAgg+ parameters; plus ``metrics``, e.g. the bytes moved).

        Raises:
            ProtocolError: the round has not finished successfully.
        """
        total, included = self.result()
        assert self.config is not None and self.params is not None
        mean, weight = self.config.encoding.decode(total)
        extra = {}
        if self.config.encoding.noised:
            # each included device added its noise share before masking (distributed DP)
            extra["ddg_noise_shares"] = float(len(included))
        return PartialAggregate(
            delta=mean.astype(np.float32), num_examples=weight, clients=len(included),
            metrics={"secagg_included": float(len(included)),
                     "secagg_dropped": float(len(self.roster) - len(included)),
                     "secagg_neighbours": float(self.params.neighbours),
                     "secagg_threshold": float(self.params.threshold),
                     "secagg_ring_bits": float(self.params.bits),
                     "secagg_upload_bytes": float(ring_bytes(self.params.bits)
                                                  * self.params.length),
                     **extra,
                     **{f"secagg_dropped_at_{stage}": float(n)
                        for stage, n in self.dropped_at.items()},
                     **(metrics or {})},
            base_version=self.model_version, clip_norm=self.clip_norm)

    # -- device calls -------------------------------------------------------------------------

    def check_in(self, device_id: str, now: float, *, rng: np.random.Generator
                 ) -> CheckInDecision:
        """A device's check-in: a task while the roster is open, else a ComeBack."""
        return self._devices.check_in(device_id, now, rng=rng)

    def exchange(self, device_id: str, round: int, base_version: int, upload_key: str,
                 message: ClientMessage | None, now: float) -> ServerMessage | Wait | End:
        """Take a device's message for the current stage (``None`` = just poll) and return
        its next server message, a :class:`Wait` or an :class:`End`.

        Raises:
            UpdateRejected: ``not_selected``, ``wrong_round``, ``stale``, ``bad_key`` (see
                :meth:`DeviceTask.authenticate`), ``wrong_sender`` (the message names
                another client), ``late`` (its stage has closed), ``wrong_stage`` (a message
                for a stage the round has not reached), ``dropped`` (the device missed an earlier stage) or
                ``protocol`` (the server machine refused it: malformed, wrong session,
                wrong recipients). The round is then unchanged.
        """
        cid = self._devices.authenticate(device_id, round, base_version, upload_key)
        if message is not None and self.phase == "protocol":
            self._take(device_id, cid, message)
        elif message is not None:
            raise self._reject("wrong_stage", f"the round is in its {self.phase} phase and "
                               f"takes no {type(message).__name__}", device_id)
        return self._reply(cid)

    def _take(self, device_id: str, cid: int, message: ClientMessage) -> None:
        assert self.server is not None
        if getattr(message, "sender", None) != cid:
            raise self._reject("wrong_sender", f"message names client "
                               f"{getattr(message, 'sender', None)!r}, the device is {cid}",
                               device_id)
        kind = _ORDER.index(_STAGE_OF[type(message)])
        if self._answered.get(cid, -1) >= kind:
            self.replays += 1  # a retry after a lost reply: answer it like a poll
            return
        stage = self.server.stage
        if stage in _ORDER and kind < _ORDER.index(stage):
            raise self._reject("late", f"{type(message).__name__} arrived after stage "
                               f"{_ORDER[kind].value} closed", device_id)
        if stage not in _ORDER or _ORDER[kind] is not stage:
            raise self._reject("wrong_stage", f"{type(message).__name__} is for stage "
                               f"{_ORDER[kind].value}; the round is at "
                               f"{stage.value}", device_id)
        if cid not in self._outbox:
            raise self._reject("dropped", "the device missed an earlier stage and is out of "
                               "this round", device_id)
        try:
            self.server.receive(message)
        except ProtocolError as exc:
            raise self._reject("protocol", str(exc), device_id) from None
        self._answered[cid] = kind

    def _reply(self, cid: int) -> ServerMessage | Wait | End:
        if self.phase == "roster":
            return Wait("roster")
        if self.phase == "aborted":
            return End("aborted", self.error)
        if cid not in self.roster:
            return End("excluded", "the device checked in after the roster closed")
        assert self.server is not None
        if self.phase == "done":
            if cid in self.server.included:
                return End("done", "the input is in the sum")
            return End("dropped", "the input did not arrive in time; its masks were removed")
        stage = self.server.stage
        if cid not in self._outbox:
            return End("dropped", f"the device missed a stage before {stage.value}")
        if self._answered.get(cid, -1) < _ORDER.index(stage):
            return self._outbox[cid]
        return Wait(stage.value)

    def _reject(self, reason: str, detail: str, device_id: str) -> UpdateRejected:
        self._rejections[reason] += 1
        return UpdateRejected(reason, detail, client_id=device_id, round=self.round)

    # -- driving ------------------------------------------------------------------------------

    def tick(self, now: float) -> bool:
        """Close the roster or the current stage if it is complete or its time is up.

        Returns whether anything changed (devices waiting on a ``Wait`` may have a message).
        Aborting (too few devices, or too few live neighbours for a threshold) ends the
        round without revealing anything; :meth:`status` says why.
        """
        if self.phase == "roster":
            if now >= self.roster_deadline or len(self._devices.tasked) == len(self.selected):
                self._start(now)
                return True
            return False
        if self.phase != "protocol":
            return False
        assert self.server is not None
        stage = self.server.stage
        k = _ORDER.index(stage)
        waiting = [c for c in self._outbox if self._answered.get(c, -1) < k]
        complete = not waiting or (stage is Stage.MASKED_INPUT
                                   and len(self.server.included) >= self.target)
        if not complete and now < self.stage_deadline:
            return False
        self.dropped_at[stage.value] += len(waiting)
        if stage is Stage.MASKED_INPUT and len(self.server.included) < self.min_accepted:
            self._abort(f"only {len(self.server.included)} masked inputs arrived; the round "
                        f"needs {self.min_accepted} (nothing was unmasked)")
            return True
        try:
            self._outbox = dict(self.server.advance())
        except SecAggAborted as exc:
            self._abort(str(exc))
            return True
        if self.server.stage is Stage.DONE:
            self.phase = "done"
            self._outbox = {}
        elif self.server.stage is Stage.MASKED_INPUT:
            self.stage_deadline = max(self.deadline, now + self.stage_timeout_s)
        else:
            self.stage_deadline = now + self.stage_timeout_s
        return True

    def _start(self, now: float) -> None:
        self._devices.close("roster closed")  # no more tasks: the roster is fixed
        tasked = self._devices.tasked
        self.roster = tuple(sorted(self._devices.client_id(d) for d in tasked))
        n = len(self.roster)
        if n < max(self.min_accepted, 3):
            self._abort(f"only {n} of {len(self.selected)} selected devices checked in; the "
                        f"round needs {max(self.min_accepted, 3)}")
            return
        # the session nonce is drawn here so that a rotated encoding's seed can follow it:
        # every device derives the same rotation from the setup, with no extra message
        session = crypto.random_bytes(SESSION_BYTES)
        try:
            self.config = self.config_for(n).bind(self.dim, n, rotation_seed(session))
            self.params = self.config.params_for(n, self.dim)
            self.server = SecAggServer(self.params, self.roster, session=session,
                                       min_inputs=self.config.min_inputs)
        except ConfigError as exc:
            self._abort(f"no secure-aggregation parameters for {n} devices: {exc}")
            return
        setup = self.server.setup()
        self._outbox = dict.fromkeys(self.roster, setup)
        self.phase = "protocol"
        self.stage_deadline = now + self.stage_timeout_s

    def _abort(self, why: str) -> None:
        self.phase = "aborted"
        self.error = why
        self.server = None  # drops every share and the masked sum: nothing is revealed
        self._outbox = {}

    def close(self, reason: str = "closed") -> SecAggStatus:
        """Stop the round (the coordinator closed its task, or the server shuts down); an
        unfinished round is aborted and reveals nothing."""
        self._devices.close(reason)
        if self.phase in ("roster", "protocol"):
            self._abort(f"the round was closed before it finished ({reason})")
        return self.status()

