"""The aggregator's gRPC front end, and the client pool that puts it behind the coordinator.

Devices pull (see ``proto/shoal.proto``): they say Hello, check in, download the model in
chunks, train and upload in chunks. :class:`AggregatorService` answers them on a ``grpc.aio``
server running in a background thread; every round's bookkeeping is a sans-I/O
:class:`~shoal.device_round.DeviceRound`, driven under one lock. :class:`GrpcClientPool` is the
coordinator's view: ``train(task, client_ids)`` opens a device round for the sampled devices
and yields accepted updates as they arrive -- the same round engine the simulator uses.

Security: TLS on the server (``shoal certs`` makes a local pair), and every call must carry a
device token (``shoal enroll``) whose subject is the device the call claims to be; refused
calls are counted by reason. Per-device rate limits and a cap on upload size protect the
server; uploads are parsed and validated (size, checksum, codec wire format, shape, finite
values, norm, base version) before they touch the aggregate.

Only this module and ``shoal.transport.client`` import the generated protobuf code.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from shoal.codec import Chain, from_bytes, to_bytes
from shoal.events import ClientUpdate, PartialAggregate, TrainTask, UpdateBatch
from shoal.runner import RoundAbandoned
from shoal.device_round import ComeBack, DeviceRound, Task
from shoal.device_secagg import SecAggDeviceRound, Wait
from shoal.errors import CodecError, ConfigError, ProtocolError, UpdateRejected
from shoal.privacy.secagg_encoding import unpack_ring
from shoal.privacy.secagg_rounds import SecAggAggregation
from shoal.registry.base import UnknownDevice
from shoal.transport.auth import AuthError, Keyring, RateLimiter
from shoal.transport.revocation import RevocationFile
from shoal.transport.tokens import verify_token
from shoal.transport.certs import client_identity
from shoal.transport.proto import shoal_pb2 as pb
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc
from shoal.transport.secagg_wire import message_from_header, reply_to_pb

__all__ = ["AggregatorSettings", "AggregatorService", "GrpcClientPool", "ModelPayload"]

log = logging.getLogger("shoal.aggregator")


@dataclass(frozen=True)
class AggregatorSettings:
    """How the aggregator treats devices.

    Attributes:
        target: accepted updates that complete a round.
        deadline_s: reporting deadline of a round, from its opening.
        min_fraction: a round commits with at least ``ceil(min_fraction * target)`` updates.
        max_norm: L2 bound on an update (``None`` = no bound).
        max_update_bytes: uploads larger than this are refused before they are read.
        chunk_size: bytes per download chunk.
        rate_per_s, burst: per-device token bucket over all calls.
        idle_retry_s: how far ahead a device is told to come back when no round is open
            (jittered over this window).
        checkin_interval_s: devices the current round does not need (not selected, already
            reported) come back within [0.5, 1.5] x this, not at the round's deadline: the
            next round may open long before it. Raise it for large populations (pace
            steering spreads their check-ins over the window).
        max_active_uploads: uploads read at once; the rest wait (HTTP/2 flow control holds
            their bytes on the devices), so the server's memory stays flat however many
            devices upload together.
        roster_wait_s: secure aggregation: longest wait for the selected devices to check in
            before the roster closes.
        stage_timeout_s: secure aggregation: length of the key and unmasking stages (input
            collection runs to the round's deadline).
        long_poll_s: a secure-aggregation call that has nothing for the device yet is held
            this long before it is answered "wait".
    """

    target: int
    deadline_s: float = 60.0
    min_fraction: float = 0.8
    max_norm: float | None = None
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


@dataclass(frozen=True)
class ModelPayload:
    """A model version as it goes on the wire (codec wire format, raw float32)."""

    version: int
    blob: bytes
    sha256: bytes

    @classmethod
    def of(cls, version: int, params: np.ndarray) -> ModelPayload:
        blob = to_bytes(Chain([]).encode(np.asarray(params, np.float32),
                                         np.random.default_rng(0)))
        return cls(version, blob, hashlib.sha256(blob).digest())


class _Counters:
    """Prometheus metrics if ``prometheus_client`` is installed, plain counters otherwise."""

    def __init__(self) -> None:
        self.plain: Counter[str] = Counter()
        try:
            import prometheus_client as prom
        except ImportError:  # pragma: no cover - the deploy extra installs it
            self.prom = None
            return
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        self.rounds = prom.Counter("shoal_rounds_total", "rounds by outcome", ["outcome"],
                                   registry=self.registry)
        self.updates = prom.Counter("shoal_updates_total", "uploads by result",
                                    ["result", "reason"], registry=self.registry)
        self.refused = prom.Counter("shoal_refused_calls_total", "calls refused before "
                                    "reaching a round", ["reason"], registry=self.registry)
        self.bytes = prom.Counter("shoal_bytes_total", "payload bytes", ["direction"],
                                  registry=self.registry)
        self.checkins = prom.Counter("shoal_checkins_total", "check-ins by answer",
                                     ["answer"], registry=self.registry)
        self.active = prom.Gauge("shoal_active_uploads", "uploads being received",
                                 registry=self.registry)
        self.duration = prom.Histogram("shoal_round_seconds", "round duration",
                                       registry=self.registry,
                                       buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600))

    def inc(self, name: str, *labels: str, amount: float = 1.0) -> None:
        self.plain[":".join((name, *labels))] += amount
        if self.prom is not None:
            metric = getattr(self, name)
            (metric.labels(*labels) if labels else metric).inc(amount)

    def add_active(self, delta: int) -> None:
        """Track uploads being received (a gauge)."""
        self.plain["active_uploads"] += delta
        if self.prom is not None:
            self.active.inc(delta)

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose ``/metrics`` on ``addr:port`` (0 = any free port); returns the port."""
        if self.prom is None:  # pragma: no cover
            raise ConfigError("a metrics port needs prometheus_client (pip install "
                              "shoal[deploy])", key="deploy.metrics_port")
        server, _ = self.prom.start_http_server(port, addr=addr, registry=self.registry)
        return server.server_address[1]


class _Refusal(Exception):
    """A call refused before it reached a round: a machine-readable reason and a detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@functools.lru_cache(maxsize=1024)
def _certified_device(cert_pem: bytes) -> str | None:
    """The device id a peer's client certificate names (parsed once per certificate)."""
    return client_identity(cert_pem)


class AggregatorService(pb_grpc.AggregatorServicer):
    """The gRPC handlers. Thread model: handlers run on the server's event loop; the round
    and the current model are shared with :class:`GrpcClientPool` under ``self.lock``.

    Args:
        settings: device-facing limits and round parameters.
        keyring: token keys (``Keyring.single(load_or_create_secret(path))``).
        dim: model length (uploads of another length are refused).
        spec_fingerprint: sent with every task so devices can check their model.
        registry_factory: opens the client registry (called on the server thread; SQLite
            connections belong to one thread).
        clock: seconds since the epoch.
        revocations: revoked tokens, refused with reason ``revoked`` (re-read when the file
            changes).
    """

    def __init__(self, settings: AggregatorSettings, keyring: Keyring, dim: int,
                 spec_fingerprint: str, registry_factory: Callable[[], object],
                 clock: Callable[[], float] = time.time, server_id: str = "shoal",
                 revocations: RevocationFile | None = None) -> None:
        self.settings = settings
        self.keyring = keyring
        self.dim = dim
        self.spec_fingerprint = spec_fingerprint
        self.registry_factory = registry_factory
        self._registry = None
        self.clock = clock
        self.server_id = server_id
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.round: DeviceRound | SecAggDeviceRound | None = None
        self.settings_for_round: dict[str, float] = {}
        self.model: ModelPayload | None = None
        self.limiter = RateLimiter(settings.rate_per_s, settings.burst)
        self.counters = _Counters()
        self.evaluations: list[tuple[str, int, dict[str, float]]] = []
        self.bytes_down = 0  # bytes served so far: models, secure-aggregation replies
        self.bytes_up = 0  # secure-aggregation bytes received so far
        self._upload_slots: asyncio.Semaphore | None = None
        # secure-aggregation long polls wait on this; wake() swaps it for a fresh one
        self._loop: asyncio.AbstractEventLoop | None = None
        self._progress: asyncio.Event | None = None
        # the last secure round, kept after it ends so that late polls learn how it ended
        self.finished_secure: SecAggDeviceRound | None = None
        self._pace_rng = np.random.default_rng()
        #: set by :func:`serve` with ``client_ca``: every call's token must name the device
        #: that the call's client certificate names (its common name)
        self.bind_tokens_to_certificates = False
        self.revocations = revocations

    @property
    def registry(self):
        if self._registry is None:
            self._registry = self.registry_factory()
        return self._registry

    # -- helpers ---------------------------------------------------------------------------

    async def _authorize(self, context: grpc.aio.ServicerContext, device_id: str | None,
                         scope: str) -> str:
        """Verify the call's token (bound to ``device_id`` when given) and the device's rate
        limit; abort the call otherwise. Returns the token's device."""
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and value.startswith("Bearer "):
                token = value[len("Bearer "):]
        now = self.clock()
        try:
            revoked = self.revocations.current() if self.revocations is not None else None
            claims = verify_token(self.keyring, token, now=now, expected_device=device_id,
                                  required_scope=scope, revoked=revoked)
        except AuthError as exc:
            self.counters.inc("refused", exc.reason)
            log.warning("call refused: %s", exc.reason,
                        extra={"fields": {"event": "auth_refused", "reason": exc.reason,
                                          "device": device_id or ""}})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{exc.reason}: {exc}")
        device_id = claims.sub
        if self.bind_tokens_to_certificates:
            pems = (context.auth_context() or {}).get("x509_pem_cert") or [b""]
            certified = _certified_device(pems[0])
            if certified != device_id:
                # a stolen token is useless without the private key of its owner's certificate
                self.counters.inc("refused", "identity")
                shown = repr(certified) if certified else "no single valid device name"
                log.warning("call refused: identity", extra={"fields": {
                    "event": "auth_refused", "reason": "identity", "device": device_id,
                    "certificate": shown}})
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"identity: the token is for {device_id!r} but the "
                                    f"client certificate names {shown}")
        if not self.limiter.allow(device_id, now):
            self.counters.inc("refused", "rate_limited")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"rate limited: retry in "
                                f"{self.limiter.retry_after(device_id, now):.1f} s")
        return device_id

    # -- handlers --------------------------------------------------------------------------

    async def Hello(self, request, context):
        await self._authorize(context, request.device_id, "checkin")
        now = self.clock()
        self.registry.enroll(request.device_id, now=now, attributes=dict(request.attributes),
                             capabilities=dict(request.capabilities),
                             windows=[(w.start_minute, w.end_minute) for w in request.windows])
        model = self.model
        return pb.HelloReply(server_id=self.server_id,
                             model_version=model.version if model else 0, server_time=now)

    async def CheckIn(self, request, context):
        await self._authorize(context, request.device_id, "checkin")
        now = self.clock()
        self._seen(request.device_id, now)
        with self.lock:
            rnd = self.round
            if rnd is None:
                decision: Task | ComeBack = ComeBack(
                    at=now + float(self._pace_rng.uniform(0, self.settings.idle_retry_s)),
                    reason="no_round")
            else:
                decision = rnd.check_in(request.device_id, now, rng=self._pace_rng)
                if isinstance(decision, ComeBack) and decision.reason != "round_closed":
                    soon = now + self.settings.checkin_interval_s * float(
                        self._pace_rng.uniform(0.5, 1.5))
                    decision = ComeBack(at=min(decision.at, soon), reason=decision.reason)
            settings = dict(self.settings_for_round)
            kind = "secagg" if isinstance(rnd, SecAggDeviceRound) else "train"
        if isinstance(decision, Task):
            self.counters.inc("checkins", "task")
            return pb.CheckInReply(task=pb.Task(
                round=decision.round, model_version=decision.model_version,
                upload_key=decision.upload_key, deadline=decision.deadline, settings=settings,
                spec_fingerprint=self.spec_fingerprint, kind=kind))
        self.counters.inc("checkins", decision.reason)
        return pb.CheckInReply(come_back=pb.ComeBack(at=decision.at, reason=decision.reason))

    async def Download(self, request, context):
        # the model is public to enrolled devices: any valid token may download it
        await self._authorize(context, None, "checkin")
        model = self.model
        if model is None or request.version != model.version:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model version {request.version} is not available "
                                f"(current: {model.version if model else 'none'})")
        size = max(1, min(int(request.chunk_size or self.settings.chunk_size),
                          self.settings.chunk_size))
        total = len(model.blob)
        for off in range(0, total, size):
            yield pb.ModelChunk(version=model.version, total_size=total,
                                sha256=model.sha256 if off == 0 else b"", offset=off,
                                data=model.blob[off:off + size])
        self.counters.inc("bytes", "down", amount=total)
        with self.lock:
            self.bytes_down += total

    async def Upload(self, request_iterator, context):
        if self._upload_slots is None:  # created on the server's event loop
            self._upload_slots = asyncio.Semaphore(self.settings.max_active_uploads)
        async with self._upload_slots:
            return await self._upload(request_iterator, context)

    async def _upload(self, request_iterator, context):
        self.counters.add_active(1)
        try:
            header, buf, _ = await self._receive(
                request_iterator, context, self.settings.max_update_bytes,
                lambda h: (h.total_size, h.sha256))
        except _Refusal as exc:
            return self._refuse(exc.reason, exc.detail)
        finally:
            self.counters.add_active(-1)
        try:
            delta = from_bytes(buf, max_elements=self.dim)
        except CodecError as exc:
            return self._refuse(exc.reason, str(exc))
        now = self.clock()
        with self.changed:
            rnd = self.round
            if rnd is None:
                return self._refuse("late", "no round is open")
            if not isinstance(rnd, DeviceRound):
                return self._refuse("wrong_task", "this round aggregates securely: send the "
                                    "masked input with the SecAgg call")
            try:
                rnd.upload(header.device_id, int(header.round), int(header.base_version),
                           header.upload_key, int(header.num_examples), delta, now,
                           metrics={**dict(header.metrics), "upload_bytes": float(len(buf))})
            except UpdateRejected as exc:
                outcome = "late" if exc.reason == "late" else f"rejected:{exc.reason}"
                self._record(header.device_id, int(header.round), outcome, now)
                return self._refuse(exc.reason, str(exc), header.device_id, int(header.round))
            self.changed.notify_all()
        self._record(header.device_id, int(header.round), "accepted", now)
        self.counters.inc("updates", "accepted", "")
        self.counters.inc("bytes", "up", amount=len(buf))
        return pb.UploadReply(accepted=True)

    async def Heartbeat(self, request, context):
        await self._authorize(context, request.device_id, "checkin")
        with self.lock:
            rnd = self.round
            keep = rnd is not None and rnd.round == request.round \
                and not rnd.status(self.clock()).done
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
        with self.lock:
            self.bytes_up += size
            rnd = self.round
            if not (isinstance(rnd, SecAggDeviceRound) and rnd.round == header.round):
                rnd = self.finished_secure  # a device asking how a round just ended
        if not (isinstance(rnd, SecAggDeviceRound) and rnd.round == header.round):
            return self._secagg_refuse("late", "no secure-aggregation round is open")
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
        with self.lock:
            self.bytes_down += out.ByteSize()
        return out

    def _secagg_step(self, rnd: SecAggDeviceRound, header, masked):
        """Hand one device message (or poll) to the round under the lock; returns ``(reply,
        the device's client id)`` or ``(refusal, -1)``."""
        now = self.clock()
        rnd_no = int(header.round)
        with self.changed:
            # the sender is the authenticated device itself: messages on the wire name no one
            try:
                cid = rnd.client_id(header.device_id)
            except KeyError:  # not selected: exchange refuses it with its reason
                cid = -1
            try:
                session = rnd.server.session if rnd.server is not None else b""
                message = message_from_header(header, cid, session, masked)
                reply = rnd.exchange(header.device_id, rnd_no, int(header.base_version),
                                     header.upload_key, message, now)
            except UpdateRejected as exc:
                return self._secagg_refuse(exc.reason, str(exc), header.device_id, rnd_no), -1
            except ProtocolError as exc:
                return self._secagg_refuse("malformed", str(exc), header.device_id, rnd_no), -1
            if message is not None:
                self.changed.notify_all()
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

    def _secagg_refuse(self, reason: str, detail: str, device: str = "", rnd: int = -1
                       ) -> pb.SecAggReply:
        return pb.SecAggReply(refused=self._refuse(reason, detail, device, rnd))

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

    def _refuse(self, reason: str, detail: str, device: str = "", rnd: int = -1
                ) -> pb.UploadReply:
        self.counters.inc("updates", "rejected", reason)
        log.info("upload refused: %s (%s)", reason, detail,
                 extra={"fields": {"event": "upload_refused", "reason": reason,
                                   "device": device, "round": rnd}})
        return pb.UploadReply(accepted=False, reason=reason, detail=detail)

    def _record(self, device_id: str, rnd: int, outcome: str, now: float) -> None:
        try:
            self.registry.record_outcome(device_id, rnd, outcome, now=now)
        except Exception as exc:  # the registry is bookkeeping; never fail an upload on it
            log.warning("registry: could not record %s for %s: %s", outcome, device_id, exc)


class GrpcClientPool:
    """The coordinator's client pool for devices behind :class:`AggregatorService`.

    ``client_ids`` are positions in :attr:`devices`, the enrolled devices in a fixed (sorted)
    order. ``train`` opens a device round for the sampled devices (sample the over-selected
    count, e.g. 130 % of ``settings.target``), publishes the model, and yields accepted
    updates as they arrive. It returns when the round is done (target reached or deadline);
    a round below ``min_fraction`` raises :class:`~shoal.runner.RoundAbandoned`, so the
    coordinator commits nothing.

    With ``secure`` (the run's :class:`~shoal.privacy.secagg_rounds.SecAggAggregation`) every
    round is a secure-aggregation round (:class:`~shoal.device_secagg.SecAggDeviceRound`):
    the server never sees one device's update, only the unmasked sum, which ``train`` yields
    as one :class:`~shoal.events.PartialAggregate` (the weighted mean of the clipped,
    quantized updates of the included devices).

    Args:
        service: the running service.
        devices: the device ids clients may be sampled from.
        clock: the same clock the service uses.
        poll_s: how often to re-check the deadline while no update arrives.
        secure: secure-aggregation parameters (k, t and the encoding per roster size).
    """

    def __init__(self, service: AggregatorService, devices: Sequence[str],
                 clock: Callable[[], float] = time.time, poll_s: float = 0.2,
                 secure: SecAggAggregation | None = None) -> None:
        self.service = service
        self.devices = sorted(devices)
        self.clock = clock
        self.poll_s = poll_s
        self.secure = secure

    #: The coordinator must not simulate secure aggregation on top: the devices run it.
    @property
    def aggregates_securely(self) -> bool:
        return self.secure is not None

    @property
    def num_clients(self) -> int:
        return len(self.devices)

    def _open(self, task: TrainTask, client_ids: np.ndarray
              ) -> DeviceRound | SecAggDeviceRound:
        svc = self.service
        st = svc.settings
        selected = [self.devices[int(c)] for c in client_ids]
        target = min(st.target, len(selected))
        # devices that find the round closed come back soon: the next round may open at once
        common = dict(opened_at=self.clock(), deadline_s=st.deadline_s, dim=svc.dim,
                      client_ids=[int(c) for c in client_ids], retry_spread_s=st.idle_retry_s)
        if self.secure is None:
            return DeviceRound(task.round, task.version, selected, target=target,
                               min_fraction=st.min_fraction, max_norm=st.max_norm, **common)
        return SecAggDeviceRound(task.round, task.version, selected, target=target,
                                 min_accepted=max(1, math.ceil(st.min_fraction * target - 1e-9)),
                                 config_for=self.secure.config_for,
                                 roster_wait_s=st.roster_wait_s,
                                 stage_timeout_s=st.stage_timeout_s, **common)

    def train(self, task: TrainTask, client_ids: np.ndarray
              ) -> Iterator[ClientUpdate | UpdateBatch | PartialAggregate]:
        svc = self.service
        payload = ModelPayload.of(task.version, task.params)
        rnd = self._open(task, client_ids)
        with svc.lock:
            svc.model = payload
            svc.settings_for_round = {k: float(v) for k, v in task.settings.items()}
            svc.round = rnd
            down_before, up_before = svc.bytes_down, svc.bytes_up
        started = time.monotonic()
        if isinstance(rnd, SecAggDeviceRound):
            commit, accepted, detail = yield from self._secure(rnd, down_before, up_before)
        else:
            commit, accepted, detail = yield from self._plain(rnd, down_before)
        if svc.counters.prom:
            svc.counters.duration.observe(time.monotonic() - started)
        svc.counters.inc("rounds", "committed" if commit else "abandoned")
        log.info("round %d %s: %d accepted of target %d", task.round,
                 "committed" if commit else "abandoned", accepted, rnd.target,
                 extra={"fields": {"event": "round_closed", "round": task.round,
                                   "accepted": accepted, "commit": commit,
                                   "seconds": round(time.monotonic() - started, 3),
                                   "rejections": rnd.rejections, **detail}})
        if not commit:
            raise RoundAbandoned(f"round {task.round}: {detail.get('why', 'abandoned')}")

    def _plain(self, rnd: DeviceRound, down_before: int):
        svc = self.service
        try:
            while True:
                with svc.changed:
                    status = rnd.status(self.clock())
                    updates = rnd.drain()
                    if not updates and not status.done:
                        svc.changed.wait(timeout=self.poll_s)
                        status = rnd.status(self.clock())
                        updates = rnd.drain()
                yield from updates
                if status.done:
                    break
        finally:
            with svc.lock:
                final = rnd.close(self.clock())
                leftovers = rnd.drain()
                served = svc.bytes_down - down_before
        yield from leftovers
        # a batch of no updates that carries the round's download traffic to the record
        yield UpdateBatch(client_ids=np.empty(0, np.int64),
                          deltas=np.empty((0, svc.dim), np.float32),
                          num_examples=np.empty(0, np.int64),
                          metrics={"download_bytes": np.array([served])})
        why = (f"{final.accepted} of {final.min_accepted} required updates arrived before "
               f"the deadline")
        return final.commit, final.accepted, {"closed_by": final.closed_by, "why": why}

    def _secure(self, rnd: SecAggDeviceRound, down_before: int, up_before: int):
        svc = self.service
        try:
            while True:
                with svc.changed:
                    if rnd.tick(self.clock()):
                        svc.changed.notify_all()
                        svc.wake()
                    status = rnd.status()
                    if status.done:
                        break
                    svc.changed.wait(timeout=self.poll_s)
        finally:
            with svc.lock:
                status = rnd.close(self.clock())  # a finished round stays as it ended
                served, received = svc.bytes_down - down_before, svc.bytes_up - up_before
                svc.finished_secure = rnd
            svc.wake()
        detail = {"roster": status.roster, "dropped_at": dict(rnd.dropped_at)}
        if not status.commit:
            return False, 0, {**detail, "why": f"secure aggregation: {status.error}"}
        total, included = rnd.result()
        assert rnd.config is not None and rnd.params is not None
        mean, weight = rnd.config.encoding.decode(total)
        detail["included"] = sorted(rnd.device_id(c) for c in included)
        yield PartialAggregate(
            delta=mean.astype(np.float32), num_examples=weight, clients=len(included),
            metrics={"secagg_included": float(len(included)),
                     "secagg_dropped": float(status.roster - len(included)),
                     "secagg_neighbours": float(rnd.params.neighbours),
                     "secagg_threshold": float(rnd.params.threshold),
                     "secagg_ring_bits": float(rnd.params.bits),
                     "upload_bytes": float(received), "download_bytes": float(served)})
        return True, len(included), detail


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
    service.bind_tokens_to_certificates = client_ca is not None
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
