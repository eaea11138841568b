"""An ingest node of the aggregator cluster: a gRPC aggregator for whichever devices come to
it, folding their updates into one partial aggregate per task of the committer.

An ingest node is an edge of a one-tier hierarchy (:mod:`shoal.hierarchy.deployed`) whose
devices are not partitioned: every node serves the committer's whole cohort, any device may
come to any node, and the round state in Redis (:mod:`shoal.cluster.rounds`) says who folds
whom. Per committer task the node runs :meth:`Edge.answer
<shoal.hierarchy.edge.Edge.answer>` -- a :class:`~shoal.coordinator.Coordinator` with one
edge round over the cohort, the run's validation, weight cap and upload tap, on a
:class:`~shoal.transport.carrier.GrpcCarrier` (auth, admission, decode) -- with two
additions, both in :class:`IngestGateway`:

* before an upload is judged, the node claims the device in Redis (one atomic script): a
  device another node folded, or one past the task's target or after the committer closed
  the task, is refused (``duplicate``, ``late``) and never folded here; an update the
  session or pipeline then refuses gives its claim back;
* a watcher reads the task's claims and tells the node's coordinator that the devices other
  nodes folded will not report here (``ClientsFailed``), so its round closes as soon as
  every device of the cohort is folded somewhere (or the target is reached, or the task
  closed, or its deadline, ``deploy.ingest_grace_s`` before the committer's, passed).

The node's upload is a :class:`~shoal.cluster.rounds.Partial`: the weighted mean of its
folded updates, the weight behind it and the devices inside, pushed onto the Redis queue
the committer pops. A node killed mid-round takes its partial with it: the committer never
hears of its devices, and its policy commits from the other nodes' partials or abandons and
retries the round.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from shoal.cluster.rounds import ClusterTask, Partial, RoundBoard, remaining_s
from shoal.device_eval import EvalSession
from shoal.device_task import ComeBack, DeviceTask, Task, UploadResult
from shoal.errors import ConfigError, UpdateRejected
from shoal.events import ClientsFailed
from shoal.gateway import DeviceGateway
from shoal.hierarchy.edge import Edge
from shoal.pipeline import Validation
from shoal.policy import SyncPolicy
from shoal.registry.redis import RegistryUnavailable
from shoal.transport.auth import Keyring
from shoal.transport.carrier import GrpcCarrier
from shoal.transport.server import AggregatorService, AggregatorSettings, serve

__all__ = ["IngestGateway", "IngestNode", "run_ingest"]

log = logging.getLogger("shoal.cluster")

_VERDICT = {"taken": ("duplicate", "another ingest node folded this device's update"),
            "closed": ("late", "the committer closed this task"),
            "full": ("late", "the round has all the updates it takes")}


class IngestGateway(DeviceGateway):
    """A :class:`~shoal.gateway.DeviceGateway` whose uploads are claimed in Redis first
    (see the module docstring).

    Args:
        board: the cluster's round state.
        cluster_task: the board's reference of the committer's task this run answers.
        node: this ingest node's name.
        *args, **kwargs: the gateway's.
    """

    def __init__(self, board: RoundBoard, cluster_task: str, node: str,
                 *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.board, self.cluster_task, self.node = board, cluster_task, node
        self.folded: set[str] = set()
        self.dropped: set[str] = set()

    def upload(self, device_id: str, round: int, base_version: int, upload_key: str,
               num_examples: int, delta: np.ndarray, now: float, **kwargs: Any
               ) -> UploadResult:
        """The gateway's upload, claimed for this node in Redis first.

        Raises:
            UpdateRejected: ``duplicate`` (another node folded the device), ``late`` (the
                task closed or is full), ``unavailable`` (Redis did not answer: the device
                keeps its task and sends its update again), or the session's or pipeline's
                reason (the claim is then given back); nothing changed.
        """
        try:
            verdict = self.board.claim(self.cluster_task, device_id, self.node)
        except RegistryUnavailable as exc:  # nothing folded: the device sends it again
            with self.lock:
                raise self._count(UpdateRejected("unavailable", str(exc), client_id=device_id,
                                                 round=round), -1, now) from None
        if verdict != "ok":
            reason, detail = _VERDICT[verdict]
            self.drop([device_id], "folded_elsewhere" if verdict == "taken" else reason, now)
            with self.lock:
                raise self._count(UpdateRejected(reason, detail, client_id=device_id,
                                                 round=round), -1, now)
        try:
            receipt = super().upload(device_id, round, base_version, upload_key,
                                     num_examples, delta, now, **kwargs)
        except UpdateRejected:
            with self.lock:
                mine = device_id in self.folded
            if not mine:
                self.board.release(self.cluster_task, device_id, self.node)
            raise
        with self.lock:
            self.folded.add(device_id)
        return receipt

    def check_in(self, device_id: str, now: float, **kwargs: Any
                 ) -> tuple[Task | ComeBack, str, dict[str, float]]:
        """The gateway's check-in, except that a device this node's round no longer waits
        for (folded by another node, or the round is over) is paced out at once instead of
        being given a task it would train for nothing."""
        with self.lock:
            done = device_id in self.dropped
        if done:
            return ComeBack(self.paced(now), "not_selected"), "train", {}
        return super().check_in(device_id, now, **kwargs)

    def drop(self, device_ids: Iterable[str], reason: str, now: float) -> None:
        """Tell the coordinator that ``device_ids`` will not report here (folded by another
        node, or the round is over); each once."""
        with self.changed:
            if self.coordinator is None or self.finished:
                return
            gone = set(device_ids) - self.folded - self.dropped
            if not gone:
                return
            self.dropped |= gone
            for s in self.sessions.all():
                if isinstance(s, DeviceTask) and not isinstance(s, EvalSession) \
                        and not s.closed:
                    ids = tuple(sorted(s.client_id(d) for d in gone if d in s.selected))
                    if ids:
                        self._carry(self.coordinator.handle(
                            ClientsFailed(s.task_id, ids, reason, now)), now)
            self._settle(now)
            self.changed.notify_all()


class _IngestCarrier(GrpcCarrier):
    """The gRPC carrier with an :class:`IngestGateway` for one committer task."""

    def __init__(self, service: AggregatorService, devices: list[str], board: RoundBoard,
                 cluster_task: str, node: str) -> None:
        self._claims = (board, cluster_task, node)
        super().__init__(service, devices, poll_s=0.05)

    def _new_gateway(self) -> DeviceGateway:
        base = super()._new_gateway()
        # absence is not judged per node: a node's round is the committer's, which has
        # its own deadline (deploy.absent_after_s is not wired into the cluster)
        settings = dataclasses.replace(base.settings, absent_after_s=0.0)
        return IngestGateway(*self._claims, base.devices, base.dim, settings,
                             secure=None, observer=base.observer,
                             on_progress=base.on_progress, on_publish=base.on_publish,
                             weights=base.weights)


class IngestNode:
    """One ingest node's answers to the committer's tasks.

    Args:
        name: the node's name (in the claims; unique in the cluster).
        service: its running gRPC aggregator (its registry is the shared one).
        board: the cluster's round state.
        seed: the run seed.
        grace_s: stop folding this long before the committer's deadline.
        validation: the bounds every device update is checked against.
        clock: wall-clock seconds (the committer's deadlines are on it).
    """

    def __init__(self, name: str, service: AggregatorService, board: RoundBoard, seed: int,
                 *, grace_s: float = 2.0, validation: Validation = Validation(),
                 clock: Callable[[], float] = time.time) -> None:
        self.name, self.service, self.board = name, service, board
        self.validation = validation
        self.seed, self.grace_s, self.clock = seed, grace_s, clock
        self.answered = 0  # partials pushed

    def answer(self, ct: ClusterTask) -> Partial | None:
        """Serve ``ct`` to the devices that come here until every device of its cohort is
        folded somewhere (or the round is over); this node's partial, or ``None`` if it
        folded nothing."""
        devices = sorted(d.device_id for d in self.service.registry.list())
        index = {d: i for i, d in enumerate(devices)}
        ids = np.array([index[d] for d in ct.devices if d in index], np.int64)
        if len(ids) == 0:
            return None
        carrier = _IngestCarrier(self.service, devices, self.board, ct.ref, self.name)
        deadline_s = remaining_s(ct.task.deadline, self.clock(), self.grace_s)
        edge = Edge(self.name, self.seed, 1, policy=lambda n: SyncPolicy(
            deadline_s=deadline_s, min_fraction=0.0, max_attempts=1),
                    validation=self.validation)
        done = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(ct, carrier, done), daemon=True,
                                   name=f"{self.name}-watch-{ct.task.task_id}")
        watcher.start()
        try:
            upload = edge.answer(ct.task, ids, carrier)
        finally:
            done.set()
            watcher.join(timeout=5)
        gateway = carrier.gateway
        assert isinstance(gateway, IngestGateway)
        folded = tuple(sorted(gateway.folded))
        if upload is None or not folded:
            return None
        return Partial(ct.ref, self.name, np.asarray(upload.delta, np.float32),
                       int(upload.num_examples), folded, ct.task.version,
                       {"download_bytes": float(upload.metrics.get("edge_ingress_bytes", 0))})

    def _watch(self, ct: ClusterTask, carrier: GrpcCarrier, done: threading.Event) -> None:
        cohort = set(ct.devices)
        while not done.wait(0.05):
            try:
                closed, target, folds = self.board.state(ct.ref)
                # another task open: a committer that died without closing this one was
                # restarted (its partial would be refused as another run's)
                closed = closed or self.board.current() != ct.ref
            except RegistryUnavailable as exc:
                log.warning("%s: %s", self.name, exc)
                continue
            gone = {d for d, node in folds.items() if node != self.name}
            if closed or len(folds) >= target:
                gone |= cohort - set(folds)
            gateway = carrier.gateway
            if gone and isinstance(gateway, IngestGateway):
                gateway.drop(gone & cohort, "folded_elsewhere", self.service.clock())

    def serve(self, stop: threading.Event, poll_s: float = 0.05) -> None:
        """Answer every task the committer opens until ``stop`` is set; a Redis that goes
        away is waited for (logged), not fatal."""
        answered: set[str] = set()
        while not stop.is_set():
            try:
                ref = self.board.current()
                if ref and ref not in answered:
                    answered.add(ref)
                    ct = self.board.load(ref)
                    if ct is not None and not ct.closed:
                        partial = self.answer(ct)
                        if partial is not None:
                            self.board.push_partial(partial)
                            self.answered += 1
                        continue
            except RegistryUnavailable as exc:
                log.warning("%s: %s; retrying", self.name, exc)
                stop.wait(1.0)
            stop.wait(poll_s)


def run_ingest(name: str, board: RoundBoard, *, settings: AggregatorSettings,
               keyring: Keyring, dim: int, fingerprint: str,
               registry_factory: Callable[[], Any], seed: int, grace_s: float,
               tls: tuple[bytes, bytes] | None, stop: threading.Event,
               validation: Validation = Validation(), host: str = "127.0.0.1", port: int = 0,
               on_ready: Callable[[int], None] | None = None) -> IngestNode:
    """Serve devices on ``host:port`` and answer the committer's tasks until ``stop``.

    Args:
        registry_factory: opens the shared device registry (Redis).
        tls: ``(certificate chain, key)`` PEM; ``None`` only on loopback.
        on_ready: called with the bound port once it serves.

    Returns:
        The node (its counters).

    Raises:
        ConfigError: serving without TLS off loopback.
    """
    if tls is None and host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"ingest node {name} on {host!r} without TLS", key="deploy.host")
    service = AggregatorService(settings, keyring, dim, fingerprint, registry_factory,
                                server_id=name)
    bound, stop_server = serve(service, host, port, tls=tls)
    node = IngestNode(name, service, board, seed, grace_s=grace_s, validation=validation)
    try:
        if on_ready is not None:
            on_ready(bound)
        node.serve(stop)
        return node
    finally:
        stop_server()
