"""The device's gRPC channel to the aggregator, and how the runtime reads a failed call.

:func:`make_channel` opens the channel (TLS, optionally mutual TLS; plaintext for loopback
tests only). A call that fails with a transient status (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``,
``RESOURCE_EXHAUSTED``, ``ABORTED``, ``CANCELLED``, ``UNKNOWN``, a reset stream:
:func:`is_transient`) is worth retrying after :func:`backoff_delay`, an exponential backoff
with full jitter (M. Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog, 2015):
an aggregator that is busy, cuts an idle call, restarts, stops on a full disk or hits a bug
of its own must not make its devices leave. Refused credentials (:func:`refuses_credentials`)
are not: retrying with the same token cannot help.
"""

from __future__ import annotations

import random

import grpc  # type: ignore[import-untyped]

from shoal.errors import ConfigError
from shoal.transport.device_api import CredentialsRejected, TransportError

__all__ = ["MAX_CHUNK_BYTES", "make_channel", "backoff_delay", "is_transient",
           "refuses_credentials", "retryable"]

_BACKOFF_BASE_S = 0.5
_CHANNEL_MESSAGE_BYTES = 4 << 20  # chunks are small (default 256 KiB); gRPC's own default
MAX_CHUNK_BYTES = 256 << 10
"""Largest data chunk a runtime sends, and its default: the aggregator refuses a larger
message, so what gRPC holds of a stream in flight stays a fraction of a MB."""
# CANCELLED: the server cancelled the call (shutting down, cut an idle stream); UNKNOWN: an
# error the server did not map to a status (a bug there, or a proxy's)
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                        grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN})
_AUTH = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# gRPC reports a connection reset mid-call as INTERNAL (or UNKNOWN) with one of these details.
_RESET_HINTS = ("rst_stream", "stream removed", "connection reset", "socket closed",
                "broken pipe", "goaway")


def make_channel(target: str, root_certificates: bytes | None,
                 client_cert: tuple[bytes, bytes] | None = None) -> grpc.Channel:
    """A channel to the aggregator at ``target`` (``"host:port"``).

    TLS with ``root_certificates`` (PEM of the CA that signed the server certificate, e.g.
    ``ca.pem`` of :func:`~shoal.transport.certs.make_local_pki`); ``None`` gives a plaintext
    channel, for tests on loopback only. ``client_cert`` = ``(certificate chain PEM, private
    key PEM)`` presents a client certificate (mutual TLS, e.g. from
    :func:`~shoal.transport.certs.make_client_cert`). Messages are capped at 4 MiB (chunks
    are far smaller), gRPC's own retries are off (the runtime retries with its idempotency
    keys), and keepalive pings every 5 minutes, the default minimum interval a gRPC server
    accepts (pinging more often earns a GOAWAY "too_many_pings").
    """
    options = [
        ("grpc.max_send_message_length", _CHANNEL_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _CHANNEL_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 300_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.enable_retries", 0),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 30_000),
    ]
    if root_certificates is None:
        if client_cert is not None:
            raise ConfigError("a client certificate needs TLS: give the aggregator's CA "
                              "certificate too", key="ca")
        return grpc.insecure_channel(target, options=options)
    chain, key = client_cert if client_cert is not None else (None, None)
    creds = grpc.ssl_channel_credentials(root_certificates=root_certificates,
                                         private_key=key, certificate_chain=chain)
    return grpc.secure_channel(target, creds, options=options)


def backoff_delay(attempt: int, rng: random.Random, *, base_s: float = _BACKOFF_BASE_S,
                  cap_s: float = 30.0) -> float:
    """Full-jitter backoff before retry number ``attempt`` (0-based):
    ``uniform(0, min(cap_s, base_s * 2**attempt))``."""
    bound = cap_s if attempt >= 64 else min(cap_s, base_s * 2.0 ** attempt)
    return rng.uniform(0.0, bound)


def refuses_credentials(code: grpc.StatusCode | None) -> bool:
    """Whether the server refused the caller's token or rights (``UNAUTHENTICATED``,
    ``PERMISSION_DENIED``)."""
    return code in _AUTH


def is_transient(code: grpc.StatusCode | None, detail: str) -> bool:
    """Whether a call that failed with ``code`` and ``detail`` may succeed if retried: a
    transient status, or ``INTERNAL`` reporting a reset connection."""
    if code in _TRANSIENT:
        return True
    lowered = detail.lower()
    return code == grpc.StatusCode.INTERNAL and any(hint in lowered for hint in _RESET_HINTS)


def retryable(exc: grpc.RpcError, method: str, device_id: str) -> str:
    """``"STATUS: detail"`` of the failed call ``method`` if a retry may cure it.

    Raises:
        CredentialsRejected: the server refused the token or rights.
        TransportError: any other status that is not transient.
    """
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    detail = (exc.details() if callable(getattr(exc, "details", None)) else "") or ""
    name = code.name if code is not None else "UNKNOWN"
    if refuses_credentials(code):
        raise CredentialsRejected(device_id, name, detail) from None
    if not is_transient(code, detail):
        raise TransportError(f"{method} failed: {name}: {detail}", method=method,
                             code=name) from None
    return f"{name}: {detail}"
