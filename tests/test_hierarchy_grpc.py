"""Hierarchy over gRPC on loopback: a global aggregator, edge processes' code (an aggregator
for their devices, a device of the global) and device runtimes, TLS between every tier.
Flat and 2-tier deployments with the same devices and seed commit the same model."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("grpc")

from shoal.build import load_data  # noqa: E402
from shoal.config import load_config  # noqa: E402
from shoal.deploy import AggregatorPaths, run_aggregator, settings_from_config  # noqa: E402
from shoal.frameworks.torch import spec_of  # noqa: E402
from shoal.hierarchy.deployed import Upstream, edge_policy, run_edge  # noqa: E402
from shoal.hierarchy.edge import Edge  # noqa: E402
from shoal.hierarchy.ring import Ring  # noqa: E402
from shoal.models import build_model  # noqa: E402
from shoal.training import LocalTrainConfig  # noqa: E402
from shoal.transport.auth import Keyring, load_or_create_secret  # noqa: E402
from shoal.transport.certs import make_local_pki  # noqa: E402
from shoal.transport.client import DeviceClient  # noqa: E402
from shoal.transport.reference import fmnist_train_fn  # noqa: E402
from shoal.transport.tokens import issue_token  # noqa: E402

CLIENTS, EDGES, ROUNDS = 6, 2, 2
BASE = {"rounds": ROUNDS, "data.clients": CLIENTS, "sampling.per_round": CLIENTS,
        "deploy.over_selection": 1.0, "deploy.min_fraction": 1.0, "deploy.deadline_s": 60.0,
        "deploy.checkin_interval_s": 0.5, "deploy.wait_timeout_s": 60.0}


class _Devices:
    """Device runtimes in threads: device-000c trains client c of the config's partition."""

    def __init__(self, cfg, data, pki) -> None:
        self.cfg, self.data, self.pki = cfg, data, pki
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, port: int, secret: bytes, indices) -> None:
        cfg, data = self.cfg, self.data
        local = LocalTrainConfig(epochs=cfg["client"]["epochs"],
                                 batch_size=cfg["client"]["batch_size"], lr=cfg["client"]["lr"])
        for c in indices:
            idx = data.client_indices[c]
            name = f"device-{c:04d}"
            train = fmnist_train_fn(cfg["model"]["name"], data.train.x[idx],
                                    data.train.y[idx], local, cfg.seed, c)
            client = DeviceClient(f"localhost:{port}", _token(secret, name), name,
                                  root_certificates=self.pki.ca_cert.read_bytes(),
                                  train=train, examples=len(idx), min_wait_s=0.1,
                                  max_wait_s=1.0)
            t = threading.Thread(target=self._run, args=(client,), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, client: DeviceClient) -> None:
        with client:
            client.run(stop=self.stop)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


@pytest.fixture(autouse=True)
def _torch_threads():
    """The devices here train in threads of this process, several at once, with PyTorch's
    intra-op threads set explicitly to 2 (as the aggregator's in-process evaluation used to
    set them, for the whole process, before it moved to a process of its own). Left at
    PyTorch's default (also 2 here, but never set) their updates differ in the last bits, and
    with 1 the flat and two-tier runs drift apart by 7e-4 after two rounds: the 1e-6 bound
    below holds for one fixed setting, which the test therefore fixes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _token(secret: bytes, name: str) -> str:
    return issue_token(secret, name, now=time.time(), ttl_seconds=3600)


def _paths(root: Path, pki) -> AggregatorPaths:
    root.mkdir(parents=True, exist_ok=True)
    return AggregatorPaths(secret=root / "secret", registry=root / "registry.db",
                           store=root / "models", tls_dir=pki.ca_cert.parent)


@pytest.mark.slow
def test_flat_and_two_tier_over_grpc_commit_the_same_model(tmp_path) -> None:
    cfg = load_config(None, BASE)
    data = load_data(cfg)
    pki = make_local_pki(tmp_path / "certs", days=1, now=dt.datetime.now(dt.timezone.utc))
    tls = (pki.server_cert.read_bytes(), pki.server_key.read_bytes())

    # flat: six devices against the global aggregator
    flat_paths = _paths(tmp_path / "flat", pki)
    devices = _Devices(cfg, data, pki)
    try:
        _, flat = run_aggregator(cfg, flat_paths, on_ready=lambda port: devices.start(
            port, load_or_create_secret(flat_paths.secret), range(CLIENTS)))
    finally:
        devices.close()

    # two tiers: the global's devices are two edges, each serving its ring's devices
    gcfg = cfg.with_overrides({"data.clients": EDGES, "sampling.per_round": EDGES})
    global_paths = _paths(tmp_path / "global", pki)
    ring = Ring([f"edge-{i}" for i in range(EDGES)])
    ring.assign_all([f"device-{c:04d}" for c in range(CLIENTS)])
    spec = spec_of(build_model(cfg["model"]["name"], 784, 10, cfg.seed))
    devices = _Devices(cfg, data, pki)
    stop = threading.Event()
    edges: list[threading.Thread] = []
    answered: dict[str, object] = {}

    def start_edges(port: int) -> None:
        for i in range(EDGES):
            name = f"edge-{i}"
            root = tmp_path / name
            root.mkdir()
            secret = load_or_create_secret(root / "secret")
            mine = ring.devices_of(name)
            edge = Edge(name, cfg.seed, 1, policy=edge_policy(60.0, 1.0))
            up = Upstream(f"localhost:{port}", _token(load_or_create_secret(
                global_paths.secret), name), pki.ca_cert.read_bytes())

            def serve_edge(edge=edge, mine=mine, up=up, secret=secret, root=root) -> None:
                answered[edge.name] = run_edge(
                    edge, mine, up, settings=settings_from_config(cfg),
                    keyring=Keyring.single(secret), dim=spec.size,
                    fingerprint=spec.fingerprint, registry_path=str(root / "registry.db"),
                    tls=tls, stop=stop, wait_timeout_s=60.0,
                    on_ready=lambda p: devices.start(p, secret, [int(d[-4:]) for d in mine]))

            t = threading.Thread(target=serve_edge, daemon=True)
            t.start()
            edges.append(t)

    try:
        _, tiered = run_aggregator(gcfg, global_paths, on_ready=start_edges)
    finally:
        stop.set()
        devices.close()
        for t in edges:
            t.join(timeout=30)

    assert tiered.state.version == flat.state.version == ROUNDS
    assert np.abs(tiered.state.params - flat.state.params).max() <= 1e-6
    for f, t in zip(flat.records[1:], tiered.records[1:]):
        assert f.accepted == CLIENTS and t.accepted == EDGES  # K uploads, then E
        assert t.bytes_up < f.bytes_up
    assert all(stats.uploads_accepted == ROUNDS for stats in answered.values())


@pytest.mark.slow
def test_shoal_launch_edges_runs_processes_and_commits_the_simulated_flat_model(tmp_path,
                                                                               capsys) -> None:
    """``shoal launch --edges 2``: the global, two edge processes and six device processes,
    TLS between every tier; its last model is the one ``shoal run`` computes flat."""
    import json

    from shoal.cli import main
    from shoal.experiment import Experiment
    from shoal.store import ModelStore

    work = tmp_path / "launch"
    code = main(["launch", "--edges", str(EDGES), "--clients", str(CLIENTS), "--rounds",
                 str(ROUNDS), "--per-round", str(CLIENTS), "--set",
                 "deploy.over_selection=1.0", "--set", "deploy.min_fraction=1.0", "--set",
                 "deploy.checkin_interval_s=1.0", "--json", "-q", "--no-dashboard",
                 "--dir", str(work), "--out", str(tmp_path / "runs")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rounds"] == ROUNDS and summary["client_updates"] == EDGES * ROUNDS
    store = ModelStore(work / "models")
    deployed = store.load(store.latest().id).state.params
    store.close()
    flat = Experiment(load_config(None, BASE)).run()
    assert np.abs(deployed - flat.state.params).max() <= 1e-6
    for i in range(EDGES):
        last = (work / "logs" / f"edge-{i}.log").read_text().strip().splitlines()[-1]
        assert json.loads(last)["uploads_accepted"] == ROUNDS


@pytest.mark.slow
def test_killing_an_edge_mid_round_commits_with_the_survivors_and_moves_its_devices(
        tmp_path, capsys) -> None:
    """``hierarchy.failures = "edge-1@2"``: edge-1's process is SIGKILLed in round 2 once it
    has its devices' aggregate, before its upload. Round 2 commits with the other edges'
    uploads at its deadline (min_fraction 0.6 of 3 edges), its devices' next check-in fails
    and they move to the edge the ring gives them, which serves them in round 3."""
    import json

    from shoal.cli import main

    work, out = tmp_path / "kill", tmp_path / "runs"
    clients = 9
    code = main(["launch", "--edges", "3", "--clients", str(clients), "--rounds", "3",
                 "--per-round", str(clients), "--set", "deploy.over_selection=1.0",
                 # round 2 waits out its deadline for edge-1; meanwhile edge-1's devices
                 # come back (0.5-1.5 x the check-in interval), exhaust their 3 retries
                 # (backoff up to 1 s each) and say Hello to their new edge: 9 s leaves
                 # room for that on a loaded machine before round 3 opens
                 "--set", "deploy.min_fraction=0.6", "--set", "deploy.deadline_s=9.0",
                 "--set", "deploy.checkin_interval_s=1.0",
                 "--set", 'hierarchy.failures="edge-1@2"', "--json", "-q", "--no-dashboard",
                 "--dir", str(work), "--out", str(out), "--set", 'output.name="k"'])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rounds"] == 3
    rows = [json.loads(line) for line in (out / "k" / "metrics.jsonl").read_text().splitlines()]
    accepted = [r["accepted"] for r in rows[1:]]
    assert accepted == [3, 2, 2]  # edge-1's upload never came, and never came twice
    data = load_data(load_config(None, {"data.clients": clients,
                                        "sampling.per_round": clients}))
    everyone = sum(len(ix) for ix in data.client_indices)
    assert rows[1]["examples"] == everyone
    assert rows[2]["examples"] < everyone  # edge-1's devices trained, their sum was lost
    assert rows[3]["examples"] == everyone  # round 3: its devices served by the others
    assert "killing myself in round 2" in (work / "logs" / "edge-1.log").read_text()
