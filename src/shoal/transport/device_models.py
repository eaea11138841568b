"""The models a device holds and how it gets them, verified: its training model, the served
(production) model and the training plan.

:class:`DeviceModels` is the part of :class:`~shoal.transport.client.DeviceClient` that
downloads models. A training task's model comes with ``Download`` (full, or an exact delta
against the version held; a refused download is retried, asking for the full model). What the
aggregator *serves* (task-free, separate from training; the server side is
:mod:`shoal.transport.serving`) comes with ``GetModel`` -- the full model, an exact delta
against the served version the device holds, or "not modified" -- and ``GetPlan``. Served
version numbers are the model store's, a namespace of their own (a training task's
``model_version`` is the run's).

With the operator's public key (``trusted``, :func:`~shoal.lifecycle.keys.load_trusted_key`)
nothing is installed before its signature verifies (:func:`~shoal.lifecycle.signing.
verify_artifact`): the scheme and key id must be the operator's, the signature valid, the
bytes the signed ones (a delta is checked once applied, on the float32 model it rebuilt), the
signed version the one the stream carries, and the signed series the one asked for:

* a training download must be signed as a training run's version (``train:<run id>``), and a
  version lower than the training model held of the same run is refused (``downgrade``: an
  old model replayed);
* a served model or plan must be signed as a model store's version (``served:<store id>``),
  and once the device holds one, of that same store (the first served install pins it).

What is *not* checked for served models: a lower served version of the same store is
accepted (a canary rolled back, or ``shoal models rollback``, legitimately serves an older
version, and nothing signed says which version is production now), so a server that
misbehaves can serve any older version the operator once signed for the store, including a
candidate that was rolled back.

A model or plan that fails is refused with :class:`~shoal.lifecycle.signing.
SignatureRejected` naming the reason (``unsigned``, ``wrong_key``, ``tampered``,
``wrong_namespace``, ``downgrade``, ...), the server is told with a ``Decline``
(``signature_rejected``), and the device keeps the model and plan it had; a training model
so refused is not retried and its task is declined. Without a trusted key nothing is verified
(a device must be provisioned with the key to refuse anything).

The client hands it its stub, its retrying calls, its waits and its counters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from shoal.errors import CodecError
from shoal.lifecycle.signing import (SignatureRejected, SignedArtifact, TrustedKey,
                                     artifact_namespace, model_bytes, verify_artifact)
from shoal.transport.device_api import ClientStats, DownloadRefused, TaskAbandoned
from shoal.transport.download_stream import Received, decode_model, receive_model
from shoal.transport.proto import shoal_pb2 as pb

__all__ = ["DeviceModels", "check_signed"]

_MAX_PLAN_BYTES = 1 << 20


def check_signed(trusted: TrustedKey | None, kind: str, payload: bytes, version: int,
                 signed: SignedArtifact | None, *, namespace: str,
                 held: tuple[str, int] | None = None) -> str | None:
    """Refuse ``payload`` (a model's :func:`~shoal.lifecycle.signing.model_bytes` or a plan's
    JSON) unless the operator signed exactly it as ``version`` of ``namespace`` (a series,
    ``"served"`` / ``"train"``, or one exact namespace); returns the signed namespace
    (``None``: nothing to check without a trusted key).

    Args:
        held: ``(namespace, version)`` the device holds: a lower version of the same
            namespace is refused as a ``downgrade``.

    Raises:
        SignatureRejected: the reason, e.g. ``unsigned``, ``wrong_key``, ``tampered``,
            ``wrong_namespace``, ``wrong_version`` (a valid signature of another version
            replayed) or ``downgrade``.
    """
    if trusted is None:
        return None
    signed_version = verify_artifact(trusted, kind, payload, signed, namespace=namespace)
    assert signed is not None  # verify_artifact refuses an unsigned payload
    if signed_version != version:
        raise SignatureRejected(f"the {kind} is signed as version {signed_version}, the "
                                f"server sent it as version {version}", "wrong_version")
    got = artifact_namespace(signed)
    if held is not None and held[0] == got and version < held[1]:
        raise SignatureRejected(f"the {kind} is version {version} of {got!r}, older than "
                                f"version {held[1]} held", "downgrade")
    return got


class DeviceModels:
    """What one device holds (not thread-safe: the client's thread).

    Args:
        device_id: this device.
        stub: the ``Aggregator`` stub; metadata: the call credentials.
        rpc: ``rpc(method, call)``: the client's call with transient failures retried;
            task_rpc: the same within a task (an unexpected status abandons the task).
        pause: ``pause(attempt)``: wait the backoff before retrying a refused download.
        trusted: the operator's public key, or ``None``: install without verifying.
        stats: the client's counters (``downloads``, ``cache_hits``, ``bytes_down``,
            ``download_errors``, ``served_versions``, ``signature_rejections``).
        max_model_bytes, max_elements, chunk_size, timeout_s, transfer_timeout_s,
        max_download_attempts: the client's bounds.
    """

    def __init__(self, device_id: str, stub: Any, metadata: tuple[tuple[str, str], ...],
                 rpc: Callable[[str, Callable[[], Any]], Any],
                 task_rpc: Callable[[str, Callable[[], Any]], Any],
                 pause: Callable[[int], None], *, trusted: TrustedKey | None,
                 stats: ClientStats, max_model_bytes: int, max_elements: int,
                 chunk_size: int, timeout_s: float, transfer_timeout_s: float,
                 max_download_attempts: int, log: logging.Logger) -> None:
        self.device_id, self._stub, self._metadata = device_id, stub, metadata
        self._rpc, self._task_rpc, self._pause = rpc, task_rpc, pause
        self.trusted, self._stats, self._log = trusted, stats, log
        self.max_model_bytes, self.max_elements = max_model_bytes, max_elements
        self.chunk_size, self.timeout_s = chunk_size, timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.max_download_attempts = max_download_attempts
        self.training: tuple[int, np.ndarray] | None = None  # (run version, read-only params)
        self.model: tuple[int, np.ndarray] | None = None  # (store version, read-only params)
        self.plan: tuple[int, Mapping[str, Any]] | None = None
        #: the signed namespaces of what is held: the training run's, and the store that
        #: serves this device (pinned by its first verified served model or plan)
        self.training_namespace: str | None = None
        self.served_namespace: str | None = None

    @property
    def training_version(self) -> int:
        """The training model version held (0: none)."""
        return 0 if self.training is None else self.training[0]

    def for_task(self, version: int, task: pb.Task) -> np.ndarray:
        """The training model ``version`` a task names: the held one, or downloaded (a
        delta against the held model first; after a refusal, the full model) and verified.

        Raises:
            TaskAbandoned: refused ``max_download_attempts`` times, or its signature failed
                (declined at once: the operator did not sign it, retrying cannot help).
        """
        if self.training is not None and self.training[0] == version:
            self._stats.cache_hits += 1
            return self.training[1]
        for attempt in range(self.max_download_attempts):
            base = self.training_version if attempt == 0 else 0
            request = pb.DownloadRequest(version=version, base_version=base,
                                         chunk_size=self.chunk_size)
            try:
                got = self._task_rpc("Download", lambda: self._receive(
                    self._stub.Download, request, version, base))
                params = decode_model(got.payload, version, got.base, self.training,
                                      max_elements=self.max_elements)
                held = None if self.training_namespace is None else (
                    self.training_namespace, self.training_version)
                namespace = self._verify("model", model_bytes(params), version, got.signed,
                                         task, keeping=self.training_version,
                                         namespace="train", held=held)
            except SignatureRejected as exc:
                raise TaskAbandoned(f"model version {version} refused: {exc}") from None
            except (DownloadRefused, CodecError) as exc:
                self._stats.download_errors += 1
                self._log.warning("model version %d refused (attempt %d of %d): %s", version,
                                  attempt + 1, self.max_download_attempts, exc)
                if attempt + 1 < self.max_download_attempts:
                    self._pause(attempt)
                continue
            params.setflags(write=False)
            self.training, self.training_namespace = (version, params), namespace
            self._stats.downloads += 1
            if got.base:
                self._log.info("model version %d: delta against %d (%d bytes)", version,
                               got.base, len(got.payload))
            return params
        raise TaskAbandoned(f"model version {version} refused {self.max_download_attempts} "
                            f"times")

    def for_evaluation(self, task: pb.Task) -> np.ndarray:
        """The served model an evaluation task names (``served_model``), verified.

        Raises:
            TaskAbandoned: refused, not downloadable, or the device is now served another
                version (the canary decided meanwhile); the task is declined with the
                reason.
        """
        try:
            version, params = self.fetch_model(task)
        except SignatureRejected as exc:
            raise TaskAbandoned(f"the served model was refused: {exc}") from None
        except (DownloadRefused, CodecError) as exc:
            self.decline("download_failed", str(exc), task.model_version, task)
            raise TaskAbandoned(f"the served model could not be downloaded: {exc}") from None
        if version != task.model_version:
            self.decline("not_served", f"served version {version}", task.model_version, task)
            raise TaskAbandoned(f"asked to evaluate version {task.model_version}, served "
                                f"{version}")
        return params

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
        got = self._rpc("GetModel", lambda: self._receive(self._stub.GetModel, request,
                                                          None, have))
        if got.not_modified:
            assert self.model is not None  # receive_model refuses "not modified" for 0
            return self.model
        try:
            params = decode_model(got.payload, got.version, got.base, self.model,
                                  max_elements=self.max_elements)
        except (DownloadRefused, CodecError):
            self._stats.download_errors += 1
            raise
        namespace = self._verify("model", model_bytes(params), got.version, got.signed, task,
                                 keeping=self.version, namespace=self.served_namespace
                                 or "served")
        params.setflags(write=False)
        self.model = (got.version, params)
        self.served_namespace = self.served_namespace or namespace
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
        namespace = self._verify("plan", raw, int(reply.version), signed, None,
                                 keeping=0 if self.plan is None else self.plan[0],
                                 namespace=self.served_namespace or "served")
        self.plan = (int(reply.version), plan)
        self.served_namespace = self.served_namespace or namespace
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

    def _receive(self, method: Any, request: Any, version: int | None, have: int
                 ) -> Received:
        """One ``Download`` or ``GetModel`` stream, reassembled and checked (not decoded)."""
        stream = method(request, timeout=self.transfer_timeout_s, metadata=self._metadata)
        try:
            return receive_model(stream, version=version, have=have,
                                 max_bytes=self.max_model_bytes, on_bytes=self._count)
        finally:
            stream.cancel()  # stop the server streaming a refused download; no-op once done

    def _verify(self, kind: str, payload: bytes, version: int,
                signed: SignedArtifact | None, task: pb.Task | None, *, keeping: int,
                namespace: str, held: tuple[str, int] | None = None) -> str | None:
        """:func:`check_signed`; a refusal is counted, logged and declined to the server."""
        try:
            return check_signed(self.trusted, kind, payload, version, signed,
                                namespace=namespace, held=held)
        except SignatureRejected as exc:
            self._stats.signature_rejections += 1
            self._log.error("REFUSED %s%s version %d: %s (%s); keeping version %d",
                            "" if namespace == "train" else "served ", kind, version, exc,
                            exc.reason, keeping)
            self.decline("signature_rejected", f"{exc.reason}: {exc}", version, task)
            raise

    def _count(self, n: int) -> None:
        self._stats.bytes_down += n
