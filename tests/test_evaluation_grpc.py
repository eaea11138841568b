"""Federated evaluation and a canary over real gRPC on loopback, with real device runtimes
(DeviceClient threads) that fetch the served model, verify it with the operator's key,
evaluate it on their own held-out data and report.

Oracles: the aggregate is the one the in-memory coordinator computes from the same per-device
numbers (the simulation's path), which is in turn checked against numpy's weighted means; the
canary test checks from the device side (each runtime's installed versions) that no device
outside the canary ever held the candidate."""

from __future__ import annotations

import threading

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from aggregator_harness import DIM, SECRET, token  # noqa: E402
from shoal.coordinator import Coordinator  # noqa: E402
from shoal.events import EvalDone, EvalReported, EvalReports  # noqa: E402
from shoal.lifecycle.audit import AuditLog  # noqa: E402
from shoal.lifecycle.canary import Canary, CanaryRule, in_canary  # noqa: E402
from shoal.lifecycle.keys import load_signer, load_trusted_key, write_operator_key  # noqa: E402
from shoal.lifecycle.store_signing import sign_version  # noqa: E402
from shoal.params import ParamSpec  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.sampling import UniformSampler  # noqa: E402
from shoal.store import Checkpoint  # noqa: E402
from shoal.store.models import ModelStore  # noqa: E402
from shoal.strategy import FedAvg, ServerState  # noqa: E402
from shoal.transport.auth import Keyring  # noqa: E402
from shoal.transport.client import DeviceClient  # noqa: E402
from shoal.transport.device_api import TrainResult  # noqa: E402
from shoal.transport.evaluation_carrier import (EvaluationCarrier,  # noqa: E402
                                                run_canary_deployed)
from shoal.transport.server import AggregatorService, AggregatorSettings, serve  # noqa: E402
from shoal.transport.serving import ModelServing  # noqa: E402

TARGET = np.linspace(-1, 1, DIM).astype(np.float32)  # the "true" model of every device


def held_out(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Device ``i``'s held-out regression data: y = x . TARGET + noise, 20 + 7i rows."""
    rng = np.random.default_rng(100 + i)
    x = rng.standard_normal((20 + 7 * i, DIM)).astype(np.float32)
    return x, x @ TARGET + 0.1 * rng.standard_normal(len(x)).astype(np.float32)


def evaluate_fn(i: int):
    x, y = held_out(i)

    def run(params: np.ndarray) -> tuple[int, dict[str, float]]:
        err = x @ params - y
        return len(y), {"loss": float(np.mean(err ** 2)),
                        "within": float(np.mean(np.abs(err) < 1.0))}

    return run


def commit(store: ModelStore, p: np.ndarray, *, production: bool) -> int:
    ckpt = Checkpoint(ServerState(params=p.astype(np.float32), version=1),
                      ParamSpec.from_shapes({"w": (DIM,)}), seed=0)
    parent = store.latest()
    return store.commit(ckpt, round=1, metrics={}, now=1.0,
                        parent=parent.id if parent else None,
                        status="production" if production else "candidate").id


class Deployment:
    """An aggregator serving ``store`` (signed), with ``n`` device runtimes in threads."""

    def __init__(self, tmp_path, store, n: int, *, segments=("android", "ios")):
        paths = write_operator_key(tmp_path / "keys", "ed25519")
        signer, trusted = load_signer(paths[0]), load_trusted_key(paths[1])
        for v in store.list():  # signed where the key is; serving only reads signatures
            sign_version(store, signer, v.id)
        self.serving = ModelServing(store, key=trusted)
        self.service = AggregatorService(
            AggregatorSettings(idle_retry_s=0.2, checkin_interval_s=0.3),
            Keyring.single(SECRET), DIM, "fp",
            lambda: SQLiteRegistry(tmp_path / "registry.db"), serving=self.serving,
            segment_by="os")
        self.port, self._stop_server = serve(self.service)
        self.devices = [f"dev-{i:02d}" for i in range(n)]
        self.segment = {d: segments[i % len(segments)] for i, d in enumerate(self.devices)}
        self.stop = threading.Event()
        self.clients = [DeviceClient(
            f"127.0.0.1:{self.port}", token(d), d, root_certificates=None,
            train=lambda p, s, r: TrainResult(np.zeros_like(p), 1),
            evaluate=evaluate_fn(i), attributes={"os": self.segment[d]},
            trusted_key=trusted, min_wait_s=0.05, max_wait_s=0.5)
            for i, d in enumerate(self.devices)]
        self.threads = [threading.Thread(target=c.run, kwargs={"stop": self.stop})
                        for c in self.clients]
        for t in self.threads:
            t.start()
        while len(self.service.registry.list()) < n:  # every device said Hello
            self.stop.wait(0.05)

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)
        for c in self.clients:
            c.close()
        self._stop_server()


def test_federated_evaluation_over_grpc_is_the_simulations_result(tmp_path):
    params = TARGET + np.random.default_rng(0).normal(0, 0.3, DIM).astype(np.float32)
    with ModelStore(tmp_path / "models") as store:
        v = commit(store, params, production=True)
        dep = Deployment(tmp_path, store, 6)
        try:
            with EvaluationCarrier(dep.service, dep.devices) as carrier:
                asked = np.array([0, 2, 3, 5])
                (result,) = carrier.evaluate([(v, asked)], timeout_s=30)
        finally:
            dep.close()
    assert result.version == v and result.closed_by == "complete" and result.missing == 0
    assert sorted(result.client_ids.tolist()) == asked.tolist()
    # the simulation's path: the in-memory coordinator folds the same numbers
    reports = {int(c): evaluate_fn(int(c))(params) for c in asked}
    sim = Coordinator(FedAvg(), 6, UniformSampler(6), seed=0)
    (send,) = [c for c in sim.evaluate(params, v, 0.0, clients=asked)
               if type(c).__name__ == "SendEval"]
    cmds = sim.handle(EvalReported(send.task.task_id, EvalReports(
        asked, np.array([reports[c][0] for c in asked]),
        {k: np.array([reports[c][1][k] for c in asked]) for k in ("loss", "within")},
        tuple(dep.segment[dep.devices[c]] for c in asked)), 0.0))
    (expected,) = [c.result for c in cmds if isinstance(c, EvalDone)]
    for k in ("loss", "within"):
        assert result.metrics[k] == pytest.approx(expected.metrics[k], rel=1e-12)
        w = np.array([reports[c][0] for c in asked], float)
        assert result.metrics[k] == pytest.approx(
            np.average([reports[c][1][k] for c in asked], weights=w), rel=1e-9)
    assert set(result.by_segment) == {"android", "ios"}
    for seg, figures in expected.by_segment.items():
        assert result.by_segment[seg] == pytest.approx(dict(figures), rel=1e-12)
    # every reporting device fetched the served model (and only that version)
    assert {d for d in dep.devices if v in dep.clients[dep.devices.index(d)]
            .stats.served_versions} >= {dep.devices[c] for c in asked}


@pytest.mark.parametrize("better", [False, True])
def test_a_canary_over_grpc_rolls_back_a_bad_candidate_and_promotes_a_good_one(tmp_path,
                                                                                better):
    noise = np.random.default_rng(1).normal(0, 0.3, DIM).astype(np.float32)
    production = TARGET + noise
    candidate = TARGET + 0.2 * noise if better else -TARGET  # a model gone wrong
    audit = AuditLog(tmp_path / "audit.jsonl")
    with ModelStore(tmp_path / "models") as store:
        prod_v = commit(store, production, production=True)
        cand_v = commit(store, candidate, production=False)
        dep = Deployment(tmp_path, store, 10)
        canary = Canary(store, cand_v, 0.4, now=dep.service.clock(), audit=audit,
                        rule=CanaryRule(min_clients=3, alpha=0.05, margin=0.05,
                                        max_rounds=3))
        inside = {d for d, m in zip(dep.devices, in_canary(dep.devices, 0.4, canary.salt))
                  if m}
        assert 3 <= len(inside) <= 7  # both arms can reach the minimum sample
        try:
            dep.serving.canary = canary
            with EvaluationCarrier(dep.service, dep.devices) as carrier:
                outcome = run_canary_deployed(canary, carrier, cohort=5, seed=0,
                                              timeout_s=30)
        finally:
            dep.close()
        assert outcome.verdict.decision == ("promote" if better else "rollback")
        assert outcome.verdict.reason.startswith("not worse" if better else "worse")
        assert outcome.canary_devices == inside
        assert store.production().id == (cand_v if better else prod_v)
        assert store.get(cand_v).status == ("production" if better else "rolled_back")
    # device side: no device outside the canary ever installed the candidate
    held = {d: set(c.stats.served_versions) for d, c in zip(dep.devices, dep.clients)}
    assert not any(cand_v in held[d] for d in set(dep.devices) - inside)
    assert any(cand_v in held[d] for d in inside)
    assert outcome.reached[cand_v] <= inside  # and the server agrees
    evaluated = [e for e in audit.entries if e["action"] == "canary_evaluated"]
    assert evaluated and all(e["by_segment"] and set(e["by_segment"]) <= {"android", "ios"}
                             for e in evaluated)  # each arm's breakdown by declared segment
    actions = [e["action"] for e in audit.entries]
    assert actions[0] == "canary_start" and "canary_evaluated" in actions
    assert actions[-1] == ("canary_promote" if better else "canary_rollback")
