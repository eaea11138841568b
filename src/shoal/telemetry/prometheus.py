"""Prometheus metrics of a run, with a registry of their own (never the global one).

:class:`PrometheusObserver` hears the coordinator (rounds, updates, staleness, privacy,
secure-aggregation dropouts) and the carrier (refused calls, check-ins, bytes, active uploads,
round wall time) and serves them on ``/metrics``
(:meth:`~PrometheusObserver.serve_http`).
Needs ``prometheus_client`` (``pip install shoal[deploy]``).

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
  ``shoal_bytes_total{direction}``, ``shoal_active_uploads`` -- the carrier's.
"""

from __future__ import annotations

from collections.abc import Mapping

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
        self._servers: list = []

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (``shoal_updates_total``, ``result="accepted"``,
        ``reason=""``), 0 if it was never counted."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (what ``/metrics`` serves)."""
        return prom.generate_latest(self.registry)

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` (0 = any free port) from a daemon thread until
        :meth:`close`; returns the bound port.

        Raises:
            ConfigError: (key ``deploy.metrics_port``) the address cannot be bound.
        """
        try:
            server, _ = prom.start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}",
                              key="deploy.metrics_port") from exc
        self._servers.append(server)
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop serving ``/metrics`` (every server :meth:`serve_http` started)."""
        while self._servers:
            server = self._servers.pop()
            server.shutdown()
            server.server_close()

    # -- the coordinator's hooks --------------------------------------------------------------

    def task_sent(self, task_id: int, version: int, clients: int, now: float) -> None:
        self.tasks.inc()
        self.asked.inc(clients)

    def update_accepted(self, task_id: int, clients: int, staleness: int, now: float) -> None:
        self.updates.labels("accepted", "").inc(clients)
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
        self.checkins.labels(answer).inc()

    def bytes_moved(self, direction: str, n: int) -> None:
        self.bytes.labels(direction).inc(n)

    def uploads_active(self, delta: int) -> None:
        self.active.inc(delta)
