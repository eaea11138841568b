"""The aggregator cluster over gRPC on loopback: two ingest nodes (gRPC servers folding
partial aggregates), the committer (the run's coordinator) and device runtimes, the registry
and the round state in a real redis-server. The committed model is the one a single process
computes for the same uploads."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("grpc")
pytest.importorskip("redis")

from redis_server import RedisServer  # noqa: E402

from shoal.build import load_data  # noqa: E402
from shoal.cli.cluster import run_committer  # noqa: E402
from shoal.cluster.ingest import run_ingest  # noqa: E402
from shoal.cluster.rounds import Partial, RoundBoard  # noqa: E402
from shoal.config import load_config  # noqa: E402
from shoal.deploy import registry_from_config, settings_from_config  # noqa: E402
from shoal.errors import ConfigError, ProtocolError  # noqa: E402
from shoal.frameworks.torch import spec_of  # noqa: E402
from shoal.hierarchy.deployed import follow_edges  # noqa: E402
from shoal.models import build_model  # noqa: E402
from shoal.observers import Observer  # noqa: E402
from shoal.store import ModelStore  # noqa: E402
from shoal.training import LocalTrainConfig  # noqa: E402
from shoal.transport.auth import Keyring, load_or_create_secret  # noqa: E402
from shoal.transport.certs import make_local_pki  # noqa: E402
from shoal.transport.client import DeviceClient  # noqa: E402
from shoal.transport.reference import fmnist_train_fn  # noqa: E402
from shoal.transport.tokens import issue_token  # noqa: E402

CLIENTS, NODES, ROUNDS = 6, 2, 2
BASE = {"rounds": ROUNDS, "data.clients": CLIENTS, "sampling.per_round": CLIENTS,
        "deploy.over_selection": 1.0, "deploy.min_fraction": 1.0, "deploy.deadline_s": 60.0,
        "deploy.checkin_interval_s": 0.5, "deploy.wait_timeout_s": 60.0}


class Devices:
    """Device runtimes in threads: device-000c trains client c and calls the ingest nodes
    starting at node ``c mod N``, moving on when one stops answering."""

    def __init__(self, cfg, data, ca: bytes, secret: bytes) -> None:
        self.cfg, self.data, self.ca, self.secret = cfg, data, ca, secret
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, ports: list[int], indices, wrap=None) -> None:
        """``wrap``: client index -> a wrapper of its training function."""
        cfg, data = self.cfg, self.data
        local = LocalTrainConfig(epochs=cfg["client"]["epochs"],
                                 batch_size=cfg["client"]["batch_size"], lr=cfg["client"]["lr"])
        for c in indices:
            idx = data.client_indices[c]
            name = f"device-{c:04d}"
            train = fmnist_train_fn(cfg["model"]["name"], data.train.x[idx],
                                    data.train.y[idx], local, cfg.seed, c)
            if wrap and c in wrap:
                train = wrap[c](train)
            token = issue_token(self.secret, name, now=time.time(), ttl_seconds=3600)
            order = [f"localhost:{ports[(c + k) % len(ports)]}" for k in range(len(ports))]

            def client_for(target, name=name, token=token, train=train, n=len(idx)):
                return DeviceClient(target, token, name, root_certificates=self.ca,
                                    train=train, examples=n, min_wait_s=0.1, max_wait_s=1.0,
                                    max_retries=2, max_backoff_s=0.5)

            t = threading.Thread(target=follow_edges, args=(order, client_for, self.stop),
                                 daemon=True)
            t.start()
            self.threads.append(t)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


@pytest.fixture
def redis(tmp_path: Path):
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def cluster_config(redis: RedisServer, **extra):
    return load_config(None, {**BASE, "deploy.registry": "redis",
                              "deploy.redis_url": redis.url, **extra})


class _Uploads:
    """What every device trained from and uploaded, by round (the oracle's input)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[int, dict[int, tuple[np.ndarray, object]]] = {}

    def spy(self, train):
        def spied(params, settings, round):
            result = train(params, settings, round)
            with self.lock:
                self.seen.setdefault(round, {})[id(train)] = (np.array(params, np.float32),
                                                              result)
            return result
        return spied

    def of_round(self, round: int):
        entries = list(self.seen[round].values())
        bases = [p for p, _ in entries]
        assert all(np.array_equal(b, bases[0]) for b in bases)  # one model per round
        return bases[0].astype(np.float64), [r for _, r in entries]


def start_nodes(cfg, redis, secret: bytes, tls, spec, stop: threading.Event):
    """``NODES`` ingest nodes in threads, serving until ``stop``: ``(name -> node, their
    ports, their threads)`` once every one listens."""
    nodes: dict[str, object] = {}
    ports: list[int] = []
    ready = threading.Barrier(NODES + 1)

    def serve_node(name: str) -> None:
        nodes[name] = run_ingest(
            name, RoundBoard(redis.url), settings=settings_from_config(cfg),
            keyring=Keyring.single(secret), dim=spec.size, fingerprint=spec.fingerprint,
            registry_factory=lambda: registry_from_config(cfg), seed=cfg.seed,
            grace_s=1.0, tls=tls, stop=stop,
            on_ready=lambda port: (ports.append(port), ready.wait()))

    threads = [threading.Thread(target=serve_node, args=(f"ingest-{i}",), daemon=True)
               for i in range(NODES)]
    for t in threads:
        t.start()
    ready.wait(timeout=30)
    return nodes, ports, threads


def cluster_in_threads(tmp_path: Path, cfg, redis, stop: threading.Event):
    """A PKI and a secret under ``tmp_path``, :func:`start_nodes`'s ingest nodes and the
    devices for them: ``(data, nodes, ports, threads, devices)``."""
    data = load_data(cfg)
    pki = make_local_pki(tmp_path / "certs", days=1, now=dt.datetime.now(dt.timezone.utc))
    tls = (pki.server_cert.read_bytes(), pki.server_key.read_bytes())
    secret = load_or_create_secret(tmp_path / "secret")
    spec = spec_of(build_model(cfg["model"]["name"], 784, 10, cfg.seed))
    nodes, ports, threads = start_nodes(cfg, redis, secret, tls, spec, stop)
    return data, nodes, ports, threads, Devices(cfg, data, pki.ca_cert.read_bytes(), secret)


def test_two_ingest_nodes_commit_the_single_process_model(tmp_path: Path, redis) -> None:
    cfg = cluster_config(redis)
    stop = threading.Event()
    _, nodes, ports, threads, devices = cluster_in_threads(tmp_path, cfg, redis, stop)
    uploads = _Uploads()
    devices.start(ports, range(CLIENTS), wrap={c: uploads.spy for c in range(CLIENTS)})
    committed: dict[int, np.ndarray] = {}
    try:
        _, result = run_committer(cfg, tmp_path / "models")
    finally:
        stop.set()
        devices.close()
        for t in threads:
            t.join(timeout=30)

    assert result.state.version == ROUNDS
    # the oracle: what one process commits for these uploads, FedAvg over every device
    for rec in result.records[1:]:
        base, ups = uploads.of_round(rec.round)
        weights = np.array([u.num_examples for u in ups], np.float64)
        mean = (weights[:, None] * np.stack([u.delta for u in ups])).sum(0) / weights.sum()
        committed[rec.round] = (base + mean).astype(np.float32)
        assert rec.accepted == CLIENTS and rec.examples == weights.sum()  # each device once
    # both nodes folded devices in every round (each device starts at node c mod 2)
    assert all(node.answered == ROUNDS for node in nodes.values())
    store = ModelStore(tmp_path / "models")
    try:
        assert [v.round for v in store.list()] == list(range(1, ROUNDS + 1))
        for v in store.list():
            got = store.load(v.id).state.params
            assert np.abs(got - committed[v.round]).max() <= 1e-6
    finally:
        store.close()
    assert np.array_equal(got, result.state.params)


def test_a_device_is_folded_by_one_node_only(tmp_path: Path, redis) -> None:
    """The claim script against an independent reading of the rules: one owner per device,
    nothing past the target or after the committer closed the task."""
    from shoal.events import TrainTask

    board = RoundBoard(redis.url, prefix="t")
    board.reset()  # a committer's run
    task = TrainTask(task_id=7, version=3, params=np.arange(4, dtype=np.float32), round=4,
                     deadline=123.5)
    board.open(task, ["a", "b", "c"], target=2)
    ref = board.current()
    assert ref == board.ref(7)
    ct = board.load(ref)
    assert ct is not None and ct.devices == ("a", "b", "c") and ct.target == 2
    assert np.array_equal(ct.task.params, task.params) and ct.task.round == 4
    assert ct.task.task_id == 7 and ct.task.deadline == 123.5 and not ct.closed
    assert board.claim(ref, "a", "n1") == "ok"
    assert board.claim(ref, "a", "n1") == "ok"  # a retry at the same node
    assert board.claim(ref, "a", "n2") == "taken"
    assert board.claim(ref, "b", "n2") == "ok"
    assert board.claim(ref, "c", "n1") == "full"  # the target is reached
    board.release(ref, "b", "n1")  # not n1's: nothing changes
    assert board.state(ref)[2] == {"a": "n1", "b": "n2"}
    board.release(ref, "b", "n2")
    board.close_task(7)
    assert board.claim(ref, "c", "n1") == "closed"
    assert board.state(ref) == (True, 2, {"a": "n1"})
    assert board.claim(board.ref(8), "a", "n1") == "closed"  # a task never opened
    p = Partial(ref, "n1", np.ones(4, np.float32), 12, ("a",), 3, {"download_bytes": 5.0})
    board.push_partial(p)
    got = board.pop_partial(1.0, 4)
    assert got is not None and (got.task, got.node, got.devices, got.num_examples,
                                got.base_version, got.metrics) == (ref, "n1", ("a",), 12, 3,
                                                                   {"download_bytes": 5.0})
    assert np.array_equal(got.delta, p.delta)
    assert board.pop_partial(0.0, 4) is None
    # a restarted committer counts its tasks from 1 again: its task 7 is a new one
    board.push_partial(p)
    board.reset()
    assert board.current() == "" and board.pop_partial(0.0, 4) is None
    board.open(task, ["a", "b", "c"], target=2)
    assert board.current() != ref and board.claim(board.current(), "a", "n2") == "ok"
    with pytest.raises(ProtocolError, match="not 5 float32"):
        Partial.from_bytes(p.to_bytes(), 5)


def test_the_cluster_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    from shoal.cli.cluster import check_cluster

    with pytest.raises(ConfigError, match="deploy.registry = 'redis'"):
        check_cluster(load_config(None, BASE))
    with pytest.raises(ConfigError) as e:
        check_cluster(load_config(None, {**BASE, "deploy.registry": "redis",
                                         "secure_aggregation.enabled": True}))
    assert e.value.key == "secure_aggregation.enabled"
    with pytest.raises(ConfigError, match="several need 'redis'"):
        registry_from_config(load_config(None, BASE))


def test_shoal_launch_ingest_refuses_before_starting_anything(tmp_path: Path, capsys) -> None:
    from shoal.cli import main

    work = tmp_path / "never"
    assert main(["launch", "--ingest", "2", "--clients", "4", "--dir", str(work)]) == 2
    assert "--ingest needs --redis" in capsys.readouterr().err
    assert main(["launch", "--ingest", "2", "--redis", "--clients", "4", "--per-round", "4",
                 "--dir", str(work), "--set", "secure_aggregation.enabled=true"]) == 2
    assert "does not run secure aggregation" in capsys.readouterr().err
    assert not work.exists()


class _Slow:
    """A device's training function that takes ``seconds`` longer in ``round`` (a
    straggler: the ingest nodes' round stays open meanwhile)."""

    def __init__(self, train, round: int, seconds: float) -> None:
        self.train, self.round, self.seconds = train, round, seconds

    def __call__(self, params, settings, round):
        if round == self.round:
            time.sleep(self.seconds)
        return self.train(params, settings, round)


class _Abandons(Observer):
    def __init__(self) -> None:
        self.records: list = []

    def round_abandoned(self, record, reason: str) -> None:
        self.records.append(record)


@pytest.mark.slow
@pytest.mark.parametrize("min_fraction", [0.5, 1.0])
def test_killing_an_ingest_node_mid_round(tmp_path: Path, redis, min_fraction) -> None:
    """Two ingest processes; in round 2, once ingest-1 has folded some of its devices (its
    round still open: device 0, at ingest-0, is a straggler), ingest-1 is killed with
    SIGKILL. With min_fraction 0.5 round 2 commits at its deadline from ingest-0's partial
    alone, its examples exactly those of the devices ingest-0 folded; with 1.0 it is
    abandoned at its deadline and retried with a fresh cohort, which ingest-0 serves whole.
    ingest-1's devices move to ingest-0; round 3 has all six again; every version is in the
    store, once."""
    import os
    import signal
    import subprocess
    import sys

    from shoal.config import to_toml

    rounds = 3
    cfg = cluster_config(redis, **{"rounds": rounds, "deploy.min_fraction": min_fraction,
                                   "deploy.deadline_s": 12.0, "deploy.ingest_grace_s": 2.0})
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(to_toml(cfg))
    data = load_data(cfg)
    pki = make_local_pki(tmp_path / "certs", days=1, now=dt.datetime.now(dt.timezone.utc))
    secret = load_or_create_secret(tmp_path / "secret")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "shoal.cli.cluster", "ingest",
                               str(cfg_path), "--name", f"ingest-{i}", "--secret",
                               str(tmp_path / "secret"), "--certs", str(tmp_path / "certs"),
                               "--dir", str(tmp_path / f"ingest-{i}")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(NODES)]
    board = RoundBoard(redis.url)
    killed, done = threading.Event(), threading.Event()
    tasks: dict[str, int] = {}  # the committer's tasks on the board, in order -> round
    abandons = _Abandons()
    devices = Devices(cfg, data, pki.ca_cert.read_bytes(), secret)
    try:
        ports = []
        for i in range(NODES):
            port_file = tmp_path / f"ingest-{i}" / "port"
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text().strip()):
                assert time.monotonic() < deadline and procs[i].poll() is None
                time.sleep(0.05)
            ports.append(int(port_file.read_text()))
        # device 0 (at ingest-0) straggles in round 2: the round stays open meanwhile
        devices.start(ports, range(CLIENTS), wrap={0: lambda t: _Slow(t, 2, 5.0)})

        def kill_mid_round_2() -> None:
            while not done.is_set():
                ref = board.current()
                ct = board.load(ref) if ref else None
                if ct is not None:
                    tasks.setdefault(ref, ct.task.round)
                if ct is not None and ct.task.round == 2 and not killed.is_set() \
                        and "ingest-1" in board.state(ref)[2].values():
                    procs[1].send_signal(signal.SIGKILL)
                    killed.set()
                time.sleep(0.01)

        killer = threading.Thread(target=kill_mid_round_2, daemon=True)
        killer.start()
        _, result = run_committer(cfg, tmp_path / "models", observers=[abandons])
    finally:
        done.set()
        devices.close()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(timeout=20)
    assert procs[1].returncode == -signal.SIGKILL

    assert result.state.version == rounds
    committed = [r for r in result.records[1:] if r.committed]
    abandoned = abandons.records
    sizes = {f"device-{c:04d}": len(ix) for c, ix in enumerate(data.client_indices)}
    everyone = sum(sizes.values())
    if min_fraction == 1.0:
        assert [(r.round, r.closed_by) for r in abandoned] == [(2, "deadline")]
        assert [r.accepted for r in committed] == [CLIENTS] * rounds
        assert [r.examples for r in committed] == [everyone] * rounds
        assert committed[1].attempt == 1
    else:
        assert not abandoned
        assert [r.accepted for r in committed[::2]] == [CLIENTS, CLIENTS]
        assert committed[0].examples == committed[2].examples == everyone
    # round 2: exactly the devices ingest-0 folded (its own three, and those of ingest-1's
    # whose upload failed and who came to it), each once; ingest-1's partial died with it
    round2 = [ref for ref, r in tasks.items() if r == 2]
    folds = board.state(round2[0])[2]
    survivors = sorted(d for d, node in folds.items() if node == "ingest-0")
    lost = sorted(d for d, node in folds.items() if node == "ingest-1")
    assert lost and len(survivors) + len(lost) <= CLIENTS
    if min_fraction < 1.0:
        assert committed[1].accepted == len(survivors) >= CLIENTS // 2
        assert committed[1].examples == sum(sizes[d] for d in survivors)
        assert committed[1].closed_by == "deadline"  # it waited for ingest-1's devices
    else:  # the retry's cohort, all folded by the survivor
        assert len(round2) == 2 and set(board.state(round2[1])[2].values()) == {"ingest-0"}
    store = ModelStore(tmp_path / "models")
    try:
        versions = store.list()
        assert [v.round for v in versions] == [1, 2, 3]
        assert [v.parent for v in versions] == [None, versions[0].id, versions[1].id]
        assert np.array_equal(store.load(versions[-1].id).state.params, result.state.params)
    finally:
        store.close()


def test_an_unreachable_redis_is_a_clear_error(tmp_path: Path, redis) -> None:
    from shoal.registry.redis import RegistryUnavailable

    board = RoundBoard(redis.url, timeout=0.5)
    assert board.current() == ""
    redis.stop()
    with pytest.raises(RegistryUnavailable, match=f"127.0.0.1:{redis.port} is unreachable"):
        board.claim("x.1", "a", "n1")
    redis.start()  # the append-only file brings the state back; the next call reconnects
    assert board.current() == "" and board.claim("x.1", "a", "n1") == "closed"



def test_a_committer_killed_after_a_version_resumes_from_the_store(tmp_path: Path,
                                                                   redis) -> None:
    """The committer (a process) is SIGKILLed once version 1 is in the store, mid-round 2;
    a new committer resumes from version 1: the ingest nodes drop the dead run's round (its
    partials would be refused as another run's) and serve the new one; every round has each
    device once, and the store holds versions 1, 2, 3 in one chain."""
    import os
    import signal
    import subprocess
    import sys

    from shoal.config import to_toml

    rounds = 3
    cfg = cluster_config(redis, **{"rounds": rounds, "deploy.deadline_s": 30.0})
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(to_toml(cfg))
    stop = threading.Event()
    data, _, ports, threads, devices = cluster_in_threads(tmp_path, cfg, redis, stop)
    devices.start(ports, range(CLIENTS))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "shoal.cli.cluster", "commit",
                              str(cfg_path), "--dir", str(tmp_path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    board = RoundBoard(redis.url)
    try:
        deadline = time.monotonic() + 120
        while True:  # version 1 committed and round 2 open: kill the committer
            assert first.poll() is None and time.monotonic() < deadline
            ref = board.current()
            ct = board.load(ref) if ref else None
            if ct is not None and ct.task.round == 2:
                first.send_signal(signal.SIGKILL)
                first.wait(timeout=10)
                break
            time.sleep(0.01)
        _, result = run_committer(cfg, tmp_path / "models")
    finally:
        stop.set()
        devices.close()
        if first.poll() is None:
            first.kill()
        for t in threads:
            t.join(timeout=30)
    assert first.returncode == -signal.SIGKILL
    assert result.state.version == rounds
    resumed = [r for r in result.records if r.round > 0 and r.committed]
    assert [r.round for r in resumed] == [2, 3]  # the new run started from version 1
    everyone = sum(len(ix) for ix in data.client_indices)
    assert all(r.accepted == CLIENTS and r.examples == everyone for r in resumed)
    store = ModelStore(tmp_path / "models")
    try:
        versions = store.list()
        assert [v.round for v in versions] == [1, 2, 3]
        assert [v.parent for v in versions] == [None, versions[0].id, versions[1].id]
    finally:
        store.close()
