"""Prometheus metrics of a run, with a registry of their own (never the global one).

:class:`PrometheusObserver` hears the coordinator (rounds, updates, staleness, privacy,
secure-aggregation dropouts) and the carrier (refused calls, check-ins, bytes, active uploads,
round wall time) and serves them on ``/metrics``
(:meth:`~PrometheusObserver.serve_http`).
Needs ``prometheus_client`` (``pip install shoal[deploy]``).

``/metrics`` is served by one thread running an event loop, whatever the number of
connections (the client library's own server starts a thread per connection): each
connection sends one request within the idle timeout, gets the exposition and is closed;
at most ``max_connections`` are open at once, later ones are closed at once.

Metrics:

* ``shoal_rounds_total{outcome}`` -- ``committed`` or ``abandoned``;
* ``shoal_updates_total{result,reason}`` -- ``accepted`` (reason ``""``) or ``rejected``;
* ``shoal_client_failures_total{reason}`` -- clients that dropped out, timed out or were
  cancelled;
* ``shoal_tasks_total``, ``shoal_clients_asked_total`` -- tasks sent and clients asked;
* ``shoal_update_staleness`` -- versions between an accepted update's base and the model;
* ``shoal_model_version``, ``shoal_privacy_epsilon`` -- gauges;
* ``shoal_secagg_dropouts_total{stage}``;
* ``shoal_round_seconds`` -- how long each round (or buffered server step) took on the
  run's clock, committed or abandoned;
* ``shoal_refused_calls_total{reason}``, ``shoal_checkins_total{answer}``,
  ``shoal_bytes_total{direction}``, ``shoal_active_uploads`` -- the carrier's;
* ``shoal_device_reported_train_loss`` -- the last version's example-weighted mean local
  training loss *as its devices reported it*: the server cannot check it (it only bounds
  it, finite and within +-1e9). Every other metric is counted or measured by the server.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

import prometheus_client as prom

from shoal.errors import ConfigError
from shoal.observers import CarrierObserver
from shoal.records import RoundRecord

__all__ = ["PrometheusObserver"]

_ROUND_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600)
_STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)


class PrometheusObserver(CarrierObserver):
    """Counts what the coordinator and the carrier report, in :attr:`registry`.

    Args:
        registry: where the metrics go (default: a new registry for this observer).
    """

    def __init__(self, registry: prom.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.rounds = prom.Counter("shoal_rounds_total", "rounds by outcome", ["outcome"],
                                   registry=r)
        self.updates = prom.Counter("shoal_updates_total", "uploads by result",
                                    ["result", "reason"], registry=r)
        self.failures = prom.Counter("shoal_client_failures_total", "clients that dropped "
                                     "out, timed out or were cancelled", ["reason"],
                                     registry=r)
        self.tasks = prom.Counter("shoal_tasks_total", "training tasks sent", registry=r)
        self.asked = prom.Counter("shoal_clients_asked_total", "clients asked to train",
                                  registry=r)
        self.staleness = prom.Histogram("shoal_update_staleness", "versions between an "
                                        "accepted update's base and the current model",
                                        buckets=_STALENESS_BUCKETS, registry=r)
        self.version = prom.Gauge("shoal_model_version", "the last committed model version",
                                  registry=r)
        self.epsilon = prom.Gauge("shoal_privacy_epsilon", "differential privacy spent so "
                                  "far (epsilon at the run's delta)", registry=r)
        self.dropouts = prom.Counter("shoal_secagg_dropouts_total", "clients secure "
                                     "aggregation lost, by stage", ["stage"], registry=r)
        self.refused = prom.Counter("shoal_refused_calls_total", "calls refused before "
                                    "reaching a round", ["reason"], registry=r)
        self.bytes = prom.Counter("shoal_bytes_total", "payload bytes", ["direction"],
                                  registry=r)
        self.checkins = prom.Counter("shoal_checkins_total", "check-ins by answer",
                                     ["answer"], registry=r)
        self.active = prom.Gauge("shoal_active_uploads", "uploads being received",
                                 registry=r)
        self.duration = prom.Histogram("shoal_round_seconds", "round duration",
                                       buckets=_ROUND_BUCKETS, registry=r)
        self.device_loss = prom.Gauge("shoal_device_reported_train_loss", "mean local "
                                      "training loss of the last version, as its devices "
                                      "reported it (unverified)", registry=r)
        self._servers: list[_MetricsHTTP] = []

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (``shoal_updates_total``, ``result="accepted"``,
        ``reason=""``), 0 if it was never counted."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (what ``/metrics`` serves)."""
        return prom.generate_latest(self.registry)

    def serve_http(self, port: int, addr: str = "127.0.0.1", *, idle_timeout_s: float = 10.0,
                   max_connections: int = 256) -> int:
        """Serve ``/metrics`` on ``addr:port`` (0 = any free port) from one daemon thread
        until :meth:`close`; returns the bound port. A connection that has not sent its
        request within ``idle_timeout_s`` is closed, as is any beyond ``max_connections``.

        Raises:
            ConfigError: (key ``deploy.metrics_port``) the address cannot be bound.
        """
        server = _MetricsHTTP(self.exposition, idle_timeout_s, max_connections)
        try:
            bound = server.start(addr, port)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}",
                              key="deploy.metrics_port") from exc
        self._servers.append(server)
        return bound

    def close(self) -> None:
        """Stop serving ``/metrics`` (every server :meth:`serve_http` started)."""
        while self._servers:
            self._servers.pop().close()

    # -- the coordinator's hooks --------------------------------------------------------------

    def task_sent(self, task_id: int, version: int, clients: int, now: float) -> None:
        self.tasks.inc()
        self.asked.inc(clients)

    def update_accepted(self, task_id: int, clients: int, staleness: int, now: float) -> None:
        self._child(self.updates, "accepted", "").inc(clients)
        for _ in range(clients):  # a histogram counts observations one at a time
            self.staleness.observe(staleness)

    def update_rejected(self, task_id: int, reason: str, count: int, detail: str,
                        now: float) -> None:
        self.updates.labels("rejected", reason).inc(count)

    def clients_failed(self, task_id: int, clients: int, reason: str, now: float) -> None:
        self.failures.labels(reason).inc(clients)

    def version_committed(self, record: RoundRecord) -> None:
        self.rounds.labels("committed").inc()
        self.version.set(record.version)
        self.duration.observe(record.seconds)
        if math.isfinite(record.train_loss):
            self.device_loss.set(record.train_loss)

    def round_abandoned(self, record: RoundRecord, reason: str) -> None:
        self.rounds.labels("abandoned").inc()
        self.duration.observe(record.seconds)

    def privacy_spent(self, version: int, values: Mapping[str, float]) -> None:
        if "epsilon" in values:
            self.epsilon.set(values["epsilon"])

    def secagg_dropouts(self, version: int, stage: str, count: int) -> None:
        self.dropouts.labels(stage).inc(count)

    # -- the carrier's hooks ------------------------------------------------------------------

    def call_refused(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def checked_in(self, answer: str) -> None:
        self._child(self.checkins, answer).inc()

    def bytes_moved(self, direction: str, n: int) -> None:
        self._child(self.bytes, direction).inc(n)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: the hooks a device's every call
        makes (check-in answers, bytes, accepted updates) take a bounded set of labels."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def uploads_active(self, delta: int) -> None:
        self.active.inc(delta)


class _MetricsHTTP:
    """``GET /metrics`` over HTTP/1.1 from one thread's event loop: one request per
    connection (``Connection: close``), read within ``idle_timeout_s``, at most
    ``max_connections`` connections at once."""

    _MAX_REQUEST = 8192  # bytes of request line and headers

    def __init__(self, render: Callable[[], bytes], idle_timeout_s: float,
                 max_connections: int) -> None:
        self.render, self.idle_timeout_s = render, idle_timeout_s
        self.max_connections = max_connections
        self._open = 0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    def start(self, addr: str, port: int) -> int:
        """Bind and start serving; returns the port. Raises ``OSError`` if it cannot bind."""
        self._server = self._loop.run_until_complete(asyncio.start_server(
            self._serve, addr, port, limit=self._MAX_REQUEST, backlog=1024))
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="shoal-metrics")
        self._thread.start()
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return

        async def stop() -> None:
            server.close()
            await server.wait_closed()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:  # connections still being served
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        thread.join(timeout=10)
        self._loop.close()
        self._server = self._thread = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        self._open += 1
        try:
            if self._open <= self.max_connections:
                await asyncio.wait_for(self._answer(reader, writer), self.idle_timeout_s)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # idle, cut short or oversized: closed without an answer
        finally:
            self._open -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        kind = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            status, body = "405 Method Not Allowed", b"only GET and HEAD\n"
        elif path not in ("/", "/metrics"):
            status, body = "404 Not Found", b"see /metrics\n"
        else:
            status, body, kind = "200 OK", self.render(), prom.CONTENT_TYPE_LATEST
        writer.write((f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                      f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                      ).encode("latin-1") + (body if method != "HEAD" else b""))
        await writer.drain()
