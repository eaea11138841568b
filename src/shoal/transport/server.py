"""The aggregator's gRPC front end: authenticated device calls in, the gateway behind them.

Devices pull (see ``proto/shoal.proto``): they say Hello, check in, download the model in
chunks, train and upload in chunks. :class:`AggregatorService` answers them on a ``grpc.aio``
server running in a background thread (:func:`~shoal.transport.listener.serve`). It holds no
round rule: every check-in, upload and secure-aggregation message goes to the run's
:class:`~shoal.gateway.DeviceGateway`, whose coordinator (policy and pipeline) decides -- the
same engine the simulator drives. :class:`~shoal.transport.carrier.GrpcCarrier` attaches a
gateway for a run.

This module does what only a network server must, refusing as early as it can:

* every call: a valid device token before any message is read, and idle callers cut
  (:class:`~shoal.transport.admission.Admission`); then the token's device must be the one
  the message names, with mutual TLS the certificate's, within its rate limit
  (:class:`~shoal.transport.gate.CallGate`);
* Hello: every field checked before anything is stored (``INVALID_ARGUMENT`` naming it,
  :mod:`shoal.transport.hello`); the runtime version decides whether the device gets tasks
  that ask it to clip;
* uploads: a declared size above :func:`~shoal.transport.downloads.upload_limit` (what an
  update of this model in the task's codec can be) refused at the header, one stream per
  device, a bounded number read at once (:mod:`shoal.transport.inbound`), length and SHA-256
  checked, decoded with the codec chain the task announced; the update's weight bounded
  (:class:`~shoal.device_weights.WeightCap`); byte counts measured here, never taken from the
  device;
* evaluation reports, serving and declines (:mod:`shoal.transport.lifecycle_calls`): a report
  only as the answer to an evaluation task issued to its device; ``GetModel`` and
  ``GetPlan`` for the device the credentials name;
* a disk that refuses the registry's writes stops the run (:meth:`AggregatorService.fail`)
  with a :class:`~shoal.store.disk.StorageError` naming the file; devices are told
  ``UNAVAILABLE`` and retry.

Downloads are served full or as deltas (:class:`~shoal.transport.downloads.ModelPublisher`),
each training version signed once when it is published (with a ``signer``), secure
aggregation by :class:`~shoal.transport.secagg_calls.SecAggCalls`, the model's life after
training (serving, evaluation, declines) by
:class:`~shoal.transport.lifecycle_calls.LifecycleCalls`, metrics through a
:class:`~shoal.observers.CarrierObserver`. Refused calls are answered with their reason.

Only ``shoal.transport`` imports the generated protobuf code (here, ``listener``,
``secagg_calls`` and ``secagg_wire`` on the server's side; ``client`` and its helpers on the
device's).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

import grpc  # type: ignore[import-untyped]
import numpy as np

from shoal.codec.encoded import as_update
from shoal.device_ckks import CkksSetup
from shoal.device_task import ComeBack, Task, TaskRefused
from shoal.device_weights import WeightCap
from shoal.errors import CodecError, ProtocolError, UpdateRejected
from shoal.gateway import DeviceGateway
from shoal.observers import CarrierObserver, listens
from shoal.registry.base import UnknownDevice
from shoal.store.disk import StorageError
from shoal.transport.admission import STATUS
from shoal.transport.auth import Keyring, RateLimiter
from shoal.transport.chunks import data_chunks
from shoal.transport.ckks_calls import CkksCalls, ckks_task
from shoal.transport.downloads import ModelPublisher, decode_upload, upload_limit
from shoal.transport.gate import CallGate, CallRefused
from shoal.lifecycle.signing import Signer, training_namespace
from shoal.transport.hello import (InvalidHello, clips_updates, evaluates, heartbeats,
                                   read_hello)
from shoal.transport.inbound import Busy, Inbound, Refusal, read_payload
from shoal.transport.lifecycle_calls import LifecycleCalls, model_chunks
from shoal.transport.listener import serve
from shoal.transport.outcomes import write_outcomes
from shoal.transport.proto import shoal_pb2 as pb
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc
from shoal.transport.revocation import RevocationFile
from shoal.transport.secagg_calls import SecAggCalls
from shoal.transport.serving import ModelServing
from shoal.transport.settings import AggregatorSettings

__all__ = ["AggregatorService", "AggregatorSettings", "serve"]

log = logging.getLogger("shoal.aggregator")


class AggregatorService(LifecycleCalls, SecAggCalls, CkksCalls, pb_grpc.AggregatorServicer):
    """The gRPC handlers. Thread model: handlers run on the server's event loop; the run's
    :attr:`gateway` serialises them under its lock.

    :attr:`REQUEST_BYTES` bounds a small call's request before it is parsed: a Hello within
    the registry's own limits, a check-in, an evaluation report of at most ``MAX_METRICS``
    metrics, a decline with its bounded detail. Any message, a streamed chunk included, is at most
    :data:`~shoal.transport.listener.MAX_RECEIVE_BYTES` (a 256 KiB chunk and its framing),
    refused by gRPC before it is buffered.

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
        serving: what ``GetModel`` and ``GetPlan`` serve (``None``: ``NOT_FOUND``), and who
            is served which version (evaluation tasks go only to devices served theirs).
        signer: the operator's key: every training version is signed once, when published,
            and downloads carry the signature (``None``: unsigned).
        segment_by: the device attribute (declared at Hello) evaluation reports are broken
            down by (``""``: none).

    Raises:
        ConfigError: an upload or download codec chain that does not parse, or a weight cap
            out of range.
    """

    REQUEST_BYTES = {"Hello": 64 << 10, "CheckIn": 1 << 10, "Download": 1 << 10,
                     "Heartbeat": 1 << 10, "ReportEvaluation": 16 << 10,
                     "GetModel": 1 << 10, "GetPlan": 1 << 10, "Decline": 2 << 10}
    #: payload streams whose data chunks are read as views, not parsed (transport/chunks.py)
    REQUEST_PARSERS = {"Upload": data_chunks(pb.UploadChunk.FromString),
                       "SecAgg": data_chunks(pb.SecAggChunk.FromString)}

    def __init__(self, settings: AggregatorSettings, keyring: Keyring, dim: int,
                 spec_fingerprint: str, registry_factory: Callable[[], Any],
                 clock: Callable[[], float] = time.time, server_id: str = "shoal",
                 revocations: RevocationFile | None = None,
                 metrics: CarrierObserver | None = None,
                 serving: ModelServing | None = None, signer: Signer | None = None,
                 segment_by: str = "") -> None:
        from shoal.codec import Chain

        self.settings = settings
        self.keyring = keyring
        self.dim = dim
        self.spec_fingerprint = spec_fingerprint
        self.registry_factory = registry_factory
        self._registry: Any = None
        self.clock = clock
        self.server_id = server_id
        self.metrics = metrics if metrics is not None else CarrierObserver()
        self._timing = listens(self.metrics, "device_step")  # does anyone time the steps?
        self.gateway: DeviceGateway | None = None  # the run's gateway (GrpcCarrier attaches it)
        self.upload_codec = "" if settings.upload_codec in ("", "none") \
            else settings.upload_codec
        derived = upload_limit(dim, Chain.parse(self.upload_codec, key="compression.upload"))
        #: the largest upload read: what an update of this model can be in the task's codec
        self.upload_limit = min(derived, settings.max_update_bytes or derived)
        self.publisher = ModelPublisher(Chain.parse(
            "" if settings.download_codec == "none" else settings.download_codec,
            key="compression.download_codec"), settings.keep_versions,
            deltas=settings.delta_downloads)
        self.gate = CallGate(keyring, RateLimiter(settings.rate_per_s, settings.burst),
                             revocations=revocations, metrics=self.metrics)
        self.inbound = Inbound(settings.max_active_uploads, self.metrics.uploads_active)
        #: bounds each update's weight; the devices' sizes outlive a run (GrpcCarrier)
        self.weights = WeightCap(settings.max_weight, settings.weight_cap_multiple)
        self.runtimes: dict[str, str] = {}  # device -> its runtime version ("" = unknown)
        #: why the aggregator stopped serving (its state cannot be written), or None
        self.failure: StorageError | None = None
        self.lock = threading.Lock()  # guards the publisher's versions
        self._registry_lock = threading.Lock()
        self.revocations = revocations
        self.serving, self.signer, self.segment_by = serving, signer, segment_by
        #: names this run's training versions in their signatures (``train:<run_id>``)
        self.run_id = secrets.token_hex(8)
        self._evaluators: dict[str, bool] = {}  # device -> whether it answers evaluations

    @property
    def registry(self) -> Any:
        """The registry, opened on first use -- once, whichever threads ask first."""
        if self._registry is None:
            with self._registry_lock:
                if self._registry is None:
                    self._registry = self.registry_factory()
        return self._registry

    def publish(self, version: int, params: Any) -> None:
        """Make ``params`` downloadable as ``version`` (the gateway calls it when a task
        trains from a version no earlier task of its run did). Devices cache models by
        version, so a version names one model: publishing one already held again with the
        same parameters changes nothing, with other parameters (or one older than the newest
        and no longer held) is refused.

        Raises:
            ProtocolError: ``version`` is held with other parameters, or is older than the
                newest and no longer held; nothing changed.
        """
        with self.lock:
            if self.publisher.version is None or version > self.publisher.version:
                signed = None if self.signer is None else self.signer.sign_model(
                    params, version, training_namespace(self.run_id))
                self.publisher.publish(version, params, signed)
                return
            held = self.publisher.params(version)
            if held is None or not np.array_equal(held, as_update(params)):
                raise ProtocolError(
                    f"model version {version} cannot be published: "
                    + ("it is older than the newest, "
                       f"{self.publisher.version}, and no longer held" if held is None
                       else "it is already published with other parameters (devices cache "
                       "models by version)"))

    def fail(self, error: StorageError) -> None:
        """Stop serving rounds (thread-safe): the aggregator's state cannot be written. The
        run's gateway stops (its carrier then raises ``error``), every later call is
        answered ``UNAVAILABLE``, and the error is logged at ERROR as ``storage_error``
        with its path."""
        if self.failure is None:
            self.failure = error
            log.error("aggregator stopping: %s", error, extra={"fields": {
                "event": "storage_error", "path": error.path, "error": error.cause}})
        gateway = self.gateway
        if gateway is not None:
            gateway.stop(f"storage failed: {error.path}: {error.cause}")

    def flush_outcomes(self) -> None:
        """Write the gateway's device outcomes to the registry
        (:func:`~shoal.transport.outcomes.write_outcomes`): called by the carrier's driving
        thread after each pass and when the run ends, never in a device's call. A disk that
        refuses the write stops the aggregator (:meth:`fail`)."""
        gateway = self.gateway
        if gateway is None:
            return
        try:
            write_outcomes(self.registry, gateway.take_outcomes())
        except StorageError as exc:
            self.fail(exc)

    # -- helpers ---------------------------------------------------------------------------

    async def _authorize(self, context: Any, device_id: str | None, scope: str) -> str:
        """The gate's checks (:class:`~shoal.transport.gate.CallGate`) on this call; abort it
        with the gate's status otherwise (``UNAVAILABLE`` once the aggregator is stopping).
        Returns the token's device."""
        if self.failure is not None:
            await self._unavailable(context)
        # the client certificate matters only with mutual TLS (auth_context builds a dict)
        pems = ((context.auth_context() or {}).get("x509_pem_cert") or [b""]) \
            if self.gate.bind_to_certificates else [b""]
        try:
            return self.gate.check(context.invocation_metadata() or (), pems[0], device_id,
                                   scope, self.clock())
        except CallRefused as exc:
            await context.abort(STATUS[exc.status], str(exc))
            raise  # abort raises; this line is never reached

    async def _unavailable(self, context: Any) -> NoReturn:
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"the aggregator is stopping: {self.failure}")
        raise AssertionError("unreachable")  # abort raises

    async def _stored(self, context: Any, write: Callable[..., Any], *args: Any,
                      **kwargs: Any) -> Any:
        """``write(*args, **kwargs)`` to the registry; a disk failure stops the aggregator
        and answers this call ``UNAVAILABLE`` (the device retries later)."""
        try:
            return write(*args, **kwargs)
        except StorageError as exc:
            self.fail(exc)
            await self._unavailable(context)

    def _runtime(self, device: str) -> str:
        """``device``'s runtime version: from its Hello, or (after a restart, if it did not
        say Hello again) what the registry kept of it."""
        runtime = self.runtimes.get(device)
        if runtime is None:
            try:
                runtime = str(self.registry.get(device).capabilities.get("runtime_version", ""))
            except UnknownDevice:
                runtime = ""
            self.runtimes[device] = runtime
        return runtime

    def _heartbeat_s(self, device: str) -> float:
        """How often ``device`` is asked to call Heartbeat during a training task
        (``Task.heartbeat_s``): ``heartbeat_s`` when absence is judged and its runtime
        heartbeats, else 0."""
        st = self.settings
        return st.heartbeat_s if st.heartbeat_s > 0 and st.absent_after_s > 0 \
            and heartbeats(self._runtime(device)) else 0.0

    def _evaluates(self, device: str) -> bool:
        """Whether ``device`` answers evaluation tasks: what it declared at Hello (its
        runtime and ``capabilities["tasks"]``), as the registry keeps it."""
        known = self._evaluators.get(device)
        if known is None:
            try:
                known = evaluates(self.registry.get(device).capabilities)
            except UnknownDevice:
                known = False
            self._evaluators[device] = known
        return known

    def _segment(self, device: str) -> str:
        """The device's evaluation segment: the attribute ``segment_by`` it declared at
        Hello (``""`` without one)."""
        if not self.segment_by:
            return ""
        try:
            return str(self.registry.get(device).attributes.get(self.segment_by, ""))
        except UnknownDevice:
            return ""

    async def _stream_in(self, requests: Any, context: Any, limit: int,
                         declared: Callable[[Any], tuple[int, bytes | None]]
                         ) -> tuple[Any, bytearray, int]:
        """Take a header-then-data stream (``Upload``, ``SecAgg``; see
        :mod:`~shoal.transport.inbound`): its header's device authorized, a declared size
        (``declared(header)`` = ``(bytes, sha256 or None)``) above ``limit`` refused before
        a byte of data is read, one stream per device (``RESOURCE_EXHAUSTED`` otherwise),
        then the data read in one of the bounded slots. Returns ``(header, payload, bytes on
        the wire)``; raises :class:`~shoal.transport.inbound.Refusal`."""
        chunks = requests.__aiter__()
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            raise Refusal("malformed", "empty call") from None
        if first.WhichOneof("part") != "header":
            raise Refusal("malformed", "the first chunk must be the header")
        header = first.header
        device = await self._authorize(context, header.device_id, "upload")
        total, sha256 = declared(header)
        if total > limit:
            raise Refusal("too_large", f"{total} bytes > limit {limit}")
        try:
            with self.inbound.stream_of(device):
                async with self.inbound.slot():
                    payload, wire = await read_payload(chunks, total, sha256)
        except Busy as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return header, payload, wire + first.ByteSize()

    # -- handlers --------------------------------------------------------------------------

    async def Hello(self, request: Any, context: Any) -> pb.HelloReply:
        device = await self._authorize(context, request.device_id, "checkin")
        now = self.clock()
        try:
            hello = read_hello(device, dict(request.attributes), dict(request.capabilities),
                               [(w.start_minute, w.end_minute) for w in request.windows],
                               request.runtime_version)
        except InvalidHello as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await self._stored(context, self.registry.enroll, device, now=now,
                           attributes=hello.attributes, capabilities=hello.capabilities,
                           windows=hello.windows)
        self.runtimes[device] = hello.runtime_version
        self._evaluators[device] = evaluates(hello.capabilities)
        if hello.examples is not None:
            self.weights.note(device, hello.examples)
        return pb.HelloReply(server_id=self.server_id,
                             model_version=self.publisher.version or 0, server_time=now)

    async def CheckIn(self, request: Any, context: Any) -> pb.CheckInReply:
        started = time.perf_counter()
        device = await self._authorize(context, request.device_id, "checkin")
        now = self.clock()
        await self._stored(context, self._seen, device, now)
        gateway = self.gateway
        decision: Task | ComeBack
        settings: dict[str, float] = {}
        kind, beat = "train", 0.0  # beat: the Task.heartbeat_s asked of this device
        setup: CkksSetup | None = None  # the run's CKKS setup, for a CKKS task
        if gateway is None:
            decision = ComeBack(now + self.settings.idle_retry_s, "no_round")
        else:
            beat = self._heartbeat_s(device)
            try:
                decision, kind, settings = gateway.check_in(
                    device, now, clips=clips_updates(self._runtime(device)),
                    evaluates=self._evaluates(device), heartbeat_s=beat)
            except TaskRefused as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            setup = gateway.ckks if kind == "ckks" else None
        if isinstance(decision, Task):
            self.metrics.checked_in("task")
            self.metrics.device_step(device, decision.task_id, "checkin",
                                     time.perf_counter() - started)
            return pb.CheckInReply(task=pb.Task(
                round=decision.round, model_version=decision.model_version,
                upload_key=decision.upload_key, deadline=decision.deadline, settings=settings,
                spec_fingerprint=self.spec_fingerprint, kind=kind,
                upload_codec=self.upload_codec if kind == "train" else "",
                error_feedback=self.settings.error_feedback and kind == "train",
                clip_norm=decision.clip_norm or 0.0, task_id=decision.task_id,
                served_model=kind == "evaluate", heartbeat_s=beat if kind == "train" else 0.0,
                ckks=ckks_task(setup) if setup is not None else None))
        self.metrics.checked_in(decision.reason)
        return pb.CheckInReply(come_back=pb.ComeBack(at=decision.at, reason=decision.reason))

    async def Download(self, request: Any, context: Any) -> Any:
        # the model is public to enrolled devices: any valid token may download it
        started = time.perf_counter()
        device = await self._authorize(context, None, "checkin")
        try:
            with self.lock:
                model = self.publisher.payload(int(request.version), int(request.base_version))
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        size = max(1, min(int(request.chunk_size or self.settings.chunk_size),
                          self.settings.chunk_size))
        total = len(model.blob)
        for chunk in model_chunks(model, size):
            yield chunk
        self.metrics.bytes_moved("down", total)
        if self.gateway is not None:
            self.gateway.served(total)
            task = self.gateway.task_of(device) if self._timing else None
            if task is not None:
                self.metrics.device_step(device, task, "download",
                                         time.perf_counter() - started)

    async def Upload(self, request_iterator: Any, context: Any) -> pb.UploadReply:
        started = time.perf_counter()
        ckks = self._ckks()  # a CKKS run's uploads are ciphertexts, bounded as such
        try:
            if ckks is not None:
                header, buf, _ = await self._stream_in(
                    request_iterator, context, self._ckks_limit(ckks),
                    lambda h: (h.total_size, h.sha256))
                return self._ckks_upload(ckks, header, buf)
            # no SHA-256 of the payload: the codec's CRC-32 checks it (see _take_upload)
            header, buf, _ = await self._stream_in(
                request_iterator, context, self.upload_limit, lambda h: (h.total_size, None))
        except Refusal as exc:
            return self._refuse(exc.reason, exc.detail)
        # nothing is awaited from here on: payloads in memory stay bounded by the read slots
        return self._take_upload(header, buf, started)

    def _take_upload(self, header: Any, buf: bytearray, started: float) -> pb.UploadReply:
        """An upload received in full: decoded with the task's codec and handed to the round.

        Its integrity is the codec frame's CRC-32, checked in decoding (and TLS's on the
        way); the header's SHA-256 is not computed again (0.4 ms of CPU per 0.8 MB): it
        is the device's own fingerprint of what it sent, which only the retry rule uses (a
        retry must declare the same one to be answered as the first; a device that declares
        a false one can only get its own second update ignored)."""
        device, rnd = header.device_id, int(header.round)
        gateway = self.gateway
        # which task it is for, only for the observers that time a device's steps
        task = None if gateway is None or not self._timing else gateway.task_of(device, rnd)
        try:
            delta = decode_upload(buf, self.dim, self.upload_codec)
        except CodecError as exc:
            if task is not None:
                self.metrics.device_step(device, task, "upload",
                                         time.perf_counter() - started, exc.reason)
            return self._refuse(exc.reason, str(exc), device, rnd)
        if task is not None:  # received and decoded
            self.metrics.device_step(device, task, "upload", time.perf_counter() - started)
        if gateway is None:
            return self._refuse("late", "no round is open", device, rnd)
        now = self.clock()
        try:
            gateway.upload(device, rnd, int(header.base_version), header.upload_key,
                           int(header.num_examples), delta, now,
                           metrics=dict(header.metrics), upload_bytes=len(buf),
                           fingerprint=bytes(header.sha256))
        except UpdateRejected as exc:
            return self._refuse(exc.reason, str(exc), device, rnd, counted=True)
        self.metrics.bytes_moved("up", len(buf))
        nxt = gateway.after_upload(device, rnd, now)  # saves the device its next check-in
        return pb.UploadReply(accepted=True, come_back=None if nxt is None else
                              pb.ComeBack(at=nxt.at, reason=nxt.reason))

    async def Heartbeat(self, request: Any, context: Any) -> pb.HeartbeatReply:
        await self._authorize(context, request.device_id, "checkin")
        gateway = self.gateway
        keep = gateway is not None and gateway.heartbeat(
            request.device_id, int(request.round), self.clock(),
            every=self._heartbeat_s(request.device_id))
        return pb.HeartbeatReply(keep_going=keep)

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

