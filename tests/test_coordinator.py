"""The event-driven coordinator: sync and buffered policies, versions, the pipeline's
validation, driven by scripted events (no network, no sleeping) and through drive()."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.clock import SimClock
from shoal.coordinator import Coordinator
from shoal.errors import ConfigError
from shoal.events import (AbortRound, CancelTask, ClientUpdate, CommitVersion, Finished,
                          SendTask, TaskEnded, Tick, UpdateBatch, UpdateRefused, UpdatesArrived,
                          WakeAt)
from shoal.pipeline import Pipeline, Validation
from shoal.policy import BufferedPolicy, SyncPolicy, staleness_weight
from shoal.runner import ClientPool, drive, run_round
from shoal.sampling import UniformSampler
from shoal.strategy import FedAvg, FedProx

DIM = 3


def of(cmds, kind):
    return [c for c in cmds if isinstance(c, kind)]


def update(cid, value, n=1, base=None):
    return ClientUpdate(cid, np.full(DIM, value, np.float32), n, {"loss": 1.0}, base)


def test_sync_round_commits_the_example_weighted_mean_and_names_its_version():
    coord = Coordinator(FedAvg(), 10, UniformSampler(3), seed=1, steps=2)
    (send,) = of(coord.start(FedAvg().init(np.zeros(DIM, np.float32)), 0.0), SendTask)
    assert send.task.version == 0 and send.task.round == 1 and len(send.client_ids) == 3
    a, b, c = (int(x) for x in send.client_ids)
    coord.handle(UpdatesArrived(send.task.task_id, update(a, 1.0, 1), 1.0))
    coord.handle(UpdatesArrived(send.task.task_id, update(b, 2.0, 2), 2.0))
    out = coord.handle(UpdatesArrived(send.task.task_id, update(c, 4.0, 1), 3.0))
    (commit,) = of(out, CommitVersion)
    np.testing.assert_allclose(commit.state.params, (1 + 4 + 4) / 4)
    rec = commit.record
    assert (rec.round, rec.version, rec.accepted, rec.examples) == (1, 1, 3, 4)
    assert rec.closed_by == "all_reported" and rec.seconds == 3.0
    (nxt,) = of(out, SendTask)  # the next round trains the new version
    assert nxt.task.version == 1 and nxt.task.round == 2


def test_sync_target_over_selection_cancels_stragglers_and_refuses_them_as_late():
    policy = SyncPolicy(target=2, over_selection=1.5)
    coord = Coordinator(FedAvg(), 10, UniformSampler(2), seed=0, policy=policy, steps=1)
    (send,) = of(coord.start(FedAvg().init(np.zeros(DIM, np.float32)), 0.0), SendTask)
    assert len(send.client_ids) == 3  # ceil(2 x 1.5)
    ids = [int(x) for x in send.client_ids]
    coord.handle(UpdatesArrived(send.task.task_id, update(ids[0], 1.0), 1.0))
    out = coord.handle(UpdatesArrived(send.task.task_id, update(ids[1], 3.0), 1.5))
    assert of(out, CancelTask) and of(out, CommitVersion) and of(out, Finished)
    np.testing.assert_allclose(of(out, CommitVersion)[0].state.params, 2.0)
    assert of(out, CommitVersion)[0].record.closed_by == "target_reached"


def test_sync_deadline_with_too_few_updates_abandons_and_retries_with_a_fresh_cohort():
    policy = SyncPolicy(target=4, deadline_s=10.0, min_fraction=0.75, max_attempts=2)
    coord = Coordinator(FedAvg(), 50, UniformSampler(4), seed=3, policy=policy, steps=1)
    start = coord.start(FedAvg().init(np.zeros(DIM, np.float32)), 0.0)
    (send,) = of(start, SendTask)
    assert of(start, WakeAt)[0].at == 10.0
    coord.handle(UpdatesArrived(send.task.task_id, update(int(send.client_ids[0]), 1.0), 2.0))
    out = coord.handle(Tick(10.0))
    (abort,) = of(out, AbortRound)
    assert abort.retry and abort.record.rejected["timed_out"] == 3
    assert not abort.record.committed and abort.record.closed_by == "deadline"
    (retry,) = of(out, SendTask)
    assert not np.array_equal(retry.client_ids, send.client_ids)  # attempt 1's cohort
    assert np.array_equal(retry.client_ids, coord.cohort(1, 1, 4))
    # the first cohort's late update is refused and changes nothing
    coord.handle(UpdatesArrived(send.task.task_id, update(int(send.client_ids[1]), 9.0), 11))
    out = coord.handle(Tick(20.0))
    assert of(out, Finished) and "could not commit" in of(out, Finished)[0].reason
    assert coord.state.version == 0


@pytest.mark.parametrize("bad, reason", [
    (lambda c: ClientUpdate(c, np.full(DIM, np.nan, np.float32), 1), "non_finite"),
    (lambda c: ClientUpdate(c, np.zeros(DIM + 1, np.float32), 1), "wrong_shape"),
    (lambda c: ClientUpdate(c, np.zeros(DIM, np.int32), 1), "wrong_dtype"),
    (lambda c: ClientUpdate(c, np.full(DIM, 100.0, np.float32), 1), "norm_too_large"),
    (lambda c: ClientUpdate(c, np.zeros(DIM, np.float32), 10**9), "bad_weight"),
    (lambda c: ClientUpdate(c, np.zeros(DIM, np.float32), 1, base_version=7), "wrong_version"),
    (lambda c: ClientUpdate(c + 1000, np.zeros(DIM, np.float32), 1), "not_selected"),
])
def test_a_bad_update_is_refused_with_its_reason_and_changes_nothing(bad, reason):
    pipeline = Pipeline(validation=Validation(max_norm=10.0, max_examples=1000))
    coord = Coordinator(FedAvg(), 10, UniformSampler(2), seed=0, pipeline=pipeline, steps=1)
    (send,) = of(coord.start(FedAvg().init(np.zeros(DIM, np.float32)), 0.0), SendTask)
    a, b = (int(x) for x in send.client_ids)
    coord.handle(UpdatesArrived(send.task.task_id, update(a, 1.0), 1.0))
    out = coord.handle(UpdatesArrived(send.task.task_id, bad(b), 2.0))
    # a refused update changes nothing: its client still holds the task, and may send a
    # corrected update (here: for a client id that was never asked, the asked one does)
    assert not of(out, CommitVersion)
    (refused,) = of(out, UpdateRefused)
    assert refused.reason == reason and refused.detail
    assert refused.client_ids == ((b + 1000,) if reason == "not_selected" else (b,))
    if reason in ("not_selected", "wrong_version"):
        out = coord.handle(UpdatesArrived(send.task.task_id, update(b, 3.0), 3.0))
    else:  # the carrier ends the task: b never sent a good update
        out = coord.handle(TaskEnded(send.task.task_id, 3.0))
    (commit,) = of(out, CommitVersion)
    assert commit.record.rejected == {reason: 1}
    # only the good updates are in the mean
    expect = 1.0 if reason not in ("not_selected", "wrong_version") else 2.0
    np.testing.assert_allclose(commit.state.params, expect)


def test_a_replayed_update_is_refused_as_duplicate():
    coord = Coordinator(FedAvg(), 10, UniformSampler(2), seed=0, steps=1,
                        policy=SyncPolicy(target=2))
    (send,) = of(coord.start(FedAvg().init(np.zeros(DIM, np.float32)), 0.0), SendTask)
    a = int(send.client_ids[0])
    coord.handle(UpdatesArrived(send.task.task_id, update(a, 1.0), 1.0))
    coord.handle(UpdatesArrived(send.task.task_id, update(a, 1.0), 1.1))
    assert coord._tally.rejected == {"duplicate": 1} and coord.accepted == 1


def test_staleness_weights_equal_hand_computed_values():
    # the paper's raw weights 1 / (1 + s)^a
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == 0.5  # 1 / sqrt(4)
    assert math.isclose(staleness_weight(1, 1.0), 0.5)
    assert math.isclose(staleness_weight(2, 2.0), 1 / 9)
    # normalised at a reference staleness r: ((1 + r) / (1 + s))^a
    assert staleness_weight(1, 0.5, 1.0) == 1.0
    assert math.isclose(staleness_weight(0, 0.5, 1.0), math.sqrt(2))
    assert math.isclose(staleness_weight(3, 0.5, 1.0), math.sqrt(0.5))
    assert math.isclose(staleness_weight(4, 1.0, 2.0), 3 / 5)
    assert BufferedPolicy().staleness_weight(3) == staleness_weight(3, 0.5, 1.0)
    with pytest.raises(ConfigError, match="round.staleness_reference"):
        BufferedPolicy(staleness_reference=-1.0)


def test_buffered_policy_weights_stale_updates_and_refuses_past_max_staleness():
    policy = BufferedPolicy(concurrency=3, buffer_size=1, staleness_exponent=1.0,
                            staleness_reference=0.0, max_staleness=1)
    coord = Coordinator(FedAvg(), 10, UniformSampler(1), seed=0, policy=policy, steps=5)
    sends = of(coord.start(FedAvg().init(np.zeros(DIM, np.float32)), 0.0), SendTask)
    assert len(sends) == 3 and {s.task.version for s in sends} == {0}
    first, second, third = sends
    # version 0 -> 1 with a fresh update (weight 1)
    out = coord.handle(UpdatesArrived(first.task.task_id,
                                      update(int(first.client_ids[0]), 2.0), 1.0))
    assert coord.version == 1 and np.allclose(coord.state.params, 2.0)
    refill = of(out, SendTask)
    assert len(refill) == 1 and refill[0].task.version == 1
    # staleness 1: scaled by 1 / (1 + 1) = 0.5
    coord.handle(UpdatesArrived(second.task.task_id,
                                update(int(second.client_ids[0]), 2.0), 2.0))
    assert coord.version == 2 and np.allclose(coord.state.params, 3.0)
    before = coord.state.params.copy()
    # staleness 2 > max_staleness 1: refused with its reason, nothing changes
    coord.handle(UpdatesArrived(third.task.task_id, update(int(third.client_ids[0]), 9.0), 3))
    assert coord._tally.rejected["stale"] == 1
    assert coord.version == 2 and np.array_equal(coord.state.params, before)


class _Pool:
    """In-memory clients: client c's delta is c + base version, weight c + 1."""

    def __init__(self, n: int) -> None:
        self.num_clients = n
        self.tasks = []

    def train(self, task, ids):
        self.tasks.append((task, ids))
        yield UpdateBatch(ids, np.repeat((ids + task.version)[:, None], DIM, 1)
                          .astype(np.float32), ids + 1, {"loss": np.ones(len(ids))},
                          task.version)


def test_the_pool_boundary_runs_a_whole_sync_training():
    pool = _Pool(20)
    assert isinstance(pool, ClientPool)
    commits = []
    coord = Coordinator(FedProx(mu=0.25), 20, UniformSampler(4), seed=2, steps=3)
    reason = drive(coord, pool, FedProx(mu=0.25).init(np.zeros(DIM, np.float32)), SimClock(),
                   on_commit=lambda st, rec: commits.append((st, rec)))
    assert reason == "done" and [st.version for st, _ in commits] == [1, 2, 3]
    assert all(t.settings == {"mu": 0.25} for t, _ in pool.tasks)
    state = FedProx(mu=0.25).init(np.zeros(DIM, np.float32))
    for (task, ids), (st, _) in zip(pool.tasks, commits):  # hand-computed weighted means
        w = ids + 1
        state_params = state.params + (w @ (ids + task.version)) / w.sum()
        np.testing.assert_allclose(st.params, state_params, rtol=1e-6)
        state = st


def test_run_round_is_seeded_and_reproducible():
    a = run_round(FedAvg(), _Pool(100), UniformSampler(10), FedAvg().init(np.zeros(DIM,
                  np.float32)), seed=3)
    b = run_round(FedAvg(), _Pool(100), UniformSampler(10), FedAvg().init(np.zeros(DIM,
                  np.float32)), seed=3)
    c = run_round(FedAvg(), _Pool(100), UniformSampler(10), FedAvg().init(np.zeros(DIM,
                  np.float32)), seed=4)
    assert np.array_equal(a[0].params, b[0].params)
    assert not np.array_equal(a[0].params, c[0].params)


def test_buffered_aggregation_with_a_time_model_delivers_in_completion_order():
    """Slower clients finish later on the simulated clock; versions advance while they
    train, so their updates arrive stale."""
    pool = _Pool(30)
    policy = BufferedPolicy(concurrency=4, buffer_size=2, max_staleness=5)
    coord = Coordinator(FedAvg(), 30, UniformSampler(1), seed=0, policy=policy, steps=6)
    records = []
    clock = SimClock()
    drive(coord, pool, FedAvg().init(np.zeros(DIM, np.float32)), clock,
          task_seconds=lambda task, ids, n: 1.0 + ids * 0.1,
          on_commit=lambda st, rec: records.append(rec))
    assert [r.version for r in records] == [1, 2, 3, 4, 5, 6]
    assert clock.now() > 0 and all(r.accepted == 2 for r in records)
    assert max(r.staleness_max for r in records) >= 1


@settings(max_examples=300, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([np.float16, np.float32, np.float64]))
def test_validation_refuses_exactly_the_rows_with_a_non_finite_value(data, dtype):
    from shoal.pipeline import validate_rows

    k, d = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 40))
    big = float(np.finfo(dtype).max)
    values = st.sampled_from([0.0, 1.5, -2.0, big, -big, np.inf, -np.inf, np.nan])
    rows = np.array(data.draw(st.lists(st.lists(values, min_size=d, max_size=d),
                                       min_size=k, max_size=k)), dtype=dtype)
    keep, refused = validate_rows(rows, np.ones(k, np.int64), d, Validation())
    bad = ~np.isfinite(rows).all(axis=1)  # the oracle: element by element
    np.testing.assert_array_equal(keep, ~bad)
    assert {r.reason for r in refused} == ({"non_finite"} if bad.any() else set())
