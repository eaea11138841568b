"""The secure-aggregation calls of :class:`~shoal.gateway.DeviceGateway`: SecAgg+ messages
and CKKS uploads handed to their round's session, and a finished secure round turned into
one coordinator event (its sum as a ``PartialAggregate``, or an abandoned task).

A mixin, like :class:`~shoal.device_eval.EvalDesk`: it uses the gateway's lock, sessions,
counters and coordinator; every public method takes the gateway's lock.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

from shoal.coordinator import Coordinator
from shoal.device_ckks import CkksDeviceRound
from shoal.device_secagg import End, SecAggDeviceRound, Wait
from shoal.device_sessions import Session, SessionBook
from shoal.errors import PrivacyError, UpdateRejected
from shoal.events import Command, TaskEnded, UpdatesArrived
from shoal.privacy.secagg_messages import ClientMessage, ServerMessage

__all__ = ["SecureDesk"]

log = logging.getLogger("shoal.aggregator")


class SecureDesk:
    """Secure-aggregation sessions behind the gateway (see the module docstring)."""

    # provided by DeviceGateway
    lock: threading.RLock
    changed: threading.Condition
    sessions: SessionBook
    _received: Counter[int]
    _served: int
    _fed: set[int]
    _running: Callable[[], Coordinator]
    _carry: Callable[[list[Command], float], None]
    _count: Callable[[UpdateRejected, int, float], UpdateRejected]
    _outcome: Callable[[str, Session, str, float], None]

    def secure_session(self, device_id: str, round: int) -> SecAggDeviceRound | None:
        """The secure-aggregation session ``device_id`` takes part in for ``round`` (open or
        recently finished), if any."""
        with self.lock:
            return self.sessions.secure(device_id, round)

    def secure_step(self, session: SecAggDeviceRound, device_id: str, round: int,
                    base_version: int, upload_key: str, message: ClientMessage | None,
                    now: float) -> ServerMessage | Wait | End:
        """Hand one secure-aggregation message (or poll: ``None``) to its session; returns
        the device's next server message, a ``Wait`` or an ``End``.

        Raises:
            UpdateRejected: the session's reason.
        """
        with self.changed:
            try:
                reply = session.exchange(device_id, round, base_version, upload_key, message,
                                         now)
            except UpdateRejected as exc:
                raise self._count(exc, session.task_id, now)
            if message is not None:
                self.changed.notify_all()
            return reply

    def ckks_upload(self, device_id: str, round: int, base_version: int, upload_key: str,
                    key_id: bytes, ciphertexts: Sequence[bytes], now: float, *,
                    upload_bytes: int = 0) -> None:
        """A device's ciphertexts for its CKKS round, folded into the round's sum (a
        repeated upload of a device already in the sum changes nothing).

        Raises:
            UpdateRejected: the session's reason (``not_selected`` when the device's task is
                not a CKKS round); nothing changed.
        """
        with self.changed:
            s = self.sessions.answering(device_id, round)
            if not isinstance(s, CkksDeviceRound):
                raise self._count(UpdateRejected(
                    "not_selected", "the device has no CKKS task for this round",
                    client_id=device_id, round=round), -1 if s is None else s.task_id, now)
            try:
                if s.upload(device_id, round, base_version, upload_key, key_id, ciphertexts,
                            now):
                    self._received[s.task_id] += int(upload_bytes)
            except UpdateRejected as exc:
                self._outcome(device_id, s, "late" if exc.reason == "late"
                              else f"rejected:{exc.reason}", now)
                raise self._count(exc, s.task_id, now) from None
            self.changed.notify_all()  # target reached: the driver's tick closes the round

    def received(self, session: SecAggDeviceRound, nbytes: int) -> None:
        """Count ``nbytes`` of secure-aggregation messages received for ``session``."""
        with self.lock:
            self._received[session.task_id] += int(nbytes)

    def _secure_done(self, tid: int, s: SecAggDeviceRound | CkksDeviceRound, now: float
                     ) -> None:
        self._fed.add(tid)
        status = s.status()
        roster = sorted(s.device_id(c) for c in s.roster)
        fields = {"event": "secure_round_closed", "task": tid, "round": s.round,
                  "commit": status.commit, "roster": len(roster),
                  "dropped_at": dict(s.dropped_at)}
        part = None
        if status.commit:
            served, self._served = self._served, 0
            try:  # a CKKS round's key holder decrypts here; it may refuse
                part = s.partial({"upload_bytes": float(self._received.pop(tid, 0)),
                                  "download_bytes": float(served)})
            except PrivacyError as exc:
                status = replace(status, commit=False,
                                 error=f"the key holder refused: {exc}")
        if part is not None:
            inside = sorted(s.device_id(c) for c in s.result()[1])
            for d in roster:
                self._outcome(d, s, "accepted" if d in inside else "dropped", now)
            log.info("secure round %d committed: %d of %d devices included", s.round,
                     len(inside), len(roster), extra={"fields": {**fields, "included": inside}})
            self._carry(self._running().handle(UpdatesArrived(tid, part, now)), now)
        else:
            log.warning("secure round %d abandoned: %s", s.round, status.error,
                        extra={"fields": {**fields, "error": status.error}})
            for d in roster:
                self._outcome(d, s, "dropped", now)
            self._carry(self._running().handle(
                TaskEnded(tid, now, abandoned=True,
                          detail=f"secure aggregation: {status.error}")), now)
