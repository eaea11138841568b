"""The device-side client runtime of a gRPC deployment: check in, download, train, upload.

Devices pull, as in K. Bonawitz et al., "Towards Federated Learning at Scale: System Design"
(MLSys 2019): a :class:`DeviceClient` says Hello once, then loops CheckIn → (Task: Download →
train or evaluate → Upload or ReportEvaluation) or (ComeBack: wait until the server's time);
an accepted Upload's reply may carry the ComeBack a check-in would get (pace steering).
The protocol is ``shoal/transport/proto/shoal.proto``; payloads are shoal's codec wire format
(:mod:`shoal.codec.wire`), so the runtime trusts nothing it downloads: a model is reassembled
into a buffer preallocated from a bounded declared size, offsets must be contiguous, the
SHA-256 of the whole payload must match, and the codec parser then validates the payload before
any vector is built. A refused download is counted and retried (asking for the full model);
it is never trained on.

Signed models (issue 19): with the operator's public key (``trusted_key``) every model the
device installs -- a training download, the served model (``GetModel``), the training plan
(``GetPlan``) -- must carry the operator's valid signature of exactly those bytes and that
version; anything unsigned, signed by another key or tampered with is refused
(:class:`~shoal.lifecycle.signing.SignatureRejected`), the server told with a ``Decline``
(``signature_rejected``), and the device keeps the model it had
(:mod:`shoal.transport.device_models`). An evaluation task with ``served_model`` evaluates the
model the device is served (a canary's candidate inside the canary, production outside) and
reports with the task's id and key.

Codecs, as in simulation: the device asks for a model with the version it holds, and decodes
a delta against it (:mod:`shoal.codec.delta`; exact, so it holds the server's float32 bytes).
It encodes its update with the chain the task names (``Task.upload_codec``, the config's
spelling of ``compression.upload``) through the simulator's :class:`~shoal.uplink.Uplink`, and
with ``Task.error_feedback`` keeps the residual of what compression dropped across rounds (in
memory: a restarted runtime starts from no residual, and a change of chain drops it). A task
with ``clip_norm`` > 0 (central DP) has the update clipped to that L2 norm and weighed as one
example before it is encoded or masked. Training, clipping, encoding and the upload streams are
:mod:`shoal.transport.device_updates`.

Resilience: an RPC that fails with a transient status (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``,
``RESOURCE_EXHAUSTED``, ``ABORTED``, ``CANCELLED``, ``UNKNOWN``: a busy, restarting or failing
aggregator) is retried after an exponential backoff with full jitter
(:mod:`shoal.transport.channel`): ``uniform(0, min(max_backoff_s, 0.5 · 2**n))`` for the
n-th consecutive failure, reset by any success. A retried upload repeats its
idempotency key, so the server answers it with the original result instead of counting the
update twice. Refused credentials (``UNAUTHENTICATED``/``PERMISSION_DENIED``) raise
:class:`~shoal.transport.device_api.CredentialsRejected` at once: retrying cannot help. Every
RPC has a deadline. A secure-aggregation task is handed to
:class:`~shoal.transport.secure_round.SecAggParticipant`. A task with ``heartbeat_s`` > 0 is
carried out with a ``Heartbeat`` call that often from a thread of its own
(:mod:`shoal.transport.heartbeat`), so the aggregator can tell a device that died holding
its task from one still training.

What the device's own code plugs in (train and evaluate functions) and gets back (counters,
errors) is :mod:`shoal.transport.device_api`. Time comes from the injected ``clock`` and
``sleep``, so tests run without waiting.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import TypeVar

import grpc  # type: ignore[import-untyped]
import numpy as np

from shoal.codec import STAGES
from shoal.errors import CodecError, ConfigError
from shoal.lifecycle.signing import SignatureRejected, TrustedKey
from shoal.transport.channel import MAX_CHUNK_BYTES, backoff_delay, make_channel, retryable
from shoal.transport.device_api import (ClientStats, DownloadRefused, EvaluateFn,
                                        TaskAbandoned, TrainFn, TransportError)
from shoal.transport.proto import shoal_pb2 as pb
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc
from shoal.transport.ckks_device import CkksEncryptor
from shoal.transport.secure_round import SecAggParticipant
from shoal.transport.device_models import DeviceModels
from shoal.transport.device_updates import DeviceUpdates
from shoal.transport.heartbeat import Heartbeats

__all__ = ["RUNTIME_VERSION", "DeviceClient"]

#: Sent in Hello. ``shoal-client/5`` calls ``Heartbeat`` every ``Task.heartbeat_s`` while it
#: carries out a task; ``/4`` evaluates the served model (``Task.served_model``),
#: reports with the task's id and key, and verifies signed models; ``/3`` clips to
#: ``Task.clip_norm`` with unit weight (central DP); ``/2`` honours
#: ``Task.upload_codec``/``error_feedback`` and decodes delta downloads; ``/1`` uploads raw
#: float32 and downloads full models. The aggregator gives tasks that ask for clipping only
#: to ``/3`` or later (older ones are refused ``runtime_too_old``).
RUNTIME_VERSION = "shoal-client/5"
_T = TypeVar("_T")
_WEEK = 7 * 24 * 60
_NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})


class _Stopped(Exception):
    """The ``stop`` event was set; unwinds ``run``."""


def _check(ok: bool, name: str, bound: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"client.{name} must be {bound}, got {value!r}", key=f"client.{name}")


# --------------------------------------------------------------------------- client

class DeviceClient:
    """One device's runtime against an aggregator (one thread at a time; not thread-safe).

    Args:
        target: ``"host:port"`` of the aggregator.
        token: the device's enrolment token (:func:`shoal.transport.tokens.issue_token`), sent
            as ``authorization: Bearer <token>`` metadata on every call; never logged.
        device_id: the id the token is bound to.
        root_certificates: PEM CA certificate(s) for TLS; ``None`` = plaintext (tests only).
        client_cert: ``(certificate chain PEM, private key PEM)`` for mutual TLS; the
            aggregator then requires the certificate's common name to equal ``device_id``.
        train: the local training function.
        evaluate: the local evaluation function; without it evaluate tasks are abandoned.
        attributes: sent in Hello (e.g. ``{"os": "android"}``) for stratified selection.
        examples: the device's number of training examples, declared in Hello
            (``capabilities["examples"]``): the aggregator bounds every device's update
            weight by a multiple of the median declared size (``None``: not declared).
        windows: weekly availability windows ``(start_minute, end_minute)`` in UTC.
        chunk_size: upload chunk bytes, also the preferred download chunk size.
        clock: Unix seconds; corrected by the server time from Hello for ComeBack waits.
        sleep: ``sleep(seconds)``; ``None`` waits on ``stop`` (``time.sleep`` without one),
            so setting ``stop`` ends a wait at once.
        rng: drives the backoff jitter (never the idempotency keys, which are from
            :mod:`secrets`).
        codec_rng: ``codec_rng(round)`` is the generator of the stochastic codec stages
            (quantizer dither, random-k) for that round's upload; default a fresh generator
            from OS entropy each round. The simulator's stream for client ``c`` is
            ``seeds.generator(seed, "uplink", round, c)``.
        max_backoff_s: cap of one backoff wait.
        max_wait_s / min_wait_s: bounds of one ComeBack wait.
        max_model_bytes: a model whose declared size is larger is refused before allocation.
        max_elements: largest model length decoded (default ``max_model_bytes // 4``).
        max_download_attempts: refused downloads of one task before it is abandoned.
        max_retries: consecutive transient failures before :class:`TransportError`
            (``None``: keep retrying until ``stop``).
        timeout_s: deadline of each unary RPC; transfer_timeout_s: of each Download/Upload.
        log: the logger.
        after_stage: called as ``after_stage(stage, round)`` once the server has taken this
            device's message for a secure-aggregation stage (``"advertise_keys"``,
            ``"share_keys"``, ``"masked_input"``, ``"unmasking"``); for progress reporting
            and fault injection (``shoal client --die-after``).
        trusted_key: the operator's public key: models and plans are installed only when it
            signed them (``None``: nothing is verified).
        served_every_s: fetch the served model (:meth:`fetch_served_model`) when the run
            starts and then at most this often between tasks (``None``: only when a task
            asks for it).
        min_noise: distributed DP: refuse a secure round asking for a noise share below
            this many clip norms (see :class:`~shoal.transport.secure_round.SecAggParticipant`;
            0: no floor).
    """

    def __init__(self, target: str, token: str, device_id: str, *,
                 root_certificates: bytes | None, train: TrainFn,
                 client_cert: tuple[bytes, bytes] | None = None,
                 evaluate: EvaluateFn | None = None,
                 attributes: Mapping[str, str] = _NO_ATTRIBUTES,
                 examples: int | None = None,
                 windows: Sequence[tuple[int, int]] = (), chunk_size: int = 256 * 1024,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] | None = None,
                 rng: random.Random | None = None,
                 codec_rng: Callable[[int], np.random.Generator] | None = None,
                 max_backoff_s: float = 30.0,
                 max_wait_s: float = 3600.0, min_wait_s: float = 1.0,
                 max_model_bytes: int = 128 << 20, max_elements: int | None = None,
                 max_download_attempts: int = 3, max_retries: int | None = None,
                 timeout_s: float = 30.0, transfer_timeout_s: float = 600.0,
                 log: logging.Logger | None = None,
                 after_stage: Callable[[str, int], None] | None = None,
                 trusted_key: TrustedKey | None = None,
                 served_every_s: float | None = None, min_noise: float = 0.0) -> None:
        _check(1 <= chunk_size <= MAX_CHUNK_BYTES, "chunk_size",
               f"in [1, {MAX_CHUNK_BYTES}] bytes", chunk_size)
        _check(0 < max_backoff_s < float("inf"), "max_backoff_s", "finite and > 0",
               max_backoff_s)
        _check(0 <= min_wait_s <= max_wait_s, "min_wait_s", "in [0, max_wait_s]", min_wait_s)
        _check(max_model_bytes >= 1, "max_model_bytes", ">= 1", max_model_bytes)
        _check(max_download_attempts >= 1, "max_download_attempts", ">= 1",
               max_download_attempts)
        _check(examples is None or (isinstance(examples, int) and examples >= 0),
               "examples", "None or an int >= 0", examples)
        for start, end in windows:
            _check(0 <= start < _WEEK and 0 <= end < _WEEK, "windows",
                   f"minutes in [0, {_WEEK})", (start, end))
        self.device_id = device_id
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._channel = make_channel(target, root_certificates, client_cert)
        self._stub = pb_grpc.AggregatorStub(self._channel)
        self._evaluate = evaluate
        self._attributes = dict(attributes)
        self._examples = examples
        self._windows = tuple((int(s), int(e)) for s, e in windows)
        self._clock, self._sleep = clock, sleep
        self._rng = rng if rng is not None else random.Random()
        self.max_backoff_s, self.max_wait_s, self.min_wait_s = max_backoff_s, max_wait_s, min_wait_s
        self.max_model_bytes = max_model_bytes
        self.max_elements = max_model_bytes // 4 if max_elements is None else max_elements
        self.max_retries = max_retries
        self._log = log or logging.getLogger("shoal.client")
        self._stats = ClientStats()
        self._failures = 0
        self._clock_offset = 0.0  # server time − local clock, from Hello
        self._said_hello = False
        self._stop: threading.Event | None = None
        self.served_every_s = served_every_s
        self._next_served = -float("inf")
        self._updates = DeviceUpdates(
            device_id, self._stub, self._metadata, self._task_rpc,
            lambda attempt: self._wait(self._backoff(attempt)), train=train, stats=self._stats,
            codec_rng=codec_rng if codec_rng is not None else (
                lambda _round: np.random.default_rng()),
            chunk_size=chunk_size, timeout_s=timeout_s, transfer_timeout_s=transfer_timeout_s,
            log=self._log)
        self._models = DeviceModels(
            device_id, self._stub, self._metadata, self._rpc, self._task_rpc,
            lambda attempt: self._wait(self._backoff(attempt)), trusted=trusted_key,
            stats=self._stats, max_model_bytes=max_model_bytes, max_elements=self.max_elements,
            chunk_size=chunk_size, timeout_s=timeout_s, transfer_timeout_s=transfer_timeout_s,
            max_download_attempts=max_download_attempts, log=self._log)
        self._secagg = SecAggParticipant(device_id, send=self._updates.send_secagg,
                                         train=self._updates.train, stats=self._stats,
                                         log=self._log, after_stage=after_stage,
                                         min_noise=min_noise)
        self._ckks = CkksEncryptor(lambda key: self._task_rpc(
            "CkksContext", lambda: self._stub.CkksContext(
                pb.CkksContextRequest(key_id=key), timeout=self.transfer_timeout_s,
                metadata=self._metadata)))

    # ----------------------------------------------------------------- public

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the counters."""
        return replace(self._stats, rejections=dict(self._stats.rejections),
                       secagg=dict(self._stats.secagg),
                       served_versions=list(self._stats.served_versions))

    @property
    def residual(self) -> np.ndarray | None:
        """A copy of the error-feedback residual carried into the next upload (``None``
        without error feedback or before the first compressed upload)."""
        return self._updates.residual

    # the bounds the uploads use, settable as before the uploads moved to DeviceUpdates
    @property
    def chunk_size(self) -> int:
        """Upload chunk bytes, also the preferred download chunk size."""
        return self._updates.chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int) -> None:
        self._updates.chunk_size = value

    @property
    def timeout_s(self) -> float:
        """Deadline of each unary RPC."""
        return self._updates.timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self._updates.timeout_s = value

    @property
    def transfer_timeout_s(self) -> float:
        """Deadline of each Download/Upload/SecAgg stream."""
        return self._updates.transfer_timeout_s

    @transfer_timeout_s.setter
    def transfer_timeout_s(self, value: float) -> None:
        self._updates.transfer_timeout_s = value

    @property
    def held_version(self) -> int:
        """The cached model version (0 = none)."""
        return self._models.training_version

    @property
    def served_model(self) -> tuple[int, np.ndarray] | None:
        """The served ``(model-store version, read-only params)`` held for inference."""
        return self._models.model

    @property
    def served_plan(self) -> tuple[int, Mapping] | None:
        """The training plan held ``(version, plan)``, verified when it was fetched."""
        return self._models.plan

    def fetch_served_model(self) -> tuple[int, np.ndarray]:
        """The model the aggregator serves this device for inference, verified (see
        :meth:`DeviceModels.fetch_model <shoal.transport.device_models.DeviceModels.fetch_model>`).

        Raises:
            SignatureRejected: refused (the held model is kept, the server told).
            DownloadRefused, CodecError, TransportError: as a training download.
        """
        return self._models.fetch_model()

    def fetch_plan(self) -> tuple[int, Mapping]:
        """The training plan of the served version, verified (see
        :meth:`DeviceModels.fetch_plan <shoal.transport.device_models.DeviceModels.fetch_plan>`)."""
        return self._models.fetch_plan()

    def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        self._channel.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, max_rounds: int | None = None, stop: threading.Event | None = None
            ) -> ClientStats:
        """Say Hello (once per client), then check in and carry out tasks until ``max_rounds``
        tasks (train or evaluate, whatever their outcome) are done or ``stop`` is set.

        Returns:
            A snapshot of the counters (they accumulate over calls).

        Raises:
            CredentialsRejected: the token was refused (nothing is retried).
            TransportError: an RPC failed with an unexpected status outside a task, or
                transient failures outlasted ``max_retries``.
            Exceptions of ``train``/``evaluate`` propagate unchanged.
        """
        self._stop = stop
        done = 0
        try:
            if not self._said_hello:
                self._hello()
            while max_rounds is None or done < max_rounds:
                self._check_stop()
                self._refresh_served()
                reply = self._rpc("CheckIn", lambda: self._stub.CheckIn(
                    pb.CheckInRequest(device_id=self.device_id, held_version=self.held_version),
                    timeout=self.timeout_s, metadata=self._metadata))
                self._stats.check_ins += 1
                kind = reply.WhichOneof("reply")
                if kind == "task":
                    steered = self._do_task(reply.task)  # the upload's reply may say when
                    done += 1
                    if steered is not None and (max_rounds is None or done < max_rounds):
                        self._wait_until(steered)
                elif kind == "come_back":
                    self._come_back(reply.come_back)
                else:
                    self._log.warning("empty CheckIn reply; checking in again after a backoff")
                    self._wait(self._backoff(0))
        except _Stopped:
            self._log.info("stopped")
        return self.stats

    # ----------------------------------------------------------------- steps

    def _hello(self) -> None:
        capabilities = {"codecs": ",".join(sorted(STAGES)),
                        "tasks": "train,evaluate" if self._evaluate else "train"}
        if self._examples is not None:
            capabilities["examples"] = str(self._examples)
        request = pb.HelloRequest(
            device_id=self.device_id, attributes=self._attributes, capabilities=capabilities,
            windows=[pb.Window(start_minute=s, end_minute=e) for s, e in self._windows],
            runtime_version=RUNTIME_VERSION)
        before = self._clock()
        reply = self._rpc("Hello", lambda: self._stub.Hello(
            request, timeout=self.timeout_s, metadata=self._metadata))
        if reply.server_time > 0:  # unset (0) means the server does not say
            self._clock_offset = reply.server_time - (before + self._clock()) / 2
        self._said_hello = True
        self._log.info("hello: server %s, model version %d, clock offset %.3f s",
                       reply.server_id, reply.model_version, self._clock_offset)

    def _refresh_served(self) -> None:
        """With ``served_every_s``: fetch the served model when it is due. A refusal or a
        failure is logged and leaves the held model; the loop goes on."""
        if self.served_every_s is None or self._clock() < self._next_served:
            return
        self._next_served = self._clock() + self.served_every_s
        try:
            self._models.fetch_model()
        except (SignatureRejected, DownloadRefused, CodecError, TransportError) as exc:
            self._log.warning("served model not updated: %s", exc)

    def _come_back(self, cb: pb.ComeBack) -> None:
        self._stats.come_backs += 1
        self._wait_until(cb)

    def _wait_until(self, cb: pb.ComeBack) -> None:
        now = self._clock() + self._clock_offset
        delay = min(self.max_wait_s, max(self.min_wait_s, cb.at - now))
        self._log.info("come back in %.1f s (%s)", delay, cb.reason or "no reason")
        self._wait(delay)

    def _do_task(self, task: pb.Task) -> pb.ComeBack | None:
        def beat() -> bool:
            reply = self._stub.Heartbeat(
                pb.HeartbeatRequest(device_id=self.device_id, round=task.round),
                timeout=self.timeout_s, metadata=self._metadata)
            self._stats.heartbeats += 1
            return bool(reply.keep_going)

        try:
            with Heartbeats(beat, task.heartbeat_s, self._log):  # if the task asks for them
                return self._carry_out(task)
        except TaskAbandoned as exc:
            self._stats.tasks_abandoned += 1
            self._log.warning("round %d: %s task abandoned: %s", task.round, task.kind, exc)
            return None

    def _carry_out(self, task: pb.Task) -> pb.ComeBack | None:
        """The task's work; returns when to check in next if the upload's reply said so."""
        if task.kind not in ("train", "evaluate", "secagg", "ckks"):
            raise TaskAbandoned(f"unknown task kind {task.kind!r}")
        if task.kind == "evaluate" and self._evaluate is None:
            raise TaskAbandoned("evaluate task but no evaluate function")
        if task.kind == "evaluate" and task.served_model:
            params = self._models.for_evaluation(task)
        else:
            params = self._models.for_task(task.model_version, task)
        if task.kind == "evaluate":
            assert self._evaluate is not None
            n, metrics = self._evaluate(params)
            report = pb.EvaluationResult(
                device_id=self.device_id, round=task.round, model_version=task.model_version,
                num_examples=int(n), metrics={k: float(v) for k, v in metrics.items()},
                task_id=task.task_id, upload_key=task.upload_key)
            self._task_rpc("ReportEvaluation", lambda: self._stub.ReportEvaluation(
                report, timeout=self.timeout_s, metadata=self._metadata))
            self._stats.evaluations += 1
            return None
        if task.kind == "secagg":
            self._secagg.run(task, params)
            return None
        if task.kind == "ckks":  # the server adds ciphertexts; a key holder decrypts the sum
            result = self._updates.train(params, task)
            return self._updates.upload(
                task, result, self._ckks.encrypt(task.ckks, result.delta,
                                                 int(result.num_examples)),
                ckks_key=task.ckks.key_id)
        result = self._updates.train(params, task)
        return self._updates.upload(task, result,
                                    self._updates.encode(task, np.asarray(result.delta)))

    def _task_rpc(self, method: str, call: Callable[[], _T]) -> _T:
        """:meth:`_rpc` within a task: an unexpected status (e.g. the version is gone, the
        round closed) abandons the task instead of stopping the runtime."""
        try:
            return self._rpc(method, call)
        except TransportError as exc:
            if exc.code == "RETRIES_EXHAUSTED":
                raise
            raise TaskAbandoned(str(exc)) from None

    # ----------------------------------------------------------------- retries and waits

    def _rpc(self, method: str, call: Callable[[], _T]) -> _T:
        """``call()`` with transient failures retried after a backoff; auth failures raise."""
        while True:
            self._check_stop()
            try:
                result = call()
            except grpc.RpcError as exc:
                why = retryable(exc, method, self.device_id)  # or raises
                if self.max_retries is not None and self._failures >= self.max_retries:
                    raise TransportError(
                        f"{method} still failing after {self._failures} retries: {why}",
                        method=method, code="RETRIES_EXHAUSTED") from None
                self._stats.reconnects += 1
                delay = self._backoff(self._failures)
                self._failures += 1
                self._log.warning("%s failed (%s); retry %d in %.2f s", method, why,
                                  self._failures, delay)
                self._wait(delay)
                continue
            self._failures = 0
            return result

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, self._rng, cap_s=self.max_backoff_s)

    def _wait(self, seconds: float) -> None:
        stop = self._stop
        if self._sleep is not None:
            self._sleep(seconds)
        elif stop is not None:
            stop.wait(seconds)
        else:
            time.sleep(seconds)
        self._check_stop()

    def _check_stop(self) -> None:
        if self._stop is not None and self._stop.is_set():
            raise _Stopped

