"""Model versions through tiers: devices cache models by version, so a version an edge (or
any aggregator) publishes names exactly one model, whatever its parent retries."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("grpc")

from hierarchy_harness import TrainedTasks  # noqa: E402

from shoal.errors import ProtocolError  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.transport.auth import Keyring  # noqa: E402
from shoal.transport.server import AggregatorService, AggregatorSettings  # noqa: E402

DIM = 8


def test_a_published_version_names_one_model(tmp_path) -> None:
    service = AggregatorService(AggregatorSettings(keep_versions=1), Keyring.single(b"s" * 32),
                                DIM, "fp", lambda: SQLiteRegistry(tmp_path / "r.db"))
    one, two = np.ones(DIM, np.float32), np.full(DIM, 2.0, np.float32)
    service.publish(3, one)
    service.publish(3, one.copy())  # the same model again (a retried round): nothing changes
    with pytest.raises(ProtocolError, match="other parameters"):
        service.publish(3, two)
    assert np.array_equal(service.publisher.params(3), one)  # still the first model
    service.publish(4, two)
    service.publish(5, one)  # keeps one version besides the current: 3 is gone
    with pytest.raises(ProtocolError, match="no longer held"):
        service.publish(3, one)
    assert service.publisher.versions == (4, 5)


@pytest.fixture(scope="module")
def exp():
    from shoal.config import load_config
    from shoal.experiment import Experiment

    return Experiment(load_config(None, {"rounds": 1}))


def test_a_retried_parent_round_never_gives_an_edge_version_a_second_model(exp) -> None:
    """HierFAVG, two edge rounds: the parent retries its round keyed 1 with another group at
    this edge. Edge round 2 trains another model than in the first attempt, so it must have
    another version (devices cache models by version); its round keys are the first
    attempt's, as a flat run's retry keeps its round's key."""
    from shoal.events import TrainTask
    from shoal.hierarchy.edge import Edge

    devices = TrainedTasks(exp.pool)
    edge = Edge("edge-0", 0, rounds=2)
    base = exp.initial_params.astype(np.float32)
    task = TrainTask(task_id=1, version=0, params=base, round=1)
    first = edge.answer(task, np.arange(0, 6), devices)
    again = edge.answer(task, np.arange(3, 9), devices)  # the retry: another group
    assert first is not None and again is not None
    models: dict[int, np.ndarray] = {}
    for version, params, _, _ in devices.tasks:
        held = models.setdefault(version, params)
        assert np.array_equal(held, params), f"version {version} names two models"
    assert len(models) == 4  # two edge rounds per attempt, each its own model
    assert [key for _, _, key, _ in devices.tasks] == [1, 2, 1, 2]
    # the edge's later tasks go on from its counter
    later = edge.answer(TrainTask(task_id=2, version=1, params=base, round=2),
                        np.arange(0, 6), devices)
    assert later is not None
    assert [v for v, _, _, _ in devices.tasks[-2:]] == [4, 5]
    assert [key for _, _, key, _ in devices.tasks[-2:]] == [3, 4]  # (r - 1) x 2 + j


@pytest.mark.parametrize("sets, says", [
    (['compression.download="delta"', "hierarchy.edge_rounds=2"], "delta downloads"),
    (['hierarchy.edge_policy="buffered"'], "synchronous edge rounds"),
    (["hierarchy.regions=1"], "no region tier"),
])
def test_shoal_launch_edges_refuses_what_deployed_edges_cannot_run(tmp_path, capsys, sets,
                                                                   says) -> None:
    """shoal launch --edges refuses delta downloads with edges that step on their own (the
    check simulation makes), and what it does not wire, before anything is started."""
    from shoal.cli import main

    work = tmp_path / "work"
    code = main(["launch", "--edges", "2", "--clients", "4", "--per-round", "4", "-q",
                 "--no-dashboard", "--dir", str(work),
                 *(a for s in sets for a in ("--set", s))])
    assert code == 2
    assert says in capsys.readouterr().err
    assert not (work / "logs").exists()


def _train_fn(c: int):
    """Device ``c``'s training: a step towards its own target plus noise keyed by the
    round (a deterministic function of model, round and device, as shoal's devices are)."""
    from shoal.transport.device_api import TrainResult

    target = np.random.default_rng([7, c]).standard_normal(DIM)

    def train(params, settings, round):
        noise = np.random.default_rng([c, int(round)]).standard_normal(DIM)
        delta = 0.5 * (target - params) + 0.01 * noise
        return TrainResult(delta.astype(np.float32), 10 * (c + 1), {})
    return train


def _hierfavg(base: np.ndarray, devices, rounds: int) -> np.ndarray:
    """Oracle: ``rounds`` edge rounds of FedAvg over ``devices`` from ``base``, keyed
    1..rounds; the sum of the means (the edge's upload)."""
    params, moved = base.astype(np.float32), np.zeros(DIM)
    for key in range(1, rounds + 1):
        results = [_train_fn(c)(params, {}, key) for c in devices]
        w = np.array([r.num_examples for r in results], np.float64)
        mean = w @ np.array([r.delta for r in results], np.float64) / w.sum()
        params = (params + mean).astype(np.float32)
        moved += mean
    return moved


def test_a_deployed_edge_retrying_a_parent_round_serves_its_devices_the_new_model(
        tmp_path) -> None:
    """Over gRPC: the parent's round keyed 1 reaches the edge twice (a retry), the second
    time with a third device. Its devices must train edge round 2 from the retry's model,
    not the first attempt's that a reused version would name (the upload then equals the
    oracle's HierFAVG of the three devices)."""
    import threading
    import time

    from shoal.hierarchy.deployed import EdgeUplink, edge_policy
    from shoal.transport.carrier import wait_for_devices
    from shoal.hierarchy.edge import Edge
    from shoal.transport.client import DeviceClient
    from shoal.transport.server import serve
    from shoal.transport.tokens import issue_token

    secret = b"k" * 32
    settings = AggregatorSettings(checkin_interval_s=0.2, rate_per_s=200.0, burst=400.0)
    service = AggregatorService(settings, Keyring.single(secret), DIM, "fp",
                                lambda: SQLiteRegistry(tmp_path / "r.db"), server_id="edge-0")
    assert not service.registry.list()  # opened here, before any handler thread
    port, stop_server = serve(service, "127.0.0.1", 0, tls=None)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def device(c: int) -> None:
        name = f"device-{c:04d}"
        client = DeviceClient(f"127.0.0.1:{port}",
                              issue_token(secret, name, now=time.time(), ttl_seconds=600),
                              name, root_certificates=None, train=_train_fn(c),
                              examples=10 * (c + 1), min_wait_s=0.05, max_wait_s=0.3)
        t = threading.Thread(target=lambda: client.__enter__().run(stop=stop), daemon=True)
        t.start()
        threads.append(t)
        wait_for_devices(service.registry, [name], 30.0, service)

    uplink = EdgeUplink(Edge("edge-0", 0, rounds=2, policy=edge_policy(30.0, 1.0)), service)
    base = np.linspace(-1, 1, DIM).astype(np.float32)
    try:
        device(0)
        device(1)
        first = uplink(base, {}, 1)
        device(2)  # the retry finds another group
        again = uplink(base, {}, 1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        stop_server()
    assert np.abs(first.delta - _hierfavg(base, [0, 1], 2)).max() < 1e-5
    assert np.abs(again.delta - _hierfavg(base, [0, 1, 2], 2)).max() < 1e-5
    assert again.num_examples == 10 + 20 + 30


def test_buffered_edges_key_every_parent_round_and_edge_apart(exp) -> None:
    """FedBuff at the edge: each parent task runs a fresh coordinator whose task ids restart
    at 1; the devices' round keys (their random streams) must still differ between parent
    rounds and between edges, or every global round would repeat the same batches."""
    from shoal.events import TrainTask
    from shoal.hierarchy.edge import Edge
    from shoal.policy import BufferedPolicy

    base = exp.initial_params.astype(np.float32)
    keys: dict[tuple[str, int], set[int]] = {}
    for name, group in (("edge-0", np.arange(0, 6)), ("edge-1", np.arange(6, 12))):
        edge = Edge(name, 0, rounds=2, policy=lambda n: BufferedPolicy(concurrency=3,
                                                                       buffer_size=2))
        for r in (1, 2):
            devices = TrainedTasks(exp.pool)
            assert edge.answer(TrainTask(task_id=r, version=r - 1, params=base, round=r),
                               group, devices) is not None
            keys[name, r] = {key for _, _, key, _ in devices.tasks}
            assert len(keys[name, r]) == len(devices.tasks) >= 4  # one key per task
    every = list(keys.values())
    for i, a in enumerate(every):
        for b in every[i + 1:]:
            assert not a & b


def test_a_device_that_moved_edges_never_trains_a_parent_round_twice() -> None:
    """Deployed, the global cannot tell which devices are inside an edge's upload. A device
    that gave up on a slow edge (paused, not dead) and moved on must not train the same
    parent round at its new edge: the slow edge's upload may still arrive. Its edge rounds
    keyed k belong to parent round (k - 1) // rounds + 1. The move happens in
    follow_edges, here over real channels to edges that do not answer."""
    import socket
    import threading

    from shoal.hierarchy.deployed import OncePerParentRound, follow_edges
    from shoal.transport.client import DeviceClient
    from shoal.transport.device_api import TaskAbandoned, TrainResult

    trained: list[int] = []

    def train(params, settings, round):
        trained.append(int(round))
        return TrainResult(np.zeros_like(params), 1, {})

    once = OncePerParentRound(train, rounds=2)
    params = np.zeros(DIM, np.float32)
    for key in (1, 2, 3, 4):  # parent rounds 1 and 2 at its first edge
        once(params, {}, key)
    with socket.socket() as s:  # a port nobody serves: the edge stopped answering
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    stats = follow_edges([dead], lambda target: DeviceClient(
        target, "t", "device-0000", root_certificates=None, train=once, max_retries=1,
        max_backoff_s=0.05, timeout_s=1.0), threading.Event(), once)
    assert stats is not None and stats.uploads_accepted == 0
    for key in (3, 4):  # parent round 2 again, at the next edge: refused
        with pytest.raises(TaskAbandoned, match="parent round 2"):
            once(params, {}, key)
    once(params, {}, 5)  # parent round 3: trained
    assert trained == [1, 2, 3, 4, 5]
    # without a move, an edge's several rounds of one parent round all train
    stay = OncePerParentRound(train, rounds=3)
    for key in (1, 2, 3):
        stay(params, {}, key)
    assert trained[-3:] == [1, 2, 3]
