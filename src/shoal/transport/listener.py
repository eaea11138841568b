"""Starting the aggregator's gRPC server: one ``grpc.aio`` server on one background thread.

:func:`serve` puts an :class:`~shoal.transport.server.AggregatorService` on a port, behind
:class:`~shoal.transport.admission.Admission` (a valid token before any message is read, idle
callers cut) and :func:`server_options` (message size; handshakes and call-less connections
closed after ``idle_timeout_s``). Every connection and call is served by that one thread's
event loop: a thousand idle connections cost memory for their sockets, not a thread each.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc  # type: ignore[import-untyped]

from shoal.errors import ConfigError
from shoal.transport.admission import Admission
from shoal.transport.channel import MAX_CHUNK_BYTES
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from shoal.transport.server import AggregatorService

__all__ = ["MAX_RECEIVE_BYTES", "serve", "server_options"]

#: The largest message the aggregator receives: a data chunk of at most MAX_CHUNK_BYTES and
#: its framing, or a Hello (every other request is smaller). gRPC refuses a larger one from
#: its length prefix, before buffering it (RESOURCE_EXHAUSTED).
MAX_RECEIVE_BYTES = MAX_CHUNK_BYTES + (64 << 10)
_SEND_BYTES = 4 << 20  # the devices' channels take up to this (chunks are far smaller)


def server_options(idle_timeout_s: float, bdp_probe: bool = False
                   ) -> list[tuple[str, int]]:
    """The gRPC server options of an aggregator: message sizes; ``idle_timeout_s`` as the
    longest a connection may take to finish its TLS and HTTP/2 handshake, or stay open with
    no call in flight (a device's channel reconnects by itself on its next call); and, unless
    ``bdp_probe``, a fixed HTTP/2 flow-control window (no BDP probing): a stream waiting for
    an upload slot then holds at most one window (64 KiB) of its sender's data, where BDP
    probing let each grow to megabytes (measured: 64 waiting streams, +196 MB with probing,
    +6 MB without). The price is upload throughput on high-latency links: 64 KiB per round
    trip and stream (``deploy.bdp_probe`` lifts it, for trusted callers)."""
    idle_ms = max(1, round(idle_timeout_s * 1000))
    return [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", _SEND_BYTES),
            ("grpc.server_handshake_timeout_ms", idle_ms),
            ("grpc.max_connection_idle_ms", idle_ms),
            ("grpc.http2.bdp_probe", int(bdp_probe))]


def serve(service: AggregatorService, host: str = "127.0.0.1", port: int = 0, *,
          tls: tuple[bytes, bytes] | None = None,
          client_ca: bytes | None = None) -> tuple[int, Callable[[], None]]:
    """Start ``service`` on a ``grpc.aio`` server in a background thread.

    Args:
        tls: ``(certificate chain PEM, private key PEM)``; ``None`` serves without TLS (tests
            on loopback only).
        client_ca: PEM CA certificate(s) for mutual TLS (cross-silo): a connection without a
            client certificate signed by one of them fails its TLS handshake, and every call's
            token must be for the device the certificate names (its common name), else the
            call is refused with ``PERMISSION_DENIED`` ("identity"). Needs ``tls``.

    Returns:
        ``(port, stop)``: the bound port and a function that stops the server and its thread.

    Raises:
        ConfigError: ``client_ca`` without ``tls``, or the server could not bind ``host:port``
            (``key="deploy.port"``; e.g. the port is in use).
    """
    if client_ca is not None and tls is None:
        raise ConfigError("mutual TLS (a client CA) needs the server's own certificate and "
                          "key", key="client_ca")
    # every call's token must name the device its client certificate names (common name)
    service.gate.bind_to_certificates = client_ca is not None
    idle = service.settings.idle_timeout_s
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict = {}

    async def main() -> None:
        server = grpc.aio.server(options=server_options(
            idle, service.settings.bdp_probe), interceptors=[Admission(
            service.gate, idle, service.clock, service.REQUEST_BYTES,
            service.REQUEST_PARSERS)])
        pb_grpc.add_AggregatorServicer_to_server(service, server)
        address = f"{host}:{port}"
        if tls is None:
            state["port"] = server.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])],
                                                root_certificates=client_ca,
                                                require_client_auth=client_ca is not None)
            state["port"] = server.add_secure_port(address, creds)
        await server.start()
        stopping = asyncio.Event()
        state["stopping"] = stopping
        ready.set()
        await stopping.wait()
        await server.stop(grace=1.0)

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        except Exception as exc:  # surface bind errors to the caller
            state["error"] = exc
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="shoal-grpc", daemon=True)
    thread.start()
    ready.wait(timeout=30)
    if "error" in state or "port" not in state:
        raise ConfigError(f"could not start the aggregator on {host}:{port} (deploy.host, "
                          f"deploy.port): {state.get('error') or 'timed out'}",
                          key="deploy.port")

    def stop() -> None:
        if thread.is_alive():
            loop.call_soon_threadsafe(state["stopping"].set)
        thread.join(timeout=10)

    return state["port"], stop
