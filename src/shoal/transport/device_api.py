"""What a device's code hands the runtime (``DeviceClient``) and gets back from it.

A device plugs into :class:`~shoal.transport.client.DeviceClient` a :class:`TrainFn`
(returning a :class:`TrainResult`) and optionally an :class:`EvaluateFn`; ``run`` returns
:class:`ClientStats` and raises :class:`CredentialsRejected` or :class:`TransportError`.
Nothing here needs gRPC or PyTorch: :mod:`shoal.transport.reference` builds on this alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from shoal.errors import ProtocolError, ShoalError

__all__ = [
    "TrainResult",
    "TrainFn",
    "EvaluateFn",
    "ClientStats",
    "CredentialsRejected",
    "TransportError",
    "DownloadRefused",
]


@dataclass(frozen=True)
class TrainResult:
    """What a device's training function returns.

    Attributes:
        delta: flat float32 update, ``trained - received``, the model's length.
        num_examples: examples trained on (the update's FedAvg weight).
        metrics: e.g. ``{"loss": ...}``; sent with the upload.
    """

    delta: np.ndarray
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class TrainFn(Protocol):
    """Local training: ``params`` is the downloaded model (flat float32, read-only),
    ``settings`` the task's server-sent settings, ``round`` the task's round."""

    def __call__(self, params: np.ndarray, settings: Mapping[str, float], round: int
                 ) -> TrainResult: ...


class EvaluateFn(Protocol):
    """Local evaluation of ``params``: returns ``(num_examples, metrics)``."""

    def __call__(self, params: np.ndarray) -> tuple[int, dict[str, float]]: ...


@dataclass
class ClientStats:
    """Counters of one :class:`~shoal.transport.client.DeviceClient` (``run`` returns a
    snapshot).

    Attributes:
        rounds_trained: train tasks whose update was uploaded (accepted or not).
        uploads_accepted: uploads the server accepted.
        rejections: refused uploads by the server's reason (``"late"``, ``"stale"``, ...).
        reconnects: retries after a transient failure (an RPC error or an upload refused with
            an empty reason).
        bytes_up / bytes_down: payload bytes sent / received, failed attempts included.
        check_ins, come_backs: CheckIn calls answered, and how many said "come back later".
        downloads: model downloads completed and verified; cache_hits: downloads skipped
            because that version was already held.
        download_errors: downloads refused (size, offsets, checksum, codec) and retried.
        evaluations: evaluation results reported.
        tasks_abandoned: tasks given up (download kept failing, version gone, no evaluate
            function, unknown kind, or an update that could not be encoded).
        secagg: secure-aggregation rounds by how they ended for this device (``"done"``,
            ``"dropped"``, ``"excluded"``, ``"aborted"``, ``"refused:<reason>"``).
        served_versions: the served (model-store) versions installed, in order: every
            version this device ever held for inference or evaluation.
        signature_rejections: models or plans refused because their signature did not
            verify (unsigned, another key, tampered, ...).
        heartbeats: ``Heartbeat`` calls answered while carrying out tasks
            (``Task.heartbeat_s``).
    """

    rounds_trained: int = 0
    uploads_accepted: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    check_ins: int = 0
    come_backs: int = 0
    downloads: int = 0
    cache_hits: int = 0
    download_errors: int = 0
    evaluations: int = 0
    tasks_abandoned: int = 0
    secagg: dict[str, int] = field(default_factory=dict)
    served_versions: list[int] = field(default_factory=list)
    signature_rejections: int = 0
    heartbeats: int = 0


class CredentialsRejected(ShoalError):
    """The server refused the device's token (``UNAUTHENTICATED``) or its rights
    (``PERMISSION_DENIED``): it is wrong, expired, revoked or lacks a scope. Retrying with the
    same token cannot help; enrol again or fix the clock. Nothing was sent after the refusal.

    Attributes:
        device_id: this device.
        code: the gRPC status name, e.g. ``"UNAUTHENTICATED"``.
        detail: the server's message.
    """

    def __init__(self, device_id: str, code: str, detail: str) -> None:
        super().__init__(f"device {device_id!r}: the server refused its credentials ({code}: "
                         f"{detail or 'no detail'}); the token is wrong, expired or revoked — "
                         f"retrying will not help, enrol the device again")
        self.device_id, self.code, self.detail = device_id, code, detail


class TransportError(ProtocolError):
    """An RPC failed in a way the runtime does not retry (an unexpected status), or a
    transient failure outlasted ``max_retries``.

    Attributes:
        method: the RPC (``"CheckIn"``, ...); code: gRPC status name.
    """

    def __init__(self, message: str, *, method: str, code: str) -> None:
        super().__init__(message, party="aggregator")
        self.method, self.code = method, code


class DownloadRefused(ProtocolError):
    """A downloaded model failed a check (size bound, version, offsets, checksum, codec); it
    was discarded before use."""


class TaskAbandoned(Exception):
    """The runtime gives up the current task and checks in again (counted in
    ``tasks_abandoned``); raised inside ``DeviceClient.run``, never out of it."""
