"""An edge failing mid-round: the round commits with the survivors or is retried, the dead
edge's devices move to other edges, nothing is counted twice."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.build import load_data
from shoal.config import load_config
from shoal.coordinator import Coordinator
from shoal.events import CommitVersion, SendTask, TrainTask, UpdateRefused, UpdatesArrived
from shoal.experiment import Experiment
from shoal.observers import Observer
from shoal.policy import SyncPolicy
from shoal.sampling import UniformSampler
from shoal.strategy import FedAvg


@pytest.fixture(scope="module")
def data():
    return load_data(load_config())


def _plain_mean(devices, params: np.ndarray, round_key: int, ids: np.ndarray
                ) -> tuple[np.ndarray, float]:
    """The weighted sum of ``ids``' own updates (float64) and its weight, trained here."""
    task = TrainTask(task_id=1, version=0, params=params, round=round_key)
    s, w = np.zeros(params.size), 0.0
    for batch in devices.train(task, ids):
        n = np.asarray(batch.num_examples, np.float64)
        s += n @ np.asarray(batch.deltas, np.float64)
        w += n.sum()
    return s, w


class _Abandoned(Observer):
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def round_abandoned(self, record: object, reason: str) -> None:
        self.reasons.append(reason)


def test_a_round_commits_with_the_survivors_and_the_dead_edge_devices_move(data) -> None:
    cfg = load_config(None, {"rounds": 3, "sampling.per_round": 20, "hierarchy.edges": 4,
                             "hierarchy.failures": "edge-1@2"})
    exp = Experiment(cfg, data)
    tier = exp.pool
    cohorts = {v: exp.coordinator.cohort(v) for v in (2, 3)}
    dead_group = tier.route.groups(cohorts[2])["edge-1"]
    states = {}
    result = exp.run(on_commit=lambda st, rec: states.setdefault(st.version, st))
    assert tier.failed == ["edge-1"] and not tier.route.ring.is_live("edge-1")
    r2, r3 = result.records[2], result.records[3]
    assert r2.accepted == 20 - len(dead_group) and r2.committed
    # the model of round 2 is the survivors' plain weighted mean, nothing of the dead group
    base = states[1].params
    survivors = np.setdiff1d(cohorts[2], dead_group)
    s, w = _plain_mean(tier.below, base, 2, survivors)
    assert np.abs(states[2].params - (base + s / w)).max() <= 1e-6
    # round 3: every device served, none by the dead edge
    assert r3.accepted == 20
    assert "edge-1" not in tier.route.groups(cohorts[3])
    assert all(tier.route.ring.edge_of(str(c)) != "edge-1" for c in dead_group)


def test_a_round_that_needs_every_update_is_retried_with_a_fresh_cohort(data) -> None:
    cfg = load_config(None, {"rounds": 2, "sampling.per_round": 20, "hierarchy.edges": 4,
                             "hierarchy.failures": "edge-2@2", "sim.round_rules": "deploy",
                             "deploy.over_selection": 1.0, "deploy.min_fraction": 1.0})
    exp = Experiment(cfg, data)
    seen = _Abandoned()
    result = exp.run(observers=[seen])
    assert len(seen.reasons) == 1 and "fewer than the round's minimum" in seen.reasons[0]
    r2 = result.records[2]
    assert r2.committed and r2.attempt == 1 and r2.accepted == 20
    assert exp.pool.failed == ["edge-2"]


def test_a_dead_edge_upload_arriving_after_its_devices_were_served_is_refused(data) -> None:
    """The dead edge's devices check in with their new edge within the same task; the old
    edge comes back and uploads too: the global refuses it as a duplicate."""
    cfg = load_config(None, {"rounds": 1, "sampling.per_round": 12, "hierarchy.edges": 3})
    exp = Experiment(cfg, data)
    tier = exp.pool
    coordinator = Coordinator(FedAvg(), tier.num_clients, UniformSampler(12), seed=0,
                              policy=SyncPolicy(), steps=1)
    base = exp.initial_params.astype(np.float32)
    sent = [c for c in coordinator.start(FedAvg().init(base), 0.0) if isinstance(c, SendTask)]
    task, cohort = sent[0].task, sent[0].client_ids
    groups = tier.route.groups(cohort)
    zombie = tier.edges["edge-0"].answer(task, groups["edge-0"], tier.below)
    tier.route.ring.fail("edge-0")
    regroup = tier.route.groups(groups["edge-0"])  # their next check-in: other edges
    assert "edge-0" not in regroup
    live = [(n, g) for n, g in groups.items() if n != "edge-0"]
    assert live
    out = []
    for name, ids in [*live[:-1], *regroup.items()]:
        upload = tier.edges[name].answer(task, ids, tier.below)
        out += coordinator.handle(UpdatesArrived(task.task_id, upload, 1.0))
    out += coordinator.handle(UpdatesArrived(task.task_id, zombie, 2.0))  # it came back
    last, ids = live[-1]
    out += coordinator.handle(UpdatesArrived(task.task_id,
                                             tier.edges[last].answer(task, ids, tier.below),
                                             3.0))
    refused = [c for c in out if isinstance(c, UpdateRefused)]
    commits = [c for c in out if isinstance(c, CommitVersion)]
    assert [r.reason for r in refused] == ["duplicate"]
    assert len(commits) == 1 and commits[0].record.accepted == len(cohort)
    assert commits[0].record.rejected == {"duplicate": 1}
    s, w = _plain_mean(tier.below, base, task.round, cohort)
    assert np.abs(commits[0].state.params - (base + s / w)).max() <= 1e-6
