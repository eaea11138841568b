"""The updates a device sends and how: encoded in the task's chain, streamed in chunks, retried
under one idempotency key.

:class:`DeviceUpdates` is the part of :class:`~shoal.transport.client.DeviceClient` that
uploads. It encodes a plain (or clipped) update with the chain the task names
(``Task.upload_codec``) through the simulator's :class:`~shoal.uplink.Uplink` -- the same chain
objects, residual rule and wire format -- and with ``Task.error_feedback`` keeps the residual of
what compression dropped across rounds (in memory; a change of chain, error-feedback setting or
model size drops it). The stochastic stages (quantizer dither, random-k) draw from
``codec_rng(round)``.

An upload streams ``UploadHeader`` (the payload's size and SHA-256, a fresh idempotency key
from :mod:`secrets`) then the payload in ``chunk_size`` pieces. An upload refused without a
reason (a server-side transport failure) is sent again after a backoff with the *same*
idempotency key, so the server answers a duplicate with the original result instead of counting
the update twice; an accepted or rejected (with a reason) upload is counted. A CKKS upload is
the same stream carrying framed ciphertexts (:mod:`shoal.transport.ckks_device`) and the
context's key id. The messages of a secure-aggregation round
(:class:`~shoal.transport.secure_round.SecAggParticipant`) go out through :meth:`send_secagg`:
the streaming ``SecAgg`` call when a masked input is carried, ``SecAggStep`` otherwise.

The client hands it its stub, its retrying call, its backoff wait and its counters.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from shoal.codec import Chain
from shoal.errors import CodecError, ConfigError, SpecError, UpdateRejected
from shoal.privacy.dp import clip_to_norm
from shoal.transport.device_api import ClientStats, TaskAbandoned, TrainFn, TrainResult
from shoal.transport.proto import shoal_pb2 as pb
from shoal.uplink import Uplink

__all__ = ["DeviceUpdates"]


class DeviceUpdates:
    """What one device sends (not thread-safe: the client's thread).

    Args:
        device_id: this device.
        stub: the ``Aggregator`` stub; metadata: the call credentials.
        task_rpc: ``task_rpc(method, call)``: the client's call with transient failures
            retried, an unexpected status abandoning the task.
        pause: ``pause(attempt)``: wait the backoff before sending a refused upload again.
        train: the device's training function.
        stats: the client's counters (``bytes_up``, ``bytes_down``, ``reconnects``,
            ``rounds_trained``, ``uploads_accepted``, ``rejections``).
        codec_rng: ``codec_rng(round)``: the generator of that round's stochastic codec
            stages.
        chunk_size, timeout_s, transfer_timeout_s: the client's bounds.
        log: the client's logger.
    """

    def __init__(self, device_id: str, stub: Any, metadata: tuple[tuple[str, str], ...],
                 task_rpc: Callable[[str, Callable[[], Any]], Any],
                 pause: Callable[[int], None], *, train: TrainFn, stats: ClientStats,
                 codec_rng: Callable[[int], np.random.Generator], chunk_size: int,
                 timeout_s: float, transfer_timeout_s: float, log: logging.Logger) -> None:
        self.device_id, self._stub, self._metadata = device_id, stub, metadata
        self._task_rpc, self._pause, self._train = task_rpc, pause, train
        self._stats, self._codec_rng, self._log = stats, codec_rng, log
        self.chunk_size, self.timeout_s = chunk_size, timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self._uplink: Uplink | None = None  # the task's chain and this device's residual
        self._uplink_key: tuple[str, bool, int] | None = None

    @property
    def residual(self) -> np.ndarray | None:
        """A copy of the error-feedback residual carried into the next upload (``None``
        without error feedback or before the first compressed upload)."""
        r = self._uplink.residuals.get(0) if self._uplink is not None else None
        return None if r is None else r.copy()

    def train(self, params: np.ndarray, task: pb.Task) -> TrainResult:
        """The device's ``train`` on ``params`` with the task's settings, its delta checked
        against the model's shape and, with ``Task.clip_norm`` > 0 (central DP), clipped to
        that L2 norm and weighed as one example, before it is encoded or masked.

        Raises:
            SpecError: ``train`` returned a delta of another shape than the model's.
            TaskAbandoned: the update cannot be clipped (e.g. it is not finite).
        """
        result = self._train(params, dict(task.settings), int(task.round))
        delta = np.asarray(result.delta)
        if delta.shape != params.shape:
            raise SpecError(f"train returned a delta of shape {delta.shape}, the model has "
                            f"shape {params.shape}")
        if task.clip_norm > 0:
            # central DP: this device's influence is bounded here, before encoding or
            # masking (under secure aggregation the server never sees the update to clip it)
            try:
                clipped, _, _ = clip_to_norm(delta.astype(np.float32, copy=False),
                                             float(task.clip_norm))
            except UpdateRejected as exc:
                raise TaskAbandoned(f"update cannot be clipped: {exc}") from None
            result = replace(result, delta=clipped,
                             num_examples=1 if result.num_examples > 0 else 0)
        return result

    def encode(self, task: pb.Task, delta: np.ndarray) -> bytes:
        """The update in the task's chain, through the device's one-client uplink (the
        simulator's code: same chain objects, residual rule and wire format).

        Raises:
            TaskAbandoned: the task's chain does not parse, or the update cannot be encoded
                (e.g. training diverged to NaN: it is never uploaded).
        """
        key = (task.upload_codec, bool(task.error_feedback), int(delta.size))
        if self._uplink is None or self._uplink_key != key:
            try:
                chain = Chain.parse(task.upload_codec, key="task.upload_codec")
            except ConfigError as exc:
                raise TaskAbandoned(f"cannot use the task's upload codec: {exc}") from None
            if self._uplink is not None and self._uplink.residuals:
                self._log.info("upload codec is now %r (error feedback %s): residual dropped",
                               task.upload_codec, task.error_feedback)
            self._uplink = Uplink(int(delta.size), chain, error_feedback=key[1])
            self._uplink_key = key
        try:
            return self._uplink.encode(0, delta, self._codec_rng(int(task.round)))
        except CodecError as exc:  # e.g. training diverged to NaN: never upload it
            raise TaskAbandoned(f"update cannot be encoded: {exc}") from None

    def send_secagg(self, header: pb.SecAggHeader, masked: bytes) -> pb.SecAggReply:
        """The RPC of :class:`~shoal.transport.secure_round.SecAggParticipant`: the streaming
        SecAgg call when it carries a masked input, SecAggStep otherwise."""
        self._stats.bytes_up += header.ByteSize()  # keys and shares are the payload here
        if masked:
            reply = self._task_rpc("SecAgg", lambda: self._stub.SecAgg(
                self._chunks(pb.SecAggChunk, header, masked), timeout=self.transfer_timeout_s,
                metadata=self._metadata))
        else:
            reply = self._task_rpc("SecAggStep", lambda: self._stub.SecAggStep(
                header, timeout=self.timeout_s, metadata=self._metadata))
        self._stats.bytes_down += reply.ByteSize()
        return reply

    def _chunks(self, chunk_type: Any, header: Any, payload: bytes) -> Iterator[Any]:
        """``chunk_type(header=...)``, then the payload in ``chunk_size`` pieces (counted in
        ``bytes_up`` as they are sent): the body of a streaming Upload or SecAgg call."""
        yield chunk_type(header=header)
        for off in range(0, len(payload), self.chunk_size):
            data = payload[off:off + self.chunk_size]
            self._stats.bytes_up += len(data)
            yield chunk_type(data=data)

    def upload(self, task: pb.Task, result: TrainResult, payload: bytes, *,
               ckks_key: bytes = b"") -> pb.ComeBack | None:
        """Stream ``payload`` (the encoded update, or a CKKS upload's framed ciphertexts with
        ``ckks_key`` the context's key id) as the task's upload and count the answer.

        Returns:
            When to check in next if the aggregator accepted it and said so (pace steering;
            ``None``: at once)."""
        header = pb.UploadHeader(
            device_id=self.device_id, round=task.round, base_version=task.model_version,
            upload_key=task.upload_key, idempotency_key=secrets.token_hex(16),
            num_examples=int(result.num_examples),
            metrics={k: float(v) for k, v in result.metrics.items()},
            total_size=len(payload), sha256=hashlib.sha256(payload).digest(),
            ckks_key=ckks_key)

        for attempt in itertools.count():
            reply = self._task_rpc("Upload", lambda: self._stub.Upload(
                self._chunks(pb.UploadChunk, header, payload),
                timeout=self.transfer_timeout_s, metadata=self._metadata))
            if reply.accepted or reply.reason:
                break
            # Refused without a reason: a server-side transport failure; retry, same key.
            self._log.warning("upload refused without a reason (%s); retrying", reply.detail)
            self._stats.reconnects += 1
            self._pause(attempt)
        self._stats.rounds_trained += 1
        if reply.accepted:
            self._stats.uploads_accepted += 1
            self._log.info("round %d: update accepted (%d examples)", task.round,
                           result.num_examples)
            return reply.come_back if reply.HasField("come_back") else None
        else:
            self._stats.rejections[reply.reason] = self._stats.rejections.get(reply.reason, 0) + 1
            self._log.warning("round %d: update rejected (%s): %s", task.round, reply.reason,
                              reply.detail)
        return None
