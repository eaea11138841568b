"""How the aggregator treats devices: :class:`AggregatorSettings`, the device-facing limits
and pacing of :class:`~shoal.transport.server.AggregatorService` (built from the config's
``[deploy]`` and ``[compression]`` tables by :func:`shoal.deploy.settings_from_config`; the
round rules are the coordinator's policy)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AggregatorSettings"]


@dataclass(frozen=True)
class AggregatorSettings:
    """How the aggregator treats devices (the round rules are the coordinator's policy).

    Attributes:
        max_update_bytes: refuse uploads larger than this; 0 = the largest an update of the
            model can be in the task's codec (:func:`~shoal.transport.downloads.
            upload_limit`), which also bounds any value given here.
        chunk_size: bytes per download chunk.
        rate_per_s, burst: per-device token bucket over all calls.
        idle_retry_s: how far ahead a device is told to come back when no task is open
            (jittered over this window).
        checkin_interval_s: devices the open task does not need (not selected, already
            reported) come back within [0.5, 1.5] x this. Raise it for large populations
            (pace steering spreads their check-ins over the window).
        absent_after_s: a selected device this late past its last appointment is counted
            failed (``absent``) at once (:mod:`~shoal.device_absence`); 0 = never.
        heartbeat_s: with ``absent_after_s``, devices whose runtime heartbeats are asked to
            call Heartbeat this often during a training task, so one that dies holding a
            task is found absent too; 0 = not asked (a task's deadline binds its holder).
        max_active_uploads: uploads read at once; the rest wait (HTTP/2 flow control holds
            their bytes on the devices), so the server's memory stays flat however many
            devices upload together.
        bdp_probe: HTTP/2 windows grown to each connection's bandwidth-delay product instead
            of a fixed 64 KiB (:func:`~shoal.transport.listener.server_options`): faster
            uploads, but a waiting upload may buffer a whole window (trusted callers only).
        idle_timeout_s: longest wait for a caller's next message (a unary request, a
            stream's header, each chunk), and for a connection to finish its handshake or
            make a call; an idle call ends ``DEADLINE_EXCEEDED`` (after 1-1.25 x this),
            an idle connection closes.
        max_weight: the largest weight (example count) one update carries, larger claims
            count as this; 0 = ``weight_cap_multiple`` x the median size of the devices
            (:class:`~shoal.device_weights.WeightCap`).
        weight_cap_multiple: see ``max_weight``.
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

    max_update_bytes: int = 0
    chunk_size: int = 256 << 10
    rate_per_s: float = 20.0
    burst: float = 40.0
    idle_retry_s: float = 2.0
    checkin_interval_s: float = 5.0
    absent_after_s: float = 0.0
    heartbeat_s: float = 0.0
    max_active_uploads: int = 64
    bdp_probe: bool = False
    idle_timeout_s: float = 20.0
    max_weight: int = 0
    weight_cap_multiple: float = 4.0
    roster_wait_s: float = 15.0
    stage_timeout_s: float = 10.0
    long_poll_s: float = 2.0
    upload_codec: str = ""
    error_feedback: bool = False
    download_codec: str = "none"
    delta_downloads: bool = False
    keep_versions: int = 4
