"""Hierarchical FL in simulation: edges (and regions) are coordinators downstream and one
client upstream (shoal.hierarchy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hierarchy_harness import TrainedTasks

from shoal.build import load_data
from shoal.cli import main
from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.events import TrainTask
from shoal.experiment import Experiment
from shoal.hierarchy.ring import Ring
from shoal.uplink import raw_wire_size

ROUNDS = 4


@pytest.fixture(scope="module")
def data():
    return load_data(load_config())


def _run(data, **overrides):
    cfg = load_config(None, {"rounds": ROUNDS, **overrides})
    return Experiment(cfg, data).run()


def _edges_hit(cohort: np.ndarray, edges: int) -> int:
    ring = Ring([f"edge-{i}" for i in range(edges)])
    return len({ring.assign(str(int(c))) for c in cohort})


def test_flat_two_tier_and_three_tier_commit_the_same_model(data) -> None:
    flat = _run(data)
    two = _run(data, **{"hierarchy.edges": 4})
    three = _run(data, **{"hierarchy.edges": 6, "hierarchy.regions": 2})
    for run in (two, three):
        assert run.state.version == ROUNDS
        assert np.abs(run.state.params - flat.state.params).max() <= 1e-6
        assert [r.accepted for r in run.records] == [r.accepted for r in flat.records]
    assert two.summary()["final_accuracy"] == pytest.approx(flat.summary()["final_accuracy"],
                                                            abs=2e-4)


def test_global_ingress_is_one_upload_per_edge_not_per_device(data) -> None:
    cfg = load_config(None, {"rounds": ROUNDS})
    exp = Experiment(cfg, data)
    flat = exp.run()
    edges = 4
    two = _run(data, **{"hierarchy.edges": edges})
    size = raw_wire_size(flat.state.params.size)  # a float32 vector on the wire
    for version in range(1, ROUNDS + 1):
        cohort = exp.coordinator.cohort(version)
        f, t = flat.records[version], two.records[version]
        assert f.bytes_up == len(cohort) * size  # K uploads
        assert t.bytes_up == _edges_hit(cohort, edges) * size  # E uploads
        assert t.bytes_up < f.bytes_up
        # the devices' uploads still happened, into the edges
        assert t.privacy["edge_ingress_bytes"] == f.bytes_up


def test_hierfavg_edges_average_their_devices_several_times(data) -> None:
    """Oracle: each edge's two rounds of FedAvg over its group, computed here from the
    devices' own updates, then the groups' model deltas weighted by their examples."""
    cfg = load_config(None, {"rounds": 1})
    exp = Experiment(cfg, data)
    base = exp.initial_params.astype(np.float32)
    cohort = exp.coordinator.cohort(1)
    ring = Ring([f"edge-{i}" for i in range(3)])
    groups: dict[str, list[int]] = {}
    for c in cohort.tolist():
        groups.setdefault(ring.assign(str(c)), []).append(c)
    total = np.zeros(base.size)
    weight = 0.0
    for ids in groups.values():
        params, moved = base, np.zeros(base.size)
        for j in (1, 2):  # edge round j of global round 1 is keyed (1 - 1) x 2 + j
            task = TrainTask(task_id=j, version=j - 1, params=params, round=j)
            s, w = np.zeros(base.size), 0.0
            for batch in exp.pool.train(task, np.array(sorted(ids), np.int64)):
                n = np.asarray(batch.num_examples, np.float64)
                s += n @ np.asarray(batch.deltas, np.float64)
                w += n.sum()
            params = (params + s / w).astype(np.float32)
            moved += s / w
        total += w * moved
        weight += w
    expected = (base + total / weight).astype(np.float32)
    got = Experiment(load_config(None, {"rounds": 1, "hierarchy.edges": 3,
                                        "hierarchy.edge_rounds": 2}), data).run()
    assert np.abs(got.state.params - expected).max() <= 1e-6
    one = Experiment(load_config(None, {"rounds": 1, "hierarchy.edges": 3}), data).run()
    assert np.abs(one.state.params - expected).max() > 1e-4  # two edge rounds do differ


def test_shoal_run_takes_hierarchy_from_set(tmp_path, capsys) -> None:
    code = main(["run", "--rounds", "2", "--set", "hierarchy.edges=10", "--json",
                 "--out", str(tmp_path), "--set", "output.name=\"h\""])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rounds"] == 2 and summary["client_updates"] == 20
    assert summary["bytes_up_per_round"] < 10 * 796_918  # fewer uploads than devices


@pytest.mark.parametrize("overrides, key", [
    ({"sim.time_model": "lognormal"}, "hierarchy.edges"),
    ({"robust.rule": "median"}, "robust.rule"),
    ({"hierarchy.failures": "edge-99@1"}, "hierarchy.failures"),
    ({"hierarchy.failures": "edge-1"}, "hierarchy.failures"),
    ({"hierarchy.assignment": "region"}, "hierarchy.assignment"),
    ({"privacy.placement": "central", "privacy.clip_norm": 1.0,
      "hierarchy.edge_rounds": 2}, "hierarchy.edge_rounds"),
    ({"compression.download": "delta", "hierarchy.edge_rounds": 2},
     "compression.download"),
])
def test_combinations_hierarchy_cannot_run_are_refused(data, overrides, key) -> None:
    cfg = load_config(None, {"rounds": 1, "hierarchy.edges": 4, **overrides})
    with pytest.raises(ConfigError) as err:
        Experiment(cfg, data)
    assert err.value.key == key


def test_buffered_global_over_edges_measures_staleness_against_the_global_version(data
                                                                               ) -> None:
    """FedBuff at the global tier: each task's device answers through its edge (one edge
    round: the edge trains the global's model under the global's version); the upload names
    the global version it trained from, so staleness, its weight and the max_staleness
    refusal are the flat run's."""
    buffered = {"rounds": 4, "round.policy": "buffered", "round.concurrency": 10,
                "round.buffer_size": 5, "round.max_staleness": 1}
    flat = _run(data, **buffered)
    two = _run(data, **buffered, **{"hierarchy.edges": 4})
    assert np.abs(flat.state.params - two.state.params).max() <= 1e-6
    assert max(r.staleness_max for r in two.records) == 1
    assert sum(r.rejected.get("stale", 0) for r in two.records) > 0
    for f, t in zip(flat.records, two.records):
        assert (t.staleness_max, t.staleness_mean, t.rejected) == \
            (f.staleness_max, f.staleness_mean, f.rejected)


def test_buffered_edges_make_their_own_steps_with_edge_staleness(data) -> None:
    cfg = load_config(None, {"rounds": 2, "sampling.per_round": 24, "hierarchy.edges": 3,
                             "hierarchy.edge_policy": "buffered", "hierarchy.edge_rounds": 2,
                             "round.concurrency": 4, "round.buffer_size": 3})
    exp = Experiment(cfg, data)
    result = exp.run()
    assert result.state.version == 2
    groups = exp.pool.route.groups(exp.coordinator.cohort(2))
    stale = 0
    for name, ids in groups.items():
        records = exp.pool.edges[name].records  # the edge's steps in the last global round
        assert [r.version for r in records] == [3, 4]  # global round 2, two steps each
        assert all(r.accepted == min(3, len(ids)) for r in records)
        assert all(set(r.rejected) <= {"stale", "cancelled"} for r in records)
        stale += sum(r.staleness_max for r in records)
    assert stale > 0  # devices asked at edge step 0 reported after step 1
    assert all(r.staleness_max == 0 for r in result.records)  # the global is synchronous
    # each upload counts the updates of the edge's last step, and answers for its group
    assert result.records[2].accepted == sum(min(3, len(ids)) for ids in groups.values())
    assert not result.records[2].rejected
    assert result.summary()["final_accuracy"] > result.records[0].eval["accuracy"]


def test_with_regions_devices_train_edge_rounds_times_a_global_round(data) -> None:
    """HierFAVG's kappa2 is the edges': a region only folds its edges' uploads, so each
    device trains edge_rounds times per global round (keys 1 and 2 of round 1), not
    edge_rounds^2."""
    cfg = load_config(None, {"rounds": 1, "hierarchy.edges": 6, "hierarchy.regions": 2,
                             "hierarchy.edge_rounds": 2})
    exp = Experiment(cfg, data)
    devices = TrainedTasks(exp.pool.below.below)
    exp.pool.below.below = devices
    cohort = exp.coordinator.cohort(1).tolist()
    assert exp.run().state.version == 1
    assert devices.count() == {(key, c): 1 for key in (1, 2) for c in cohort}


def test_clients_of_a_secure_group_too_small_to_sum_never_train(data) -> None:
    """An edge never asks a secure group of fewer than three clients (its sum would reveal
    them); the tier's shared first round must not train them either."""
    cfg = load_config(None, {"rounds": 1, "sampling.per_round": 9, "hierarchy.edges": 4,
                             "secure_aggregation.enabled": True})
    exp = Experiment(cfg, data)
    devices = TrainedTasks(exp.pool.below)
    exp.pool.below = devices
    groups = exp.pool.route.groups(exp.coordinator.cohort(1))
    small = {c for ids in groups.values() if len(ids) < 3 for c in ids.tolist()}
    assert small  # nine clients over four edges: some group has fewer than three
    exp.run()
    trained = {c for _, c in devices.count()}
    assert trained == {c for ids in groups.values() for c in ids.tolist()} - small
