"""The vectorized cohort engines must train exactly like the one-client-at-a-time reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shoal import seeds
from shoal.errors import ConfigError
from shoal.frameworks.torch import FlatModule
from shoal.models import build_model
from shoal.sim.cohort import CohortTrainer, choose_engine
from shoal.training import LocalTrainConfig, batch_plan, train_local


def _run(model_name, engine, data, clients, cfg, in_features):
    torch.manual_seed(0)
    model = build_model(model_name, in_features, data.train.num_classes, seed=0)
    trainer = CohortTrainer(model, torch.from_numpy(data.train.x), torch.from_numpy(data.train.y),
                            engine=engine)
    g = FlatModule(build_model(model_name, in_features, data.train.num_classes, seed=0)).get()
    rngs = [seeds.generator(7, "train", 1, c) for c in clients]
    res = trainer.train(g, [data.client_indices[c] for c in clients], cfg, rngs)
    order = np.argsort(res.positions)
    return res.deltas[order], res.num_examples[order], res.loss[order]


@pytest.mark.parametrize("model_name, engines", [("mlp2nn", ["fused", "vmap"]),
                                                 ("logreg", ["fused", "vmap"])])
@pytest.mark.parametrize("mu, epochs", [(0.0, 1), (0.5, 2)])
def test_vectorized_engines_equal_sequential_reference(tiny_task, model_name, engines, mu,
                                                       epochs):
    clients = [0, 1, 2, 3, 4, 5]  # sizes 5, 0, 145, 270, 13, 267: unequal, one empty
    cfg = LocalTrainConfig(epochs=epochs, batch_size=32, lr=0.1, mu=mu)
    ref = _run(model_name, "sequential", tiny_task, clients, cfg, 20)
    assert list(ref[1]) == [5, 0, 145, 270, 13, 267]
    assert np.abs(ref[0]).max() > 1e-3  # training moved the models
    for engine in engines:
        d, n, loss = _run(model_name, engine, tiny_task, clients, cfg, 20)
        np.testing.assert_array_equal(n, ref[1])
        np.testing.assert_allclose(d, ref[0], atol=2e-6, rtol=1e-4)
        np.testing.assert_allclose(loss, ref[2], rtol=1e-5, equal_nan=True)
    assert np.all(ref[0][1] == 0)  # the empty client does not move


def test_fused_engine_trains_in_float32_whatever_the_default_dtype(tiny_task):
    """A ``torch.set_default_dtype(torch.float64)`` made after the model was built must
    neither break the engine's buffers nor change its float32 results."""
    cfg = LocalTrainConfig(epochs=1, batch_size=32, lr=0.1)
    clients = [0, 1, 2, 3]
    model = build_model("mlp2nn", 20, tiny_task.train.num_classes, seed=0)
    trainer = CohortTrainer(model, torch.from_numpy(tiny_task.train.x),
                            torch.from_numpy(tiny_task.train.y), engine="fused")
    g = FlatModule(model).get()

    def train():
        rngs = [seeds.generator(7, "train", 1, c) for c in clients]
        res = trainer.train(g, [tiny_task.client_indices[c] for c in clients], cfg, rngs)
        return res.deltas.copy(), res.loss.copy()

    want = train()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = train()
    finally:
        torch.set_default_dtype(before)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_vmap_engine_equals_sequential_for_the_cnn(fmnist):
    from shoal.data import FederatedData

    train, test = fmnist
    parts = (np.arange(0, 40), np.arange(40, 43), np.arange(100, 170))
    data = FederatedData(train, test, tuple(p.astype(np.int64) for p in parts))
    cfg = LocalTrainConfig(epochs=1, batch_size=16, lr=0.05, mu=0.1)
    ref = _run("cnn", "sequential", data, [0, 1, 2], cfg, 784)
    got = _run("cnn", "vmap", data, [0, 1, 2], cfg, 784)
    np.testing.assert_allclose(got[0], ref[0], atol=2e-6, rtol=1e-4)


def test_proximal_term_pulls_towards_the_global_model(tiny_task):
    """FedProx: a larger mu gives a smaller update on the same batches."""
    norms = []
    for mu in (0.0, 1.0, 10.0):
        d, _, _ = _run("logreg", "fused", tiny_task, [3], LocalTrainConfig(epochs=3, lr=0.1,
                                                                           mu=mu), 20)
        norms.append(np.linalg.norm(d))
    assert norms[0] > norms[1] > norms[2] > 0


def test_batch_plan_covers_each_example_once_per_epoch():
    rng = np.random.default_rng(0)
    plan = batch_plan(70, LocalTrainConfig(epochs=3, batch_size=32), rng)
    assert plan.shape == (9, 32)
    for e in range(3):
        epoch = plan[3 * e:3 * e + 3].reshape(-1)
        assert sorted(epoch[epoch >= 0]) == list(range(70))
    assert (plan[2] >= 0).sum() == 6  # the last partial batch is kept, padded with -1
    assert not np.array_equal(plan[0], plan[3])  # a fresh shuffle every epoch


def test_train_local_reports_update_not_model(tiny_task):
    model = FlatModule(build_model("logreg", 20, 4, seed=0))
    g = model.get()
    x, y = torch.from_numpy(tiny_task.train.x[:64]), torch.from_numpy(tiny_task.train.y[:64])
    res = train_local(model, g, x, y, LocalTrainConfig(lr=0.1), np.random.default_rng(0))
    np.testing.assert_allclose(model.get() - g, res.delta, atol=1e-7)
    assert res.num_examples == 64 and np.isfinite(res.metrics["loss"])


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_engine_choice():
    assert choose_engine(build_model("mlp2nn", 784, 10, 0)) == "fused"
    assert choose_engine(build_model("logreg", 784, 10, 0)) == "fused"
    assert choose_engine(build_model("cnn", 784, 10, 0)) == "vmap"
    assert choose_engine(WithBatchNorm()) == "sequential"
    with pytest.raises(ConfigError, match="Linear and ReLU"):
        choose_engine(build_model("cnn", 784, 10, 0), "fused")
    with pytest.raises(ConfigError, match="buffers"):
        choose_engine(WithBatchNorm(), "vmap")
    with pytest.raises(ConfigError, match="sim.engine"):
        choose_engine(WithBatchNorm(), "gpu")
