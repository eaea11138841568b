"""Round engine behaviour, driven through the ClientPool boundary."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.coordinator import (ClientPool, ClientUpdate, Coordinator, TrainTask,
                               UniformSampler, UpdateBatch)
from shoal.strategy import FedAvg, FedProx


class ScriptedPool:
    """Clients whose update is a fixed function of (client id, round); optionally bad."""

    def __init__(self, num_clients: int, dim: int, bad: dict[int, str] | None = None,
                 batched: bool = False) -> None:
        self._n = num_clients
        self.dim = dim
        self.bad = bad or {}
        self.batched = batched
        self.tasks: list[tuple[TrainTask, np.ndarray]] = []

    @property
    def num_clients(self) -> int:
        return self._n

    def update_of(self, c: int) -> np.ndarray:
        return np.full(self.dim, float(c), dtype=np.float32)

    def train(self, task, client_ids):
        self.tasks.append((task, client_ids))
        ups = []
        for c in client_ids:
            delta = self.update_of(int(c))
            kind = self.bad.get(int(c))
            if kind == "nan":
                delta = delta.copy()
                delta[0] = np.nan
            elif kind == "shape":
                delta = np.zeros(self.dim + 1, np.float32)
            ups.append(ClientUpdate(int(c), delta, num_examples=int(c) + 1,
                                    metrics={"loss": 1.0}))
        if self.batched:
            yield UpdateBatch(np.array([u.client_id for u in ups]),
                              np.stack([u.delta for u in ups]),
                              np.array([u.num_examples for u in ups]),
                              {"loss": np.ones(len(ups))})
        else:
            yield from ups


def test_pool_protocol_is_satisfied():
    assert isinstance(ScriptedPool(3, 2), ClientPool)


def test_round_is_weighted_fedavg_of_what_the_pool_returned():
    pool = ScriptedPool(10, 3)
    coord = Coordinator(FedAvg(), pool, UniformSampler(4), seed=1,
                        evaluate=lambda p: {"accuracy": float(p.sum())})
    state = FedAvg().init(np.zeros(3, np.float32))
    new, rec = coord.run_round(state)
    cohort = pool.tasks[0][1]
    w = cohort + 1.0
    expected = (w * cohort).sum() / w.sum()
    np.testing.assert_allclose(new.params, expected, rtol=1e-6)
    assert rec.round == 1 and rec.accepted == 4 and rec.committed
    assert rec.examples == int(w.sum())
    assert rec.eval["accuracy"] == pytest.approx(3 * expected, rel=1e-6)
    assert pool.tasks[0][0].round == 1


def test_batched_and_single_updates_aggregate_identically():
    results = []
    for batched in (False, True):
        pool = ScriptedPool(10, 3, batched=batched)
        coord = Coordinator(FedAvg(), pool, UniformSampler(5), seed=4)
        results.append(coord.run_round(FedAvg().init(np.zeros(3, np.float32)))[0].params)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


def test_cohorts_are_determined_by_seed_and_round():
    a = Coordinator(FedAvg(), ScriptedPool(100, 1), UniformSampler(10), seed=3)
    b = Coordinator(FedAvg(), ScriptedPool(100, 1), UniformSampler(10), seed=3)
    c = Coordinator(FedAvg(), ScriptedPool(100, 1), UniformSampler(10), seed=4)
    assert np.array_equal(a.cohort(7), b.cohort(7))  # a resumed run picks the same clients
    assert not np.array_equal(a.cohort(7), a.cohort(8))
    assert not np.array_equal(a.cohort(7), c.cohort(7))
    assert not np.array_equal(a.cohort(7), a.cohort(7, attempt=1))
    cohort = a.cohort(7)
    assert len(set(cohort.tolist())) == 10 and cohort.max() < 100


@pytest.mark.parametrize("kind, reason", [("nan", "non_finite"), ("shape", "wrong_shape")])
def test_bad_update_is_rejected_and_leaves_the_aggregate_intact(kind, reason):
    clean = ScriptedPool(10, 3)
    coord = Coordinator(FedAvg(), clean, UniformSampler(5), seed=2)
    cohort = coord.cohort(1)
    victim = int(cohort[0])
    dirty = ScriptedPool(10, 3, bad={victim: kind})
    state = FedAvg().init(np.zeros(3, np.float32))
    new, rec = Coordinator(FedAvg(), dirty, UniformSampler(5), seed=2).run_round(state)
    rest = cohort[1:]
    w = rest + 1.0
    np.testing.assert_allclose(new.params, (w * rest).sum() / w.sum(), rtol=1e-6)
    assert rec.accepted == 4 and rec.rejected == {reason: 1}
    assert np.array_equal(state.params, np.zeros(3))  # the old state is untouched


def test_a_bad_row_in_a_batch_rejects_that_batch_only_and_changes_nothing():
    pool = ScriptedPool(10, 3, bad={c: "nan" for c in range(10)}, batched=True)
    state = FedAvg().init(np.ones(3, np.float32))
    new, rec = Coordinator(FedAvg(), pool, UniformSampler(3), seed=0).run_round(state)
    assert not rec.committed and rec.accepted == 0 and rec.rejected == {"non_finite": 1}
    assert new is state


def test_clients_without_data_are_skipped_not_errors():
    class EmptyPool(ScriptedPool):
        def train(self, task, client_ids):
            for c in client_ids:
                yield ClientUpdate(int(c), np.zeros(self.dim, np.float32), 0)

    state = FedAvg().init(np.ones(2, np.float32))
    new, rec = Coordinator(FedAvg(), EmptyPool(5, 2), UniformSampler(2), seed=0).run_round(
        state)
    assert not rec.committed and rec.rejected == {"no_data": 2} and new is state


def test_strategy_settings_reach_the_clients():
    pool = ScriptedPool(5, 2)
    Coordinator(FedProx(mu=0.25), pool, UniformSampler(2), seed=0).run_round(
        FedProx(mu=0.25).init(np.zeros(2, np.float32)))
    assert pool.tasks[0][0].settings == {"mu": 0.25}


def test_a_fake_clock_times_rounds():
    ticks = iter([10.0, 12.5])
    coord = Coordinator(FedAvg(), ScriptedPool(5, 2), UniformSampler(2), seed=0,
                        clock=lambda: next(ticks))
    _, rec = coord.run_round(FedAvg().init(np.zeros(2, np.float32)), evaluate=False)
    assert rec.seconds == 2.5 and rec.eval == {}
