"""A deployed edge aggregator: a gRPC aggregator for its devices, one device of its parent.

Downstream the edge serves its devices exactly as a global aggregator does (an
:class:`~shoal.transport.server.AggregatorService` on TLS, a
:class:`~shoal.transport.carrier.GrpcCarrier` running the coordinator, SecAgg+ among its
devices when the carrier is secure). Upstream it is a
:class:`~shoal.transport.client.DeviceClient` of its parent whose training function is
:meth:`Edge.answer <shoal.hierarchy.edge.Edge.answer>` over that carrier: the parent's task
becomes one edge round (or ``rounds`` of them, HierFAVG) of the edge's devices, and the upload
is the edge's mean delta weighed by the examples behind it. Nothing here has round logic of
its own: the edge's rounds are a :class:`~shoal.coordinator.Coordinator` with the run's
policy, and the parent sees an ordinary device.

The parent keys its task's random streams by its round; the edge keys its devices' tasks
``(r - 1) x rounds + j`` (as in simulation), so with one edge round every device trains
exactly what it would under a flat aggregator. The versions the edge publishes to its devices
are :class:`~shoal.hierarchy.edge.Edge`'s: the parent's with one edge round, else its own
counter, which only grows (a retried parent round never gets an old number for a new model).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from shoal.errors import ConfigError
from shoal.events import TrainTask
from shoal.hierarchy.edge import Edge
from shoal.hierarchy.tiers import EdgeReport, edge_report
from shoal.policy import RoundPolicy, SyncPolicy
from shoal.privacy.secagg_rounds import SecAggAggregation
from shoal.registry import SQLiteRegistry
from shoal.transport.auth import Keyring
from shoal.transport.carrier import GrpcCarrier, wait_for_devices
from shoal.transport.client import ClientStats, DeviceClient
from shoal.transport.device_api import TaskAbandoned, TrainFn, TrainResult, TransportError
from shoal.transport.server import AggregatorService, AggregatorSettings, serve

__all__ = ["EdgeUplink", "OncePerParentRound", "Upstream", "edge_policy", "follow_edges",
           "run_edge"]


class EdgeUplink:
    """The edge's training function as its parent's device: one parent task -> the edge's
    rounds over every device that has said Hello to ``service`` (those the ring gave it and
    those that moved to it from a failed edge) -> the upload.

    Args:
        edge: the edge.
        service: its running downstream aggregator.
        secure: SecAgg+ among its devices (the carrier runs it).
        after_answer: called with the parent's round once the edge has its upload, before
            it is sent (fault injection: ``hierarchy.failures`` in ``shoal launch --edges``).
        on_report: told the edge's :class:`~shoal.hierarchy.tiers.EdgeReport` of each
            parent task once it answers (after ``after_answer``: an edge that dies there
            reports nothing); ``assigned`` is the devices that have said Hello to it.

    Raises (from a call):
        TaskAbandoned: no edge round committed (too few devices reported); the device
            runtime abandons the parent's task and checks in again.
    """

    def __init__(self, edge: Edge, service: AggregatorService,
                 secure: SecAggAggregation | None = None,
                 after_answer: Callable[[int], None] | None = None,
                 on_report: Callable[[EdgeReport], None] | None = None) -> None:
        self.edge = edge
        self.service = service
        self.secure = secure
        self.after_answer = after_answer
        self.on_report = on_report

    def carrier(self) -> GrpcCarrier:
        """A carrier over the devices known now (a fresh gateway, as every run gets)."""
        ids = sorted(d.device_id for d in self.service.registry.list())
        return GrpcCarrier(self.service, ids, secure=self.secure)

    def __call__(self, params: np.ndarray, settings: Mapping[str, float], round: int
                 ) -> TrainResult:
        # the parent is a synchronous coordinator (shoal launch --edges refuses others):
        # its round keyed r trains its version r - 1, the number an edge with one edge
        # round gives the parent's model (Edge.first_version)
        task = TrainTask(task_id=int(round), version=int(round) - 1,
                         params=np.asarray(params, np.float32), round=int(round),
                         settings=dict(settings))
        carrier = self.carrier()
        ids = np.arange(carrier.num_clients, dtype=np.int64)
        upload = self.edge.answer(task, ids, carrier)
        if self.after_answer is not None:
            self.after_answer(int(round))
        if self.on_report is not None:
            self.on_report(replace(edge_report(int(round), self.edge.name, ids, self.edge,
                                               upload), assigned=carrier.num_clients))
        if upload is None:
            raise TaskAbandoned(f"edge {self.edge.name}: no edge round committed")
        metrics = {"edge_clients": float(upload.clients),
                   "edge_ingress_bytes": float(upload.metrics.get("edge_ingress_bytes", 0))}
        return TrainResult(np.asarray(upload.delta, np.float32), int(upload.num_examples),
                           metrics)


@dataclass(frozen=True)
class Upstream:
    """How an edge reaches its parent.

    Attributes:
        target: the parent's ``host:port``.
        token: the edge's device token at the parent (never logged).
        root_certificates: the parent's CA (PEM) for TLS; ``None``: plaintext, loopback only.
    """

    target: str
    token: str
    root_certificates: bytes | None

    def __post_init__(self) -> None:
        host = self.target.rpartition(":")[0]
        if self.root_certificates is None and host not in ("127.0.0.1", "localhost", "[::1]"):
            raise ConfigError(f"an edge's parent {self.target!r} is not on this machine: "
                              f"give its CA certificate (TLS)", key="upstream")


def run_edge(edge: Edge, devices: Collection[str], upstream: Upstream, *,
             settings: AggregatorSettings, keyring: Keyring, dim: int, fingerprint: str,
             registry_path: str, tls: tuple[bytes, bytes] | None,
             stop: threading.Event, host: str = "127.0.0.1", port: int = 0,
             secure: SecAggAggregation | None = None, wait_timeout_s: float = 300.0,
             on_ready: Callable[[int], None] | None = None,
             after_answer: Callable[[int], None] | None = None,
             on_report: Callable[[EdgeReport], None] | None = None) -> ClientStats:
    """Serve ``devices`` and answer the parent's tasks until ``stop`` is set.

    Args:
        edge: the edge (its name is its device id at the parent; its ``policy`` the rule
            of its rounds).
        devices: the device ids this edge serves (the ring's assignment).
        settings, keyring, dim, fingerprint: the downstream aggregator's, as a global one's.
        registry_path: the edge's own SQLite registry.
        tls: ``(certificate chain, key)`` PEM for its devices; ``None`` only on loopback.
        secure: SecAgg+ among the edge's devices (the carrier runs it).
        on_ready: called with the bound port once it serves (start the devices here).
        after_answer, on_report: see :class:`EdgeUplink`.

    Returns:
        The upstream device runtime's counters.

    Raises:
        ConfigError: serving without TLS off loopback, or its devices did not all say Hello
            in time.
    """
    if tls is None and host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"edge {edge.name} on {host!r} without TLS", key="deploy.host")
    service = AggregatorService(settings, keyring, dim, fingerprint,
                                lambda: SQLiteRegistry(registry_path),
                                server_id=edge.name)
    bound, stop_server = serve(service, host, port, tls=tls)
    try:
        if on_ready is not None:
            on_ready(bound)
        ids = set(wait_for_devices(service.registry, devices, wait_timeout_s, service, stop))
        examples = sum(int(d.capabilities.get("examples", "0") or 0)
                       for d in service.registry.list() if d.device_id in ids)
        uplink = EdgeUplink(edge, service, secure, after_answer, on_report)
        with DeviceClient(upstream.target, upstream.token, edge.name,
                          root_certificates=upstream.root_certificates,
                          train=uplink, examples=examples) as client:
            return client.run(stop=stop)
    finally:
        stop_server()


class OncePerParentRound:
    """A device's training function under edges that trains each parent round at one edge
    only, so nothing it trained is counted twice at the global.

    The global sees an edge as one device and cannot tell which devices are inside its
    upload. A device whose edge stops answering moves on (:func:`follow_edges`); if that
    edge was only slow (paused, partitioned) and comes back, its upload for the parent
    round still arrives, and the device must not have trained the same parent round at its
    new edge too. So once the device has moved (:meth:`moved`), a training task of a parent
    round it trained at an edge it left is refused (:class:`TaskAbandoned`: the new edge
    commits without it, or at its deadline). The parent round of an edge round keyed ``k``
    is ``(k - 1) // rounds + 1`` (edge round ``j`` of parent round ``r`` is keyed
    ``(r - 1) x rounds + j``, :meth:`Edge.first_key <shoal.hierarchy.edge.Edge.first_key>`).

    Args:
        train: the device's training function.
        rounds: ``hierarchy.edge_rounds``.
    """

    def __init__(self, train: TrainFn, rounds: int) -> None:
        if rounds < 1:
            raise ConfigError(f"hierarchy.edge_rounds must be >= 1, got {rounds}",
                              key="hierarchy.edge_rounds")
        self.train, self.rounds = train, rounds
        self.left = 0  # the last parent round trained at an edge this device left
        self.here = 0  # the last parent round trained at its current edge

    def parent_round(self, key: int) -> int:
        """The parent round an edge round keyed ``key`` belongs to."""
        return (int(key) - 1) // self.rounds + 1

    def moved(self) -> None:
        """The device leaves its edge for another."""
        self.left, self.here = max(self.left, self.here), 0

    def __call__(self, params: np.ndarray, settings: Mapping[str, float], round: int
                 ) -> TrainResult:
        parent = self.parent_round(round)
        if parent <= self.left:
            raise TaskAbandoned(f"parent round {parent} was trained at an edge this device "
                                f"left; training it here could count it twice")
        result = self.train(params, settings, round)
        self.here = max(self.here, parent)
        return result


def follow_edges(targets: Sequence[str], client_for: Callable[[str], DeviceClient],
                 stop: threading.Event, once: OncePerParentRound | None = None
                 ) -> ClientStats | None:
    """Run a device against its edge, and when that edge stops answering (its runtime's
    retries are exhausted) against the next of ``targets``: the ring's order for this
    device (its edge, then the one the ring moves it to if that edge fails, ...). Its next
    check-in then reaches a live edge, which serves it from the following task on.

    Args:
        once: the device's training function (give it to ``client_for``'s clients), told
            when the device moves, so that it never trains a parent round at two edges.

    Returns:
        The counters of the last runtime, or ``None`` when every target failed.
    """
    stats = None
    for target in targets:
        client = client_for(target)
        try:
            with client:
                return client.run(stop=stop)
        except TransportError:
            stats = client.stats
            if once is not None:
                once.moved()
            continue
    return stats


def edge_policy(deadline_s: float, min_fraction: float) -> Callable[[int], RoundPolicy]:
    """A deployed edge's rule: each edge round asks its whole group, waits until
    ``deadline_s`` and commits with at least ``min_fraction`` of it (one attempt: the
    parent's policy retries)."""
    return lambda n: SyncPolicy(deadline_s=deadline_s, min_fraction=min_fraction,
                                max_attempts=1)
