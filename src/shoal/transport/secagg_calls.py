"""The aggregator's secure-aggregation calls: ``SecAgg`` (a masked input, streamed) and
``SecAggStep`` (keys, shares, unmasking, polls).

:class:`SecAggCalls` is the part of :class:`~shoal.transport.server.AggregatorService` that
speaks the wire form of SecAgg+ (:mod:`shoal.transport.secagg_wire`): it hands each device
message to the run's secure session (:class:`~shoal.device_secagg.SecAggDeviceRound`,
through the gateway) and holds a reply that has nothing for the device yet as a long poll,
woken when the round makes progress (:meth:`SecAggCalls.wake`). Who may call, and the
masked input's stream (one per device, bounded by the ring vector's size, idle callers cut)
are the service's, as for uploads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from shoal.device_secagg import SecAggDeviceRound, Wait
from shoal.errors import ProtocolError, UpdateRejected
from shoal.privacy.secagg_encoding import unpack_ring
from shoal.transport.inbound import Refusal
from shoal.transport.proto import shoal_pb2 as pb
from shoal.transport.secagg_wire import message_from_header, reply_to_pb

if TYPE_CHECKING:
    from shoal.gateway import DeviceGateway
    from shoal.observers import CarrierObserver
    from shoal.transport.settings import AggregatorSettings

__all__ = ["SecAggCalls"]


def _declared(header: Any) -> tuple[int, bytes | None]:
    """A SecAgg header's ``(payload bytes, SHA-256)``: only a masked input carries data."""
    if header.WhichOneof("body") == "masked":
        return header.masked.total_size, header.masked.sha256
    return 0, None


class SecAggCalls:
    """The secure-aggregation handlers of :class:`~shoal.transport.server.AggregatorService`
    (a mixin: it uses the service's gateway, settings, metrics and refusals)."""

    _loop: asyncio.AbstractEventLoop | None = None
    _progress: asyncio.Event | None = None

    # provided by AggregatorService
    settings: AggregatorSettings
    dim: int
    gateway: DeviceGateway | None
    metrics: CarrierObserver
    clock: Callable[[], float]
    _authorize: Callable[[Any, str | None, str], Awaitable[str]]
    _stream_in: Callable[[Any, Any, int, Callable[[Any], tuple[int, bytes | None]]],
                         Awaitable[tuple[Any, bytearray, int]]]
    _refuse: Callable[..., pb.UploadReply]

    async def SecAgg(self, request_iterator: Any, context: Any
                     ) -> pb.SecAggReply:
        """One step of a secure-aggregation round (see :mod:`shoal.device_secagg`)."""
        try:
            header, buf, size = await self._stream_in(request_iterator, context,
                                                      (self.dim + 1) * 8, _declared)
        except Refusal as exc:
            return self._secagg_refuse(exc.reason, exc.detail)
        return await self._secagg(header, buf, size)

    async def SecAggStep(self, request: Any, context: Any
                         ) -> pb.SecAggReply:
        """:meth:`SecAgg` for a message without a payload (unary)."""
        await self._authorize(context, request.device_id, "upload")
        if request.WhichOneof("body") == "masked":
            return self._secagg_refuse("malformed", "a masked input needs the SecAgg stream")
        return await self._secagg(request, b"", request.ByteSize())

    async def _secagg(self, header: Any, buf: bytes | bytearray,
                      size: int) -> pb.SecAggReply:
        gateway = self.gateway
        rnd = gateway.secure_session(header.device_id, int(header.round)) if gateway else None
        if gateway is None or rnd is None:
            return self._secagg_refuse("late", "no secure-aggregation round is open")
        gateway.received(rnd, size)
        masked = None
        if header.WhichOneof("body") == "masked":
            params = rnd.params
            if params is None:
                return self._secagg_refuse("wrong_stage", "the protocol has not started")
            try:
                masked = unpack_ring(buf, params.bits, params.length)
            except ProtocolError as exc:
                return self._secagg_refuse("wrong_shape", str(exc))
        reply, cid = self._secagg_step(rnd, header, masked)
        # The reply is held until there is something for the device (long poll, woken by
        # the round's progress), saving the device a poll per stage -- except the reply to
        # its encrypted shares, which returns at once so that it trains while the stage
        # closes.
        if header.WhichOneof("body") != "shares":
            loop = asyncio.get_running_loop()
            until = loop.time() + max(self.settings.long_poll_s, 0.05)
            poll = pb.SecAggHeader(device_id=header.device_id, round=header.round,
                                   base_version=header.base_version,
                                   upload_key=header.upload_key, poll=True)
            while isinstance(reply, Wait) and loop.time() < until:
                if self._progress is None:
                    self._loop, self._progress = loop, asyncio.Event()
                try:
                    await asyncio.wait_for(self._progress.wait(),
                                           timeout=min(0.25, until - loop.time()))
                except asyncio.TimeoutError:
                    pass
                reply, cid = self._secagg_step(rnd, poll, None)
        if isinstance(reply, pb.SecAggReply):
            return reply
        out = reply_to_pb(reply, client_id=cid,
                          encoding=rnd.config.encoding if rnd.config else None)
        gateway.served(out.ByteSize())
        self.metrics.bytes_moved("down", out.ByteSize())
        return out

    def _secagg_step(self, rnd: SecAggDeviceRound, header: Any,
                     masked: Any) -> tuple[Any, int]:
        """Hand one device message (or poll) to its session; returns ``(reply, the
        device's client id)`` or ``(refusal, -1)``."""
        rnd_no = int(header.round)
        assert self.gateway is not None
        # the sender is the authenticated device itself: messages on the wire name no one
        try:
            cid = rnd.client_id(header.device_id)
        except KeyError:  # not selected: the session refuses it with its reason
            cid = -1
        try:
            session = rnd.server.session if rnd.server is not None else b""
            message = message_from_header(header, cid, session, masked)
            reply = self.gateway.secure_step(rnd, header.device_id, rnd_no,
                                             int(header.base_version), header.upload_key,
                                             message, self.clock())
        except UpdateRejected as exc:
            return self._secagg_refuse(exc.reason, str(exc), header.device_id, rnd_no,
                                       counted=True), -1
        except ProtocolError as exc:
            return self._secagg_refuse("malformed", str(exc), header.device_id, rnd_no), -1
        return reply, cid

    def wake(self) -> None:
        """Wake the held secure-aggregation polls (thread-safe; the round made progress)."""
        loop, event = self._loop, self._progress
        if loop is not None and event is not None and not loop.is_closed():
            def swap() -> None:
                event.set()
                if self._progress is event:
                    self._progress = asyncio.Event()
            loop.call_soon_threadsafe(swap)

    def _secagg_refuse(self, reason: str, detail: str, device: str = "",
                       rnd: int = -1, *, counted: bool = False) -> pb.SecAggReply:
        return pb.SecAggReply(refused=self._refuse(reason, detail, device, rnd,
                                                   counted=counted))
