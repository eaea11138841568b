"""Federated evaluation as a task kind of the coordinator: evaluation-only tasks to a
cohort, example-weighted metrics, broken down by segment; the simulator's clients answer on
their own held-out data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shoal.coordinator import Coordinator
from shoal.data import Dataset
from shoal.errors import ConfigError, ProtocolError
from shoal.events import (CancelTask, ClientsFailed, EvalDone, EvalReported, EvalReports,
                          SendEval, SendTask, TaskEnded, Tick, UpdateRefused, WakeAt)
from shoal.frameworks.torch import FlatModule
from shoal.sampling import UniformSampler
from shoal.sim.evaluation import LocalEvaluator, holdout_split
from shoal.strategy import FedAvg, ServerState


def of(cmds, kind):
    return [c for c in cmds if isinstance(c, kind)]


def reports(ids, n, loss, acc, segs=()):
    return EvalReports(np.array(ids, np.int64), np.array(n, np.int64),
                       {"loss": np.array(loss, float), "accuracy": np.array(acc, float)},
                       tuple(segs))


def test_an_evaluation_task_aggregates_weighted_metrics_by_segment_without_training():
    coord = Coordinator(FedAvg(), 10, UniformSampler(3), seed=0)
    params = np.zeros(4, np.float32)
    cmds = coord.evaluate(params, 7, 0.0, clients=np.array([5, 1, 3, 8]), purpose="check")
    (send,) = of(cmds, SendEval)
    assert send.client_ids.tolist() == [1, 3, 5, 8] and send.task.version == 7
    assert not of(cmds, SendTask)  # nothing trains
    first = coord.handle(EvalReported(send.task.task_id,
                                      reports([1, 3], [10, 30], [1.0, 2.0], [0.5, 1.0],
                                              ["phone", "tablet"]), 1.0))
    assert first == []  # still waiting for 5 and 8
    cmds = coord.handle(EvalReported(send.task.task_id,
                                     reports([5, 8], [20, 40], [4.0, 0.5], [0.0, 0.75],
                                             ["phone", "tablet"]), 2.0))
    (done,) = of(cmds, EvalDone)
    r = done.result
    # hand-computed example-weighted means
    assert r.metrics["loss"] == pytest.approx((10 + 60 + 80 + 20) / 100)
    assert r.metrics["accuracy"] == pytest.approx((5 + 30 + 0 + 30) / 100)
    assert r.by_segment["phone"]["loss"] == pytest.approx((10 + 80) / 30)
    assert r.by_segment["tablet"]["accuracy"] == pytest.approx((30 + 30) / 70)
    assert r.by_segment["tablet"]["clients"] == 2 and r.by_segment["phone"]["examples"] == 30
    assert (r.clients, r.examples, r.missing, r.purpose, r.closed_by) == (
        4, 100, 0, "check", "complete")
    assert r.values["loss"].tolist() == [1.0, 2.0, 4.0, 0.5]


def test_strangers_duplicates_and_malformed_reports_are_refused_and_change_nothing():
    coord = Coordinator(FedAvg(), 10, UniformSampler(3), seed=0)
    (send,) = of(coord.evaluate(np.zeros(2, np.float32), 1, 0.0, clients=np.array([1, 2])),
                 SendEval)
    tid = send.task.task_id
    cmds = coord.handle(EvalReported(tid, reports([1, 9], [5, 5], [1.0, 9.0], [1, 0]), 0.0))
    (ref,) = of(cmds, UpdateRefused)
    assert ref.client_ids == (9,) and ref.reason == "not_selected"
    cmds = coord.handle(EvalReported(tid, reports([1], [5], [7.0], [0]), 0.0))
    assert of(cmds, UpdateRefused)[0].reason == "duplicate"
    bad = EvalReports(np.array([2]), np.array([5]), {"loss": np.array([1.0, 2.0])})
    assert of(coord.handle(EvalReported(tid, bad, 0.0)), UpdateRefused)[0].reason == \
        "malformed"
    cmds = coord.handle(EvalReported(99, reports([1], [1], [1.0], [1.0]), 0.0))
    assert of(cmds, UpdateRefused)[0].reason == "unknown_task"
    (done,) = of(coord.handle(EvalReported(tid, reports([2], [15], [3.0], [1.0]), 0.0)),
                 EvalDone)
    assert done.result.metrics["loss"] == pytest.approx((5 + 45) / 20)
    assert dict(done.result.refused) == {"not_selected": 1, "duplicate": 1, "malformed": 1}


def test_failures_and_deadlines_close_an_evaluation_with_what_was_reported():
    coord = Coordinator(FedAvg(), 10, UniformSampler(4), seed=3)
    cmds = coord.evaluate(np.zeros(2, np.float32), 1, 0.0, count=4, deadline=10.0)
    (send,) = of(cmds, SendEval)
    assert of(cmds, WakeAt)[0].at == 10.0 and len(send.client_ids) == 4
    ids = send.client_ids.tolist()
    tid = send.task.task_id
    coord.handle(ClientsFailed(tid, (ids[0],), "offline", 1.0))
    coord.handle(EvalReported(tid, reports([ids[1]], [4], [2.0], [0.5]), 2.0))
    assert coord.handle(Tick(5.0)) == []
    cmds = coord.handle(Tick(10.0))
    (done,) = of(cmds, EvalDone)
    assert of(cmds, CancelTask)[0].task_id == tid
    assert (done.result.clients, done.result.missing, done.result.closed_by) == (
        1, 3, "deadline")
    # a second task ended by its carrier; an event after closing is ignored
    (send2,) = of(coord.evaluate(np.zeros(2, np.float32), 1, 11.0, count=2), SendEval)
    assert send2.task.task_id == tid + 1
    (done2,) = of(coord.handle(TaskEnded(send2.task.task_id, 12.0)), EvalDone)
    assert done2.result.clients == 0 and math.isnan(done2.result.metrics.get("loss", math.nan))
    assert coord.handle(TaskEnded(send2.task.task_id, 13.0)) == []


def test_evaluation_runs_beside_training_and_leaves_the_round_untouched():
    coord = Coordinator(FedAvg(), 6, UniformSampler(2), seed=0, steps=1)
    cmds = coord.start(ServerState(np.zeros(3, np.float32)), 0.0)
    (train,) = of(cmds, SendTask)
    (ev,) = of(coord.evaluate(np.ones(3, np.float32), 0, 0.0, clients=np.arange(6)), SendEval)
    assert ev.task.task_id != train.task.task_id
    out = coord.handle(EvalReported(ev.task.task_id,
                                    reports(range(6), [1] * 6, [1.0] * 6, [1.0] * 6), 0.0))
    assert of(out, EvalDone) and coord.version == 0 and coord.accepted == 0
    with pytest.raises(ConfigError):
        coord.evaluate(np.ones(3, np.float32), 0, 0.0, clients=np.array([6]))
    with pytest.raises(ProtocolError):
        Coordinator(FedAvg(), 3, UniformSampler(1), seed=0).handle(Tick(1.0))


def test_simulated_clients_evaluate_on_their_own_held_out_data():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2))
    flat = FlatModule(module)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3)).astype(np.float32)
    y = rng.integers(0, 2, 40).astype(np.int64)
    data = Dataset(x, y, 2, "toy")
    parts = [np.arange(0, 10), np.arange(10, 30), np.arange(30, 40)]
    train, held = holdout_split(parts, 0.3, seed=1)
    for p, tr, h in zip(parts, train, held):
        assert sorted(np.concatenate([tr, h]).tolist()) == p.tolist()
        assert len(h) == round(len(p) * 0.3)
    ev = LocalEvaluator(flat, data, held, segment=lambda ids: [f"s{c % 2}" for c in ids],
                        label_histogram=True)
    params = flat.get()
    got = ev.reports(params, np.array([0, 2]))
    # oracle: plain torch on each client's held-out rows
    for row, c in enumerate([0, 2]):
        idx = torch.from_numpy(held[c])
        logits = module(torch.from_numpy(x)[idx])
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)[idx]).item()
        assert got.metrics["loss"][row] == pytest.approx(loss, rel=1e-5)
        assert got.metrics["label_1"][row] == int(y[held[c]].sum())
    assert got.segments == ("s0", "s0") and got.num_examples.tolist() == [3, 3]
