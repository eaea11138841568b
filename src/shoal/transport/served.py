"""The device side of serving: the production model and its training plan, verified.

:class:`ServedModel` is the part of :class:`~shoal.transport.client.DeviceClient` that fetches
what the aggregator *serves* (task-free, separate from training; the server side is
:mod:`shoal.transport.serving`): ``GetModel`` -- the full model, an exact delta against the
served version the device holds, or "not modified" -- and ``GetPlan``. Version numbers here
are the model store's, a namespace of their own (a training task's ``model_version`` is the
run's).

With the operator's public key (``trusted``, :func:`~shoal.lifecycle.keys.load_trusted_key`)
nothing is installed before its signature verifies (:func:`~shoal.lifecycle.signing.
verify_artifact`): the scheme and key id must be the operator's, the signature valid, the
bytes the signed ones (a delta is checked once applied, on the float32 model it rebuilt), and
the signed version the one the stream carries. A model or plan that fails is refused with
:class:`~shoal.lifecycle.signing.SignatureRejected` naming the reason (``unsigned``,
``wrong_key``, ``tampered``, ...), the server is told with a ``Decline``
(``signature_rejected``), and the device keeps the model and plan it had. Without a trusted
key nothing is verified (a device must be provisioned with the key to refuse anything).

Sans-gRPC except for the calls it is handed: the client passes its stub, its retrying ``rpc``
and its counters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from shoal.errors import CodecError
from shoal.lifecycle.signing import (SignatureRejected, SignedArtifact, TrustedKey,
                                     model_bytes, verify_artifact)
from shoal.transport.device_api import ClientStats, DownloadRefused
from shoal.transport.download_stream import decode_model, receive_model
from shoal.transport.proto import shoal_pb2 as pb

__all__ = ["ServedModel", "check_signed"]

_T = TypeVar("_T")
_MAX_PLAN_BYTES = 1 << 20


def check_signed(trusted: TrustedKey | None, kind: str, payload: bytes, version: int,
                 signed: SignedArtifact | None) -> None:
    """Refuse ``payload`` (a model's :func:`~shoal.lifecycle.signing.model_bytes` or a plan's
    JSON) unless the operator signed exactly it as ``version``; nothing to check without a
    trusted key.

    Raises:
        SignatureRejected: the reason, e.g. ``unsigned``, ``wrong_key``, ``tampered`` or
            ``wrong_version`` (a valid signature of another version replayed).
    """
    if trusted is None:
        return
    signed_version = verify_artifact(trusted, kind, payload, signed)
    if signed_version != version:
        raise SignatureRejected(f"the {kind} is signed as version {signed_version}, the "
                                f"server sent it as version {version}", "wrong_version")


class ServedModel:
    """What one device holds of the served model and plan (not thread-safe: the client's
    thread).

    Args:
        device_id: this device.
        stub: the ``Aggregator`` stub; metadata: the call credentials.
        rpc: ``rpc(method, call)``: the client's call with transient failures retried.
        trusted: the operator's public key, or ``None``: install without verifying.
        stats: the client's counters (``downloads``, ``bytes_down``, ``download_errors``,
            ``served_versions``, ``signature_rejections``).
        max_model_bytes, max_elements, chunk_size, timeout_s, transfer_timeout_s: as for
            the client's training downloads.
    """

    def __init__(self, device_id: str, stub: Any, metadata: tuple[tuple[str, str], ...],
                 rpc: Callable[[str, Callable[[], Any]], Any], *,
                 trusted: TrustedKey | None, stats: ClientStats, max_model_bytes: int,
                 max_elements: int, chunk_size: int, timeout_s: float,
                 transfer_timeout_s: float, log: logging.Logger) -> None:
        self.device_id, self._stub, self._metadata, self._rpc = device_id, stub, metadata, rpc
        self.trusted, self._stats, self._log = trusted, stats, log
        self.max_model_bytes, self.max_elements = max_model_bytes, max_elements
        self.chunk_size, self.timeout_s = chunk_size, timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.model: tuple[int, np.ndarray] | None = None  # (store version, read-only params)
        self.plan: tuple[int, Mapping[str, Any]] | None = None

    @property
    def version(self) -> int:
        """The served model version held (0: none)."""
        return 0 if self.model is None else self.model[0]

    def fetch_model(self, task: pb.Task | None = None) -> tuple[int, np.ndarray]:
        """The model the server serves this device now: the held one when it says "not
        modified", else the new one once verified (then held).

        Args:
            task: the evaluation task this fetch is for (its ``Decline`` names it).

        Raises:
            SignatureRejected: the model is unsigned or its signature fails; the server was
                told (``Decline``) and the held model is unchanged.
            DownloadRefused, CodecError: the stream or payload is malformed (nothing held
                changes).
            TransportError: the call failed (e.g. ``NOT_FOUND``: nothing in production).
        """
        have = self.version
        request = pb.GetModelRequest(device_id=self.device_id, have_version=have,
                                     chunk_size=self.chunk_size)

        def call() -> Any:
            stream = self._stub.GetModel(request, timeout=self.transfer_timeout_s,
                                         metadata=self._metadata)
            try:
                return receive_model(stream, version=None, have=have,
                                     max_bytes=self.max_model_bytes, on_bytes=self._count)
            finally:
                stream.cancel()

        got = self._rpc("GetModel", call)
        if got.not_modified:
            assert self.model is not None  # receive_model refuses "not modified" for 0
            return self.model
        try:
            params = decode_model(got.payload, got.version, got.base, self.model,
                                  max_elements=self.max_elements)
        except (DownloadRefused, CodecError):
            self._stats.download_errors += 1
            raise
        self._verify("model", model_bytes(params), got.version, got.signed, task)
        params.setflags(write=False)
        self.model = (got.version, params)
        self._stats.downloads += 1
        self._stats.served_versions.append(got.version)
        self._log.info("served model version %d installed%s", got.version,
                       f" (delta against {got.base})" if got.base else "")
        return self.model

    def fetch_plan(self) -> tuple[int, Mapping[str, Any]]:
        """The training plan of the served version (canonical JSON, parsed), held once
        verified.

        Raises:
            SignatureRejected: as :meth:`fetch_model` (the held plan is unchanged).
            DownloadRefused: the plan is not a JSON object within 1 MiB.
            TransportError: the call failed (``NOT_FOUND``: no plan is served).
        """
        have = 0 if self.plan is None else self.plan[0]
        reply = self._rpc("GetPlan", lambda: self._stub.GetPlan(
            pb.GetPlanRequest(device_id=self.device_id, have_version=have),
            timeout=self.timeout_s, metadata=self._metadata))
        self._stats.bytes_down += len(reply.plan)
        if reply.not_modified:
            if self.plan is None or reply.version != have:
                raise DownloadRefused(f"'not modified' for plan version {reply.version}, "
                                      f"but the device holds {have}")
            return self.plan
        raw = bytes(reply.plan)
        try:
            if len(raw) > _MAX_PLAN_BYTES:
                raise ValueError(f"{len(raw)} bytes, more than {_MAX_PLAN_BYTES}")
            plan = json.loads(raw)
            if not isinstance(plan, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise DownloadRefused(f"plan version {reply.version} is malformed: {exc}"
                                  ) from None
        signed = SignedArtifact(bytes(reply.signed_header), bytes(reply.signature)) \
            if reply.signed_header or reply.signature else None
        self._verify("plan", raw, int(reply.version), signed, None)
        self.plan = (int(reply.version), plan)
        self._log.info("training plan version %d installed", reply.version)
        return self.plan

    def decline(self, reason: str, detail: str, version: int, task: pb.Task | None) -> None:
        """Tell the server this device refuses what it was sent (or its ``task``). A
        failing call is logged, not raised: the refusal stands either way."""
        request = pb.Declined(device_id=self.device_id, reason=reason, detail=detail[:256],
                              model_version=version)
        if task is not None:
            request.task_id, request.round = task.task_id, task.round
            request.upload_key = task.upload_key
        try:
            self._rpc("Decline", lambda: self._stub.Decline(
                request, timeout=self.timeout_s, metadata=self._metadata))
        except Exception as exc:  # noqa: BLE001 - the refusal is the device's own decision
            self._log.warning("could not tell the server about the refusal: %s", exc)

    def _verify(self, kind: str, payload: bytes, version: int,
                signed: SignedArtifact | None, task: pb.Task | None) -> None:
        try:
            check_signed(self.trusted, kind, payload, version, signed)
        except SignatureRejected as exc:
            self._stats.signature_rejections += 1
            self._log.error("REFUSED served %s version %d: %s (%s); keeping version %d",
                            kind, version, exc, exc.reason,
                            self.version if kind == "model" else
                            (0 if self.plan is None else self.plan[0]))
            self.decline("signature_rejected", f"{exc.reason}: {exc}", version, task)
            raise

    def _count(self, n: int) -> None:
        self._stats.bytes_down += n
