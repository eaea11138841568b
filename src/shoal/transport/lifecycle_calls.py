"""The aggregator's calls for the model's life after training: serving, evaluation, declines.

:class:`LifecycleCalls` is the part of :class:`~shoal.transport.server.AggregatorService` that

* serves the model and its training plan for inference, task-free (``GetModel``,
  ``GetPlan``; :class:`~shoal.transport.serving.ModelServing` decides what): the version is
  chosen for the device the call's *credentials* name -- the token's subject, which with
  mutual TLS is also the certificate's common name -- never for a field the device sends;
* takes evaluation reports (``ReportEvaluation``): accepted only as the answer to an
  evaluation task issued to the device (its task id and key), within the task's deadline,
  with bounded metrics and weight; the report's segment is the attribute the device declared
  at Hello (``segment_by``), read from the registry, never from the report. A refused report
  changes nothing and is answered ``FAILED_PRECONDITION`` (not the device's task, late,
  duplicate, stale, bad key) or ``INVALID_ARGUMENT`` (bad metrics or weight), its details
  ``"<reason>: <detail>"``;
* takes a device's refusal of its task or of what it was sent (``Decline``, e.g.
  ``signature_rejected``): the coordinator stops waiting for it. A decline that names no task
  (a served model or plan) is counted and logged.

The call bounds (request sizes, idle timeouts, the token) are the service's, as for every
call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc  # type: ignore[import-untyped]

from shoal.device_eval import DECLINE_REASONS
from shoal.errors import UpdateRejected
from shoal.transport.downloads import ModelPayload
from shoal.transport.proto import shoal_pb2 as pb
from shoal.transport.serving import NotServing

if TYPE_CHECKING:
    from shoal.gateway import DeviceGateway
    from shoal.observers import CarrierObserver
    from shoal.transport.settings import AggregatorSettings
    from shoal.transport.serving import ModelServing

__all__ = ["LifecycleCalls"]

log = logging.getLogger("shoal.aggregator")

_INVALID = ("bad_metrics", "bad_weight", "malformed")
_MAX_DETAIL = 256


#: the smallest chunk size whose messages are kept with the payload (a device may ask for
#: smaller chunks; they are built for it alone, not kept: a few bytes each would make a
#: payload's messages outweigh it many times over)
_SHARED_CHUNKS = 64 << 10


def model_chunks(model: ModelPayload, size: int) -> tuple[bytes, ...]:
    """``model`` as serialized ``ModelChunk`` messages of at most ``size`` bytes; the first
    carries the digest and the signature.

    Every device downloads the same version in the same chunks, so they are built and
    serialized once per payload and size (at most two sizes kept, each of at least 64 KiB)
    and sent as they are (the aggregator's interceptor passes ``bytes`` responses through)."""
    known = model.chunks.get(size)
    if known is not None:
        return known
    total = len(model.blob)
    signed = model.signed
    built = tuple(
        pb.ModelChunk(version=model.version, base_version=model.base_version,
                      total_size=total, sha256=model.sha256 if off == 0 else b"",
                      offset=off, data=model.blob[off:off + size],
                      signed_header=signed.header if off == 0 and signed else b"",
                      signature=signed.signature if off == 0 and signed else b""
                      ).SerializeToString()
        for off in range(0, total, size))
    if size >= _SHARED_CHUNKS:
        if len(model.chunks) >= 2:
            model.chunks.clear()
        model.chunks[size] = built
    return built


class LifecycleCalls:
    """Serving, evaluation reports and declines (a mixin of
    :class:`~shoal.transport.server.AggregatorService`)."""

    # provided by AggregatorService
    settings: AggregatorSettings
    gateway: DeviceGateway | None
    serving: ModelServing | None
    metrics: CarrierObserver
    clock: Callable[[], float]
    _authorize: Callable[[Any, str | None, str], Awaitable[str]]
    _segment: Callable[[str], str]

    async def _serve(self, request: Any, context: Any, what: str
                     ) -> tuple[int, Any]:
        """``ModelServing.model`` or ``.plan`` (``what``) for the authenticated caller,
        holding ``request.have_version``, in a worker thread (serving never signs; reading
        a version from the store must not stall the event loop); ``NOT_FOUND`` when nothing
        is served."""
        device = await self._authorize(context, request.device_id, "checkin")
        if self.serving is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"this aggregator serves no {what}")
        try:
            # off the event loop: a new set of served versions is read from the store
            # (file I/O and SHA-256) and encoded once; other calls go on meanwhile
            return await asyncio.to_thread(getattr(self.serving, what), device,
                                           int(request.have_version))
        except NotServing as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise  # abort raises; for the type checker

    async def GetModel(self, request: Any, context: Any) -> Any:
        version, model = await self._serve(request, context, "model")
        if model is None:
            yield pb.ModelChunk(version=version, not_modified=True)
            return
        size = max(1, min(int(request.chunk_size or self.settings.chunk_size),
                          self.settings.chunk_size))
        for chunk in model_chunks(model, size):
            yield chunk
        self.metrics.bytes_moved("down", len(model.blob))

    async def GetPlan(self, request: Any, context: Any) -> pb.PlanReply:
        version, plan = await self._serve(request, context, "plan")
        if plan is None:
            return pb.PlanReply(version=version, not_modified=True)
        signed = plan.signed
        return pb.PlanReply(version=version, plan=plan.plan,
                            signed_header=signed.header if signed else b"",
                            signature=signed.signature if signed else b"")

    async def ReportEvaluation(self, request: Any, context: Any) -> pb.Ack:
        device = await self._authorize(context, request.device_id, "upload")
        gateway = self.gateway
        try:
            if gateway is None or not request.task_id:
                raise UpdateRejected("not_selected", "no evaluation task was issued to this "
                                     "device: the report is refused and nothing is kept",
                                     client_id=device)
            gateway.report_eval(device, int(request.task_id), int(request.model_version),
                                request.upload_key, int(request.num_examples),
                                dict(request.metrics), self.clock(),
                                segment=self._segment(device))
        except UpdateRejected as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT if exc.reason in _INVALID \
                else grpc.StatusCode.FAILED_PRECONDITION
            log.info("evaluation report refused: %s (%s)", exc.reason, exc.detail,
                     extra={"fields": {"event": "evaluation_refused", "reason": exc.reason,
                                       "device": device, "task": int(request.task_id)}})
            await context.abort(code, f"{exc.reason}: {exc.detail}")
        return pb.Ack()

    async def Decline(self, request: Any, context: Any) -> pb.Ack:
        device = await self._authorize(context, request.device_id, "upload")
        reason, detail = request.reason, request.detail[:_MAX_DETAIL]
        if reason not in DECLINE_REASONS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"malformed: a decline's reason is one of {DECLINE_REASONS}")
        fields = {"event": "declined", "reason": reason, "device": device,
                  "task": int(request.task_id), "version": int(request.model_version),
                  "detail": detail}
        log.warning("device %s declined %s: %s (%s)", device,
                    f"task {request.task_id}" if request.task_id else "what it was served",
                    reason, detail, extra={"fields": fields})
        if request.task_id:
            gateway = self.gateway
            try:
                if gateway is None:
                    raise UpdateRejected("not_selected", "no task is open")
                gateway.decline(device, int(request.task_id), int(request.round),
                                request.upload_key, int(request.model_version), reason,
                                self.clock())
            except UpdateRejected as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"{exc.reason}: {exc.detail}")
        return pb.Ack()
