"""The aggregator's gRPC front end: authenticated device calls in, the gateway behind them.

Devices pull (see ``proto/shoal.proto``): they say Hello, check in, download the model in
chunks, train and upload in chunks. :class:`AggregatorService` answers them on a ``grpc.aio``
server running in a background thread. It holds no round rule: every check-in, upload and
secure-aggregation message goes to the run's :class:`~shoal.gateway.DeviceGateway`, whose
coordinator (policy and pipeline) decides -- the same engine the simulator drives.
:class:`~shoal.transport.carrier.GrpcCarrier` attaches a gateway for a run.

This module does what only a network server must: TLS (``shoal certs``) and a device token
on every call (``shoal enroll``) whose subject is the device the call claims to be; per-device
rate limits; a cap on upload size checked before the upload is read; reassembly of chunked
streams with their length and SHA-256 checked; decoding with the codec chain the task
announced (:func:`~shoal.transport.downloads.decode_upload`); serving downloads (full or
delta, :class:`~shoal.transport.downloads.ModelPublisher`); and metrics through a
:class:`~shoal.observers.CarrierObserver`. Refused calls are answered with their reason.

Only this module, ``shoal.transport.carrier`` and ``shoal.transport.client`` import the
generated protobuf code.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from shoal.device_secagg import SecAggDeviceRound, Wait
from shoal.device_task import ComeBack, Task
from shoal.gateway import DeviceGateway
from shoal.errors import CodecError, ConfigError, ProtocolError, UpdateRejected
from shoal.observers import CarrierObserver
from shoal.privacy.secagg_encoding import unpack_ring
from shoal.registry.base import RegistryError, UnknownDevice
from shoal.transport.auth import Keyring, RateLimiter
from shoal.transport.downloads import ModelPublisher, decode_upload
from shoal.transport.proto import shoal_pb2 as pb
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc
from shoal.transport.revocation import RevocationFile
from shoal.transport.gate import CallGate, CallRefused
from shoal.transport.secagg_wire import message_from_header, reply_to_pb

__all__ = ["AggregatorService", "AggregatorSettings", "serve"]

log = logging.getLogger("shoal.aggregator")

_STATUS = {"unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
           "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
           "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass(frozen=True)
class AggregatorSettings:
    """How the aggregator treats devices (the round rules are the coordinator's policy).

    Attributes:
        max_update_bytes: uploads larger than this are refused before they are read.
        chunk_size: bytes per download chunk.
        rate_per_s, burst: per-device token bucket over all calls.
        idle_retry_s: how far ahead a device is told to come back when no task is open
            (jittered over this window).
        checkin_interval_s: devices the open task does not need (not selected, already
            reported) come back within [0.5, 1.5] x this. Raise it for large populations
            (pace steering spreads their check-ins over the window).
        max_active_uploads: uploads read at once; the rest wait (HTTP/2 flow control holds
            their bytes on the devices), so the server's memory stays flat however many
            devices upload together.
        roster_wait_s: secure aggregation: longest wait for the selected devices to check in
            before the roster closes.
        stage_timeout_s: secure aggregation: length of the key and unmasking stages (input
            collection ends this long before the round's deadline).
        long_poll_s: a secure-aggregation call that has nothing for the device yet is held
            this long before it is answered "wait".
        upload_codec: the codec chain devices encode updates with, in the config's spelling
            (``compression.upload``; ``""`` or ``"none"`` = raw float32); an upload made with
            another chain is refused (``wrong_codec``).
        error_feedback: devices keep what compression dropped and add it to their next
            update (``compression.error_feedback``).
        download_codec: lossless chain for downloads (``compression.download_codec``).
        delta_downloads: send a device holding an older kept version the exact delta when it
            is smaller (``compression.download = "delta"``).
        keep_versions: versions kept besides the current one, as delta bases and for tasks
            still naming them.
    """

    max_update_bytes: int = 64 << 20
    chunk_size: int = 256 << 10
    rate_per_s: float = 20.0
    burst: float = 40.0
    idle_retry_s: float = 2.0
    checkin_interval_s: float = 5.0
    max_active_uploads: int = 64
    roster_wait_s: float = 15.0
    stage_timeout_s: float = 10.0
    long_poll_s: float = 2.0
    upload_codec: str = ""
    error_feedback: bool = False
    download_codec: str = "none"
    delta_downloads: bool = False
    keep_versions: int = 4


class _Refusal(Exception):
    """A call refused before it reached a round: a machine-readable reason and a detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class AggregatorService(pb_grpc.AggregatorServicer):
    """The gRPC handlers. Thread model: handlers run on the server's event loop; the run's
    :attr:`gateway` serialises them under its lock.

    Args:
        settings: device-facing limits.
        keyring: token keys (``Keyring.single(load_or_create_secret(path))``).
        dim: model length (uploads of another length are refused).
        spec_fingerprint: sent with every task so devices can check their model.
        registry_factory: opens the client registry (devices, attributes, outcomes).
        clock: seconds since the epoch (the devices' deadlines are on it).
        revocations: revoked tokens, refused with reason ``revoked`` (re-read when the file
            changes).
        metrics: told about refused calls, check-ins, bytes and active uploads (e.g. a
            :class:`~shoal.telemetry.PrometheusObserver`, also given to the coordinator).
    """

    def __init__(self, settings: AggregatorSettings, keyring: Keyring, dim: int,
                 spec_fingerprint: str, registry_factory: Callable[[], object],
                 clock: Callable[[], float] = time.time, server_id: str = "shoal",
                 revocations: RevocationFile | None = None,
                 metrics: CarrierObserver | None = None) -> None:
        from shoal.codec import Chain

        self.settings = settings
        self.keyring = keyring
        self.dim = dim
        self.spec_fingerprint = spec_fingerprint
        self.registry_factory = registry_factory
        self._registry = None
        self.clock = clock
        self.server_id = server_id
        self.metrics = metrics if metrics is not None else CarrierObserver()
        self.gateway: DeviceGateway | None = None  # the run's gateway (GrpcCarrier attaches it)
        self.upload_codec = "" if settings.upload_codec in ("", "none") \
            else settings.upload_codec
        Chain.parse(self.upload_codec, key="compression.upload")  # refuse a bad chain now
        self.publisher = ModelPublisher(Chain.parse(
            "" if settings.download_codec == "none" else settings.download_codec,
            key="compression.download_codec"), settings.keep_versions,
            deltas=settings.delta_downloads)
        self.gate = CallGate(keyring, RateLimiter(settings.rate_per_s, settings.burst),
                             revocations=revocations, metrics=self.metrics)
        self.evaluations: list[tuple[str, int, dict[str, float]]] = []
        self.lock = threading.Lock()  # guards evaluations and the publisher's versions
        self._upload_slots: asyncio.Semaphore | None = None
        # secure-aggregation long polls wait on this; wake() swaps it for a fresh one
        self._loop: asyncio.AbstractEventLoop | None = None
        self._progress: asyncio.Event | None = None
        self.revocations = revocations

    @property
    def registry(self):
        if self._registry is None:
            self._registry = self.registry_factory()
        return self._registry

    def publish(self, version: int, params) -> None:
        """Make ``params`` downloadable as ``version`` (the gateway calls it when a task
        trains from a version newer than any published)."""
        with self.lock:
            if self.publisher.version is None or version > self.publisher.version:
                self.publisher.publish(version, params)

    def flush_outcomes(self) -> None:
        """Write the gateway's device outcomes to the registry (participation, fairness).

        An outcome the registry refuses (the device was removed, the file cannot be
        written) is lost, never silently: it is logged at ERROR as ``registry_error`` with
        the device, the round, the task, the outcome and the reason (with a traceback when
        the error is not the registry's own), and the other outcomes are still written. A
        device's call never fails on this bookkeeping.
        """
        gateway = self.gateway
        if gateway is None:
            return
        for o in gateway.take_outcomes():
            try:
                self.registry.record_outcome(o.device_id, o.round, o.outcome, now=o.now)
            except Exception as exc:
                log.error("registry: could not record %s for device %s in round %d: %s",
                          o.outcome, o.device_id, o.round, exc,
                          exc_info=not isinstance(exc, RegistryError),
                          extra={"fields": {"event": "registry_error", "device": o.device_id,
                                            "round": o.round, "task": o.task_id,
                                            "outcome": o.outcome, "error": str(exc)}})

    # -- helpers ---------------------------------------------------------------------------

    async def _authorize(self, context: grpc.aio.ServicerContext, device_id: str | None,
                         scope: str) -> str:
        """The gate's checks (:class:`~shoal.transport.gate.CallGate`) on this call; abort it
        with the gate's status otherwise. Returns the token's device."""
        pems = (context.auth_context() or {}).get("x509_pem_cert") or [b""]
        try:
            return self.gate.check(context.invocation_metadata() or (), pems[0], device_id,
                                   scope, self.clock())
        except CallRefused as exc:
            await context.abort(_STATUS[exc.status], str(exc))
            raise  # abort raises; this line is never reached

    # -- handlers --------------------------------------------------------------------------

    async def Hello(self, request, context):
        await self._authorize(context, request.device_id, "checkin")
        now = self.clock()
        self.registry.enroll(request.device_id, now=now, attributes=dict(request.attributes),
                             capabilities=dict(request.capabilities),
                             windows=[(w.start_minute, w.end_minute) for w in request.windows])
        return pb.HelloReply(server_id=self.server_id,
                             model_version=self.publisher.version or 0, server_time=now)

    async def CheckIn(self, request, context):
        await self._authorize(context, request.device_id, "checkin")
        now = self.clock()
        self._seen(request.device_id, now)
        gateway = self.gateway
        if gateway is None:
            decision: Task | ComeBack = ComeBack(now + self.settings.idle_retry_s, "no_round")
            kind, settings = "train", {}
        else:
            decision, kind, settings = gateway.check_in(request.device_id, now)
        if isinstance(decision, Task):
            self.metrics.checked_in("task")
            return pb.CheckInReply(task=pb.Task(
                round=decision.round, model_version=decision.model_version,
                upload_key=decision.upload_key, deadline=decision.deadline, settings=settings,
                spec_fingerprint=self.spec_fingerprint, kind=kind,
                upload_codec=self.upload_codec if kind == "train" else "",
                error_feedback=self.settings.error_feedback and kind == "train",
                clip_norm=decision.clip_norm or 0.0))
        self.metrics.checked_in(decision.reason)
        return pb.CheckInReply(come_back=pb.ComeBack(at=decision.at, reason=decision.reason))

    async def Download(self, request, context):
        # the model is public to enrolled devices: any valid token may download it
        await self._authorize(context, None, "checkin")
        try:
            with self.lock:
                model = self.publisher.payload(int(request.version), int(request.base_version))
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        size = max(1, min(int(request.chunk_size or self.settings.chunk_size),
                          self.settings.chunk_size))
        total = len(model.blob)
        for off in range(0, total, size):
            yield pb.ModelChunk(version=model.version, base_version=model.base_version,
                                total_size=total, sha256=model.sha256 if off == 0 else b"",
                                offset=off, data=model.blob[off:off + size])
        self.metrics.bytes_moved("down", total)
        if self.gateway is not None:
            self.gateway.served(total)

    async def Upload(self, request_iterator, context):
        if self._upload_slots is None:  # created on the server's event loop
            self._upload_slots = asyncio.Semaphore(self.settings.max_active_uploads)
        async with self._upload_slots:
            return await self._upload(request_iterator, context)

    async def _upload(self, request_iterator, context):
        self.metrics.uploads_active(1)
        try:
            header, buf, _ = await self._receive(
                request_iterator, context, self.settings.max_update_bytes,
                lambda h: (h.total_size, h.sha256))
        except _Refusal as exc:
            return self._refuse(exc.reason, exc.detail)
        finally:
            self.metrics.uploads_active(-1)
        try:
            delta = decode_upload(buf, self.dim, self.upload_codec)
        except CodecError as exc:
            return self._refuse(exc.reason, str(exc), header.device_id, int(header.round))
        gateway = self.gateway
        if gateway is None:
            return self._refuse("late", "no round is open", header.device_id,
                                int(header.round))
        try:
            gateway.upload(header.device_id, int(header.round), int(header.base_version),
                           header.upload_key, int(header.num_examples), delta, self.clock(),
                           metrics=dict(header.metrics), upload_bytes=len(buf))
        except UpdateRejected as exc:
            return self._refuse(exc.reason, str(exc), header.device_id, int(header.round),
                                counted=True)
        finally:
            self.flush_outcomes()
        self.metrics.bytes_moved("up", len(buf))
        return pb.UploadReply(accepted=True)

    async def Heartbeat(self, request, context):
        await self._authorize(context, request.device_id, "checkin")
        gateway = self.gateway
        keep = gateway is not None and gateway.heartbeat(request.device_id,
                                                          int(request.round), self.clock())
        return pb.HeartbeatReply(keep_going=keep)

    async def SecAgg(self, request_iterator, context):
        """One step of a secure-aggregation round (see :mod:`shoal.device_secagg`)."""
        def declared(h):  # only a masked input carries data
            if h.WhichOneof("body") == "masked":
                return h.masked.total_size, h.masked.sha256
            return 0, None
        try:
            header, buf, size = await self._receive(request_iterator, context,
                                                    (self.dim + 1) * 8, declared)
        except _Refusal as exc:
            return self._secagg_refuse(exc.reason, exc.detail)
        return await self._secagg(header, buf, size)

    async def SecAggStep(self, request, context):
        """:meth:`SecAgg` for a message without a payload (unary)."""
        await self._authorize(context, request.device_id, "upload")
        if request.WhichOneof("body") == "masked":
            return self._secagg_refuse("malformed", "a masked input needs the SecAgg stream")
        return await self._secagg(request, b"", request.ByteSize())

    async def _receive(self, request_iterator, context, limit: int, declared):
        """Read a header-then-data stream (``Upload``, ``SecAgg``): authorize the header's
        device, refuse a declared size above ``limit`` before reading on, reassemble the data
        and check its length and SHA-256. ``declared(header)`` gives ``(total size, sha256 or
        None)``. Returns ``(header, payload, bytes on the wire)``; raises :class:`_Refusal`."""
        header, buf, size = None, bytearray(), 0
        async for chunk in request_iterator:
            part = chunk.WhichOneof("part")
            size += chunk.ByteSize()
            if header is None:
                if part != "header":
                    raise _Refusal("malformed", "the first chunk must be the header")
                header = chunk.header
                await self._authorize(context, header.device_id, "upload")
                total = declared(header)[0]
                if total > limit:
                    raise _Refusal("too_large", f"{total} bytes > limit {limit}")
            elif part != "data":
                raise _Refusal("malformed", "a second header")
            elif len(buf) + len(chunk.data) > declared(header)[0]:
                raise _Refusal("malformed", "more data than total_size")
            else:
                buf += chunk.data
        if header is None:
            raise _Refusal("malformed", "empty call")
        total, sha256 = declared(header)
        if len(buf) != total:
            raise _Refusal("truncated", f"{len(buf)} of {total} bytes")
        if sha256 is not None and hashlib.sha256(buf).digest() != sha256:
            raise _Refusal("checksum", "SHA-256 of the payload does not match")
        return header, bytes(buf), size

    async def _secagg(self, header, buf: bytes, size: int):
        gateway = self.gateway
        rnd = gateway.secure_session(header.device_id, int(header.round)) if gateway else None
        if rnd is None:
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

    def _secagg_step(self, rnd: SecAggDeviceRound, header, masked):
        """Hand one device message (or poll) to its session; returns ``(reply, the
        device's client id)`` or ``(refusal, -1)``."""
        rnd_no = int(header.round)
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

    def _secagg_refuse(self, reason: str, detail: str, device: str = "", rnd: int = -1, *,
                       counted: bool = False) -> pb.SecAggReply:
        return pb.SecAggReply(refused=self._refuse(reason, detail, device, rnd,
                                                   counted=counted))

    async def ReportEvaluation(self, request, context):
        await self._authorize(context, request.device_id, "upload")
        metrics = {k: float(v) for k, v in request.metrics.items() if math.isfinite(v)}
        with self.lock:
            self.evaluations.append((request.device_id, int(request.round), metrics))
        return pb.Ack()

    def _seen(self, device_id: str, now: float) -> None:
        """Mark the device as seen; a device with a valid token that skipped Hello (e.g. after
        a server restart) is registered on the spot -- its token is its enrolment."""
        try:
            self.registry.touch(device_id, now=now)
        except UnknownDevice:
            self.registry.enroll(device_id, now=now)

    def _refuse(self, reason: str, detail: str, device: str = "", rnd: int = -1, *,
                counted: bool = False) -> pb.UploadReply:
        """Answer a refused upload. ``counted``: the gateway or the coordinator already told
        the observers; otherwise (refused on the wire) it is counted here."""
        if not counted:
            self.metrics.update_rejected(-1, reason, 1, detail, self.clock())
        log.info("upload refused: %s (%s)", reason, detail,
                 extra={"fields": {"event": "upload_refused", "reason": reason,
                                   "device": device, "round": rnd}})
        return pb.UploadReply(accepted=False, reason=reason, detail=detail)


def serve(service: AggregatorService, host: str = "127.0.0.1", port: int = 0, *,
          tls: tuple[bytes, bytes] | None = None,
          client_ca: bytes | None = None) -> tuple[int, Callable[[], None]]:
    """Start ``service`` on a ``grpc.aio`` server in a background thread.

    Args:
        tls: ``(certificate chain PEM, private key PEM)``; ``None`` serves without TLS (tests
            on loopback only).
        client_ca: PEM CA certificate(s) for mutual TLS (cross-silo): a connection without a
            client certificate signed by one of them fails its TLS handshake, and every call's
            token must be for the device the certificate names (its common name), else the
            call is refused with ``PERMISSION_DENIED`` ("identity"). Needs ``tls``.

    Returns:
        ``(port, stop)``: the bound port and a function that stops the server and its thread.

    Raises:
        ConfigError: ``client_ca`` without ``tls``, or the server could not bind ``host:port``
            (``key="deploy.port"``; e.g. the port is in use).
    """
    if client_ca is not None and tls is None:
        raise ConfigError("mutual TLS (a client CA) needs the server's own certificate and "
                          "key", key="client_ca")
    # every call's token must name the device its client certificate names (common name)
    service.gate.bind_to_certificates = client_ca is not None
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict = {}

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 << 20),
                                          ("grpc.max_send_message_length", 4 << 20)])
        pb_grpc.add_AggregatorServicer_to_server(service, server)
        address = f"{host}:{port}"
        if tls is None:
            state["port"] = server.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])],
                                                root_certificates=client_ca,
                                                require_client_auth=client_ca is not None)
            state["port"] = server.add_secure_port(address, creds)
        await server.start()
        stopping = asyncio.Event()
        state["stopping"] = stopping
        ready.set()
        await stopping.wait()
        await server.stop(grace=1.0)

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        except Exception as exc:  # surface bind errors to the caller
            state["error"] = exc
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="shoal-grpc", daemon=True)
    thread.start()
    ready.wait(timeout=30)
    if "error" in state or "port" not in state:
        raise ConfigError(f"could not start the aggregator on {host}:{port} (deploy.host, "
                          f"deploy.port): {state.get('error') or 'timed out'}",
                          key="deploy.port")

    def stop() -> None:
        if thread.is_alive():
            loop.call_soon_threadsafe(state["stopping"].set)
        thread.join(timeout=10)

    return state["port"], stop
