"""Attacks as client behaviours: who is malicious, what they train on, what they upload,
checked against the papers' formulas computed independently here; and that a defense holds
where FedAvg breaks, end to end."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.events import TrainTask
from shoal.experiment import Experiment
from shoal.models import build_model
from shoal.sim.attacks import (Attack, AttackedPool, MaliciousTrain, alie_z, attacked_pool,
                               backdoor_testset, malicious_clients, poisoned_data, stamp)
from shoal.sim.pool import in_process_pool
from shoal.transport.device_api import TrainResult

SYN = {"data.dataset": "synthetic", "model.name": "logreg", "data.clients": 30,
       "sampling.per_round": 15, "client.lr": 0.01}


def test_malicious_clients_are_a_fixed_fraction_drawn_from_the_attack_seed():
    a = malicious_clients(100, 0.2, seed=3)
    assert len(a) == 20 and len(set(a.tolist())) == 20 and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, malicious_clients(100, 0.2, seed=3))
    assert not np.array_equal(a, malicious_clients(100, 0.2, seed=4))
    assert set(malicious_clients(100, 0.1, seed=3)) <= set(a)  # nested: same permutation


@pytest.mark.parametrize("n, f, z", [(10, 2, 0.2533), (20, 4, 0.3853), (25, 5, 0.4677),
                                     (50, 12, 0.5828), (100, 20, 0.4959)])
def test_alie_z_is_the_papers_convention(n, f, z):
    # the paper's z_max column of docs/references.md's table (computed with scipy there)
    assert alie_z(n, f) == pytest.approx(z, abs=1e-4)


def _cohort(seed=0, n=12, d=30):
    rng = np.random.default_rng(seed)
    rows = (rng.normal(size=(n, d)) + 0.3).astype(np.float32)
    bad = np.zeros(n, bool)
    bad[[1, 5, 8]] = True
    return rows, bad


def test_update_attacks_follow_their_definitions():
    rows, bad = _cohort()
    rng = np.random.default_rng(0)
    own = rows[bad].astype(np.float64)
    np.testing.assert_allclose(Attack("sign_flip").craft(rows, bad, rng), -own)
    np.testing.assert_allclose(Attack("sign_flip", scale=3).craft(rows, bad, rng), -3 * own)
    np.testing.assert_allclose(Attack("label_flip").craft(rows, bad, rng), own)
    # model replacement: boosted by clients per round / server learning rate
    np.testing.assert_allclose(Attack("backdoor", server_lr=0.5).craft(rows, bad, rng),
                               own * 12 / 0.5)
    sy = Attack("sybil").craft(rows, bad, rng)
    assert (sy == sy[0]).all() and np.allclose(sy[0], own.mean(0))
    noise = Attack("gaussian", noise_std=2.0).craft(np.zeros((400, 500), np.float32),
                                                    np.ones(400, bool), rng)
    assert noise.std() == pytest.approx(2.0, rel=0.01)


@pytest.mark.parametrize("knowledge", ["omniscient", "own"])
def test_statistics_attacks_use_the_reference_they_are_given(knowledge):
    rows, bad = _cohort()
    ref = rows.astype(np.float64) if knowledge == "omniscient" else rows[bad].astype(float)
    mu, sigma = ref.mean(0), ref.std(0)
    rng = np.random.default_rng(0)
    ipm = Attack("ipm", ipm_epsilon=0.5, knowledge=knowledge).craft(rows, bad, rng)
    np.testing.assert_allclose(ipm, np.tile(-0.5 * mu, (3, 1)))
    z = statistics.NormalDist().inv_cdf((12 - (7 - 3)) / 12)  # s = floor(12/2 + 1) - 3
    alie = Attack("alie", knowledge=knowledge).craft(rows, bad, rng)
    np.testing.assert_allclose(alie, np.tile(mu - z * sigma, (3, 1)), rtol=1e-10)


@pytest.mark.parametrize("kind", ["min_max", "min_sum"])
def test_min_max_and_min_sum_stay_just_inside_the_honest_spread(kind):
    rows, bad = _cohort(seed=1)
    ref = rows.astype(np.float64)
    mu, sigma = ref.mean(0), ref.std(0)
    v = Attack(kind).craft(rows, bad, np.random.default_rng(0))[0]
    pair = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    dist = ((ref - v) ** 2).sum(-1)
    if kind == "min_max":
        bound, used = pair.max(), dist.max()
    else:
        bound, used = pair.sum(1).max(), dist.sum()
    assert used <= bound * (1 + 1e-9)
    gamma = float(np.linalg.norm(mu - v) / np.linalg.norm(sigma))
    assert gamma > 0.1
    # the bisection found (nearly) the largest gamma: 1 % more breaks the bound
    w = mu - 1.01 * gamma * sigma
    over = ((ref - w) ** 2).sum(-1)
    assert (over.max() if kind == "min_max" else over.sum()) > bound


def test_poisoned_data_changes_only_the_attackers_examples(tiny_task):
    bad = np.array([2, 3])
    poisoned = poisoned_data(tiny_task, bad, Attack("label_flip"), np.random.default_rng(0))
    train = tiny_task.train
    for c in (0, 1, 4, 5):
        np.testing.assert_array_equal(poisoned.client_indices[c], tiny_task.client_indices[c])
    for c in (2, 3):
        old, new = tiny_task.client_indices[c], poisoned.client_indices[c]
        np.testing.assert_array_equal(poisoned.train.y[new], 3 - train.y[old])
        np.testing.assert_array_equal(poisoned.train.x[new], train.x[old])
    np.testing.assert_array_equal(poisoned.train.y[:len(train.y)], train.y)  # untouched

    back = poisoned_data(tiny_task, bad, Attack("backdoor", target_label=1,
                                                poison_fraction=0.5), np.random.default_rng(0))
    new = np.concatenate([back.client_indices[c] for c in bad])
    old = np.concatenate([tiny_task.client_indices[c] for c in bad])
    stamped = (back.train.x[new][:, :4] == 4.0).all(1)
    assert 0.3 < stamped.mean() < 0.7
    assert (back.train.y[new][stamped] == 1).all()
    np.testing.assert_array_equal(back.train.y[new][~stamped], train.y[old][~stamped])
    with pytest.raises(ConfigError, match="target_label"):
        poisoned_data(tiny_task, bad, Attack("backdoor", target_label=9),
                      np.random.default_rng(0))


def test_pixel_pattern_and_backdoor_testset():
    x = np.zeros((3, 784), np.float32)
    s = stamp(x)
    assert s.reshape(3, 28, 28)[:, 1, 1].tolist() == [1.0] * 3 and (s.sum(1) == 5).all()
    assert (x == 0).all()  # copies
    from shoal.data import Dataset

    test = Dataset(np.zeros((6, 784), np.float32), np.array([0, 1, 2, 0, 3, 0]), 10, "t")
    bd = backdoor_testset(test, target=0)
    assert len(bd.y) == 3 and (bd.y == 0).all() and (bd.x.sum(1) == 5).all()


def test_attacked_pool_rewrites_only_the_malicious_rows(tiny_task):
    cfg = load_config(overrides={"data.clients": 6, "sampling.per_round": 6})
    model = build_model("logreg", 20, 4, 0)
    honest, _ = in_process_pool(cfg, model, tiny_task, 84)
    pool = AttackedPool(honest, Attack("sign_flip", scale=2.0), np.array([3]), seed=0)
    params = np.zeros(84, np.float32)
    task = TrainTask(task_id=1, version=0, params=params, round=1, settings={}, deadline=1e9)
    clean = {int(c): r.copy() for b in honest.train(task, np.arange(6))
             for c, r in zip(b.client_ids, b.deltas)}
    got = {int(c): r for b in pool.train(task, np.arange(6))
           for c, r in zip(b.client_ids, b.deltas)}
    assert set(got) == set(clean)
    for c in got:
        expect = -2 * clean[c] if c == 3 else clean[c]
        np.testing.assert_allclose(got[c], expect, rtol=1e-6)
    # a cohort without attackers passes straight through
    assert sum(len(b.client_ids) for b in pool.train(task, np.array([0, 1]))) == 2


def test_no_attack_builds_the_plain_pool(tiny_task):
    cfg = load_config(overrides={"data.clients": 6, "sampling.per_round": 6})
    pool, _ = attacked_pool(cfg, build_model("logreg", 20, 4, 0), tiny_task, 84)
    assert not isinstance(pool, AttackedPool)


def _final(overrides):
    return Experiment(load_config(overrides={**SYN, "rounds": 12, **overrides})).run() \
        .summary()["final_accuracy"]


def test_a_defense_holds_where_fedavg_breaks():
    """20 % of the clients send 50x their flipped update: FedAvg collapses; Multi-Krum over
    15 updates per round stays within a few points of the clean run (IID data)."""
    iid = {"data.synthetic_iid": True}
    attack = {**iid, "attack.kind": "sign_flip", "attack.fraction": 0.2, "attack.scale": 50.0}
    clean = _final(iid)
    assert _final(attack) < clean - 0.3
    assert _final({**attack, "robust.rule": "multi_krum"}) > clean - 0.05


def test_a_malicious_device_flips_scales_or_noises_its_update():
    def train(params, settings, round):
        return TrainResult(delta=np.ones(4, np.float32), num_examples=5)

    assert MaliciousTrain(train, "sign_flip", scale=2.0)(None, {}, 1).delta.tolist() == \
        [-2.0] * 4
    assert MaliciousTrain(train, "backdoor", scale=10.0)(None, {}, 1).num_examples == 5
    noisy = MaliciousTrain(train, "gaussian", rng=np.random.default_rng(0))(None, {}, 1).delta
    assert noisy.dtype == np.float32 and not (noisy == 1).all()
    with pytest.raises(ConfigError):
        MaliciousTrain(train, "alie")

