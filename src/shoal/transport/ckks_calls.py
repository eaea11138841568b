"""The aggregator's CKKS calls: ``CkksContext`` (the public context, once per key) and the
ciphertext uploads of a CKKS round (through ``Upload``).

:class:`CkksCalls` is the part of :class:`~shoal.transport.server.AggregatorService` that
speaks the wire form of CKKS aggregation (:mod:`shoal.transport.ckks_wire`): a run whose
gateway holds a :class:`~shoal.device_ckks.CkksSetup` reads each upload up to the bound of
its ciphertexts (refused before a byte of data is read otherwise), checks the framing before
TenSEAL parses anything, and hands the ciphertexts to the device's
:class:`~shoal.device_ckks.CkksDeviceRound` through the gateway. The service never holds
the secret key: the setup has the public context and a call to the key holder.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc  # type: ignore[import-untyped]  # grpcio ships no type information

from shoal.device_ckks import CkksSetup
from shoal.errors import UpdateRejected
from shoal.transport.ckks_wire import unpack_ciphertexts, upload_bound
from shoal.transport.proto import shoal_pb2 as pb

if TYPE_CHECKING:
    from shoal.gateway import DeviceGateway
    from shoal.observers import CarrierObserver

__all__ = ["CkksCalls", "ckks_task"]


def ckks_task(setup: CkksSetup) -> pb.CkksTask:
    """What a CKKS task tells its device: the key id and the bounds to encrypt under."""
    return pb.CkksTask(key_id=setup.key_id, clip=setup.clip, max_weight=setup.max_weight,
                       slots=setup.params.slots)


class CkksCalls:
    """The CKKS handlers of :class:`~shoal.transport.server.AggregatorService` (a mixin: it
    uses the service's gateway, authorization, metrics and refusals)."""

    # provided by AggregatorService
    dim: int
    gateway: DeviceGateway | None
    metrics: CarrierObserver
    clock: Callable[[], float]
    _authorize: Callable[[Any, str | None, str], Awaitable[str]]
    _refuse: Callable[..., pb.UploadReply]

    def _ckks(self) -> CkksSetup | None:
        return self.gateway.ckks if self.gateway is not None else None

    def _ckks_limit(self, setup: CkksSetup) -> int:
        """The largest CKKS upload read: the model's ciphertexts at their largest."""
        return upload_bound(setup.ciphertexts(self.dim), setup.params.ciphertext_bytes)

    async def CkksContext(self, request: Any, context: Any
                          ) -> pb.CkksContextReply:
        """The run's public CKKS context, if ``request.key_id`` names it."""
        await self._authorize(context, None, "checkin")
        setup = self._ckks()
        if setup is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "this run does not aggregate "
                                "with CKKS")
        assert setup is not None
        if bytes(request.key_id) != setup.key_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no public context with that key "
                                "id (the run's key changed: check in again)")
        reply = pb.CkksContextReply(key_id=setup.key_id, context=setup.context)
        self.metrics.bytes_moved("down", reply.ByteSize())
        return reply

    def _ckks_upload(self, setup: CkksSetup, header: Any,
                     buf: bytes | bytearray) -> pb.UploadReply:
        """Hand one device's ciphertexts to its CKKS round."""
        assert self.gateway is not None
        rnd = int(header.round)
        try:
            ciphertexts = unpack_ciphertexts(buf, setup.ciphertexts(self.dim),
                                             setup.params.ciphertext_bytes)
        except UpdateRejected as exc:
            return self._refuse(exc.reason, exc.detail, header.device_id, rnd)
        try:
            self.gateway.ckks_upload(header.device_id, rnd, int(header.base_version),
                                     header.upload_key, bytes(header.ckks_key), ciphertexts,
                                     self.clock(), upload_bytes=len(buf))
        except UpdateRejected as exc:
            return self._refuse(exc.reason, exc.detail, header.device_id, rnd, counted=True)
        self.metrics.bytes_moved("up", len(buf))
        return pb.UploadReply(accepted=True)
