"""Personalization: FedPer, FedRep, Ditto and fine-tuned FedAvg; the head never leaves the
client (the server's vector is the body); local steps against hand-written oracles."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from shoal.clock import SimClock
from shoal.coordinator import Coordinator
from shoal.data import Dataset
from shoal.errors import ConfigError, ProtocolError
from shoal.events import TrainTask
from shoal.frameworks.torch import FlatModule
from shoal.personalization import HeadSplit, PersonalSettings, local_step
from shoal.runner import drive
from shoal.sampling import UniformSampler
from shoal.scenarios.personalization import run_personalized, two_class_split
from shoal.sim.personal import PersonalPool
from shoal.strategy import FedAvg, ServerState
from shoal.training import LocalTrainConfig, batch_plan, train_local


def mlp(seed=0):
    torch.manual_seed(seed)
    return FlatModule(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(),
                                          torch.nn.Linear(5, 3)))


def toy(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(rng.integers(0, 3, n).astype(np.int64))


def test_head_split_cuts_and_joins_the_flat_vector():
    m = mlp()
    split = HeadSplit(m.spec)
    assert split.head_names == {"2.weight", "2.bias"}
    assert (split.body_size, split.head_size) == (25, 18)
    full = np.arange(43, dtype=np.float32)
    assert split.join(split.body(full), split.head(full)).tolist() == full.tolist()
    assert split.head(full).tolist() == list(range(25, 43))
    with pytest.raises(ConfigError):
        HeadSplit(m.spec, ("nope",))
    with pytest.raises(ConfigError):
        HeadSplit(m.spec, tuple(t.name for t in m.spec.tensors))


def test_frozen_tensors_do_not_move_and_the_rest_matches_an_explicit_sgd_oracle():
    m = mlp()
    x, y = toy()
    start = m.get()
    cfg = LocalTrainConfig(epochs=2, batch_size=8, lr=0.1)
    res = train_local(m, start, x, y, cfg, np.random.default_rng(3),
                      frozen=frozenset({"0.weight", "0.bias"}))
    split = HeadSplit(m.spec)
    assert not split.body(res.delta).any() and split.head(res.delta).any()
    # oracle: plain torch, body fixed, SGD on the head with the same batches
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    head = [ref[2].weight, ref[2].bias]
    for batch in batch_plan(len(y), cfg, np.random.default_rng(3)):
        idx = torch.from_numpy(batch[batch >= 0])
        loss = torch.nn.functional.cross_entropy(ref(x[idx]), y[idx])
        grads = torch.autograd.grad(loss, head)
        with torch.no_grad():
            for p, g in zip(head, grads):
                p -= 0.1 * g
    expected = torch.cat([ref[2].weight.detach().reshape(-1), ref[2].bias.detach()])
    np.testing.assert_allclose(start[25:] + res.delta[25:], expected.numpy(), atol=1e-6)
    with pytest.raises(ConfigError):
        train_local(m, start, x, y, cfg, np.random.default_rng(3), frozen=frozenset({"x"}))


def test_ditto_pulls_the_personal_model_towards_the_global_one():
    m = mlp()
    x, y = toy()
    w = m.get()
    v = w + np.float32(0.5)
    cfg = LocalTrainConfig(epochs=1, batch_size=24, lr=0.1)  # one full-batch step
    step = local_step(PersonalSettings("ditto", lam=2.0), m, HeadSplit(m.spec), w, v, x, y,
                      cfg, np.random.default_rng(0))
    # oracle: v - lr (grad F(v) + lam (v - w)) computed by autograd at v
    m.set(v)
    loss = torch.nn.functional.cross_entropy(m.module(x), y)
    grads = torch.autograd.grad(loss, list(m.module.parameters()))
    g = torch.cat([t.reshape(-1) for t in grads]).numpy()
    np.testing.assert_allclose(step.own, v - 0.1 * (g + 2.0 * (v - w)), atol=1e-6)
    # the upload is the plain FedAvg update of the global model
    plain = train_local(m, w, x, y, cfg, np.random.default_rng(0))
    np.testing.assert_allclose(step.delta, plain.delta, atol=1e-7)


def test_fedrep_trains_the_head_then_the_body_and_uploads_only_the_body():
    m = mlp()
    x, y = toy()
    split = HeadSplit(m.spec)
    full = m.get()
    s = PersonalSettings("fedrep", head_epochs=3, body_epochs=1)
    cfg = LocalTrainConfig(batch_size=8, lr=0.1)
    step = local_step(s, m, split, split.body(full), split.head(full), x, y, cfg,
                      np.random.default_rng(1))
    assert step.delta.shape == (split.body_size,)
    rng = np.random.default_rng(1)
    head = train_local(m, full, x, y, replace(cfg, epochs=3), rng,
                       frozen=split.body_names)
    body = train_local(m, full + head.delta, x, y, cfg, rng, frozen=split.head_names)
    np.testing.assert_array_equal(step.own, split.head(full + head.delta))
    np.testing.assert_array_equal(step.delta, split.body(body.delta))


@pytest.mark.parametrize("method", ["fedper", "fedrep"])
def test_the_server_never_holds_a_head(method):
    m = mlp()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 4)).astype(np.float32)
    data = Dataset(x, rng.integers(0, 3, 60).astype(np.int64), 3, "toy")
    parts = [np.arange(i, 60, 4) for i in range(4)]
    pool = PersonalPool(PersonalSettings(method, head_epochs=1), m, m.get(), data, parts,
                        LocalTrainConfig(batch_size=5), seed=0)
    split = pool.split
    commits = []
    coord = Coordinator(FedAvg(), 4, UniformSampler(2), seed=0, steps=3)
    drive(coord, pool, ServerState(split.body(m.get())), SimClock(),
          on_commit=lambda st, rec: commits.append(st.params.size))
    assert commits == [split.body_size] * 3  # the aggregated vector is the body
    heads = [h for h in pool.own if h is not None]
    assert len(heads) == 4 and all(h.shape == (split.head_size,) for h in heads)
    trained = [c for c in range(4) if not np.array_equal(pool.own[c], split.head(m.get()))]
    assert trained  # clients that trained moved their own head
    bad = TrainTask(1, 0, np.zeros(split.spec.size, np.float32), 1)
    with pytest.raises(ProtocolError, match="shared model"):
        next(pool.train(bad, np.array([0])))


def test_two_class_split_gives_each_client_two_classes_in_train_and_test():
    rng = np.random.default_rng(0)
    ytr = np.repeat(np.arange(10), 60)
    yte = np.repeat(np.arange(10), 20)
    parts, tparts, classes = two_class_split(ytr, yte, 20, 10, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(600))  # a partition
    assert sorted(np.concatenate(tparts).tolist()) == list(range(200))
    for p, t, cl in zip(parts, tparts, classes):
        assert set(ytr[p]) == set(yte[t]) == set(cl.tolist()) and cl[0] != cl[1]
    assert np.bincount(classes.ravel(), minlength=10).tolist() == [4] * 10
    with pytest.raises(ValueError):
        two_class_split(ytr, yte, 7, 10, seed=0)
    del rng


def test_personalization_beats_global_fedavg_on_two_class_clients(fmnist):
    train, test = fmnist
    parts, tparts, _ = two_class_split(train.y, test.y, 20, 10, seed=0)
    # a quarter of each client's data keeps the test fast
    parts = [p[::4] for p in parts]
    cfg = LocalTrainConfig()
    kw = dict(rounds=5, per_round=5, seed=0, config=cfg)
    base, ft = run_personalized(PersonalSettings("fedavg"), train, test, parts, tparts,
                                finetune_epochs=(0, 1), **kw)
    rep, = run_personalized(PersonalSettings("fedrep", head_epochs=2), train, test, parts,
                            tparts, **kw)
    assert rep.shared_size < base.shared_size
    for r in (ft, rep):
        assert r.accuracy.mean() > base.accuracy.mean() + 0.2
