"""Generated populations: each client's data is a function of (seed, client id), the size
law and class mixes are as documented, memory is a few bytes per client, and a run over one
trains and evaluates like any other."""

from __future__ import annotations

import numpy as np
import pytest

from shoal import seeds
from shoal.config import load_config
from shoal.data import Dataset, ResampledClients, SyntheticClients
from shoal.data.population import SIZE_CAP, client_sizes
from shoal.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 50)  # 500 examples, 50 per class
    x = rng.standard_normal((500, 8)).astype(np.float32)
    return Dataset(x, y.astype(np.int64), 10, "pool")


def test_a_clients_data_depends_only_on_seed_and_id(pool):
    pop = ResampledClients(pool, pool, 100_000, seed=3)
    _, alone = pop.examples_of(np.array([777]))
    _, crowd = pop.examples_of(np.array([5, 99_999, 777, 12]))
    np.testing.assert_array_equal(alone[0], crowd[2])
    _, other_seed = ResampledClients(pool, pool, 100_000, seed=4).examples_of(np.array([777]))
    assert not np.array_equal(alone[0], other_seed[0])
    syn = SyntheticClients(1.0, 1.0, 50_000, seed=3)
    a_data, a_idx = syn.examples_of(np.array([40_000]))
    b_data, b_idx = syn.examples_of(np.array([1, 40_000]))
    np.testing.assert_array_equal(a_data.x[a_idx[0]], b_data.x[b_idx[1]])
    np.testing.assert_array_equal(a_data.y[a_idx[0]], b_data.y[b_idx[1]])


def test_sizes_follow_the_documented_law():
    sizes = client_sizes(1_000_000, 60, 0.5, seed=0)
    assert sizes.dtype == np.int32 and sizes.nbytes == 4_000_000  # 4 bytes a client
    z = seeds.generator(0, "client-sizes").standard_normal(1 << 20)[:1_000_000]
    np.testing.assert_array_equal(sizes, np.clip(np.rint(60 * np.exp(0.5 * z)), 1, 1200))
    assert np.median(sizes) == 60 and sizes.max() <= SIZE_CAP * 60 and sizes.min() >= 1
    assert (client_sizes(1000, 25, 0.0, seed=1) == 25).all()
    with pytest.raises(ConfigError, match="client_examples"):
        client_sizes(10, 0, 0.5, seed=0)


def test_resampled_clients_draw_their_own_class_mix_with_replacement(pool):
    pop = ResampledClients(pool, pool, 10_000, median=200, sigma=0.0, alpha=0.5, seed=1)
    _, parts = pop.examples_of(np.arange(300))
    labels = [pool.y[p] for p in parts]
    assert all(len(p) == 200 for p in parts)  # sigma 0: every client the median
    # each client's labels follow its Dirichlet(0.5) mix, so clients hold few classes in
    # bulk: the top class takes far more than the 1/10 of a uniform mix (Dir(0.5) over 10
    # classes gives the largest share ~0.35 on average) ...
    top = np.array([np.bincount(y, minlength=10).max() / len(y) for y in labels])
    assert 0.25 < top.mean() < 0.45
    # ... and the pooled population is balanced (the mixes average to uniform)
    pooled = np.bincount(np.concatenate(labels), minlength=10) / (300 * 200)
    assert np.abs(pooled - 0.1).max() < 0.03
    # with replacement: a client of 200 draws from 50 examples per class repeats some
    assert any(len(np.unique(p)) < len(p) for p in parts)


def test_synthetic_clients_follow_their_own_model():
    syn = SyntheticClients(1.0, 1.0, 1000, median=100, sigma=0.0, seed=2)
    data, parts = syn.examples_of(np.array([3, 4]))
    for c, idx in zip((3, 4), parts):
        rng = seeds.generator(2, "client-model", c)  # the documented per-user law
        u, b_shift = rng.normal(0.0, 1.0), rng.normal(0.0, 1.0)
        rng.normal(b_shift, 1.0, 60)  # v_c: the inputs' mean
        w, b = rng.normal(u, 1.0, (60, 10)), rng.normal(u, 1.0, 10)
        np.testing.assert_array_equal(data.y[idx], np.argmax(data.x[idx] @ w + b, axis=1))
    iid = SyntheticClients(0.0, 0.0, 1000, iid=True, seed=2)
    d, p = iid.examples_of(np.array([0, 1]))
    assert abs(d.x[p[0]].mean()) < 0.2  # v_c = 0 for every user
    assert len(syn.test) == 10_000 and syn.test.x.shape == (10_000, 60)


def test_bad_inputs_are_refused(pool):
    with pytest.raises(DataError, match="client ids"):
        ResampledClients(pool, pool, 10, seed=0).examples_of(np.array([10]))
    with pytest.raises(ConfigError, match="alpha"):
        ResampledClients(pool, pool, 10, alpha=0.0)
    holey = Dataset(pool.x[:50], pool.y[:50], 10)  # class 1.. missing
    with pytest.raises(DataError, match="class 1"):
        ResampledClients(holey, pool, 10)


def test_a_run_over_a_generated_population(fmnist):
    """Fashion-MNIST resampled for 200,000 clients: sync rounds train the model about as
    config L does (1,000 partitioned clients of ~60 examples: ~0.5 after 15 rounds), with
    memory a few bytes a client."""
    from shoal.build import load_data
    from shoal.experiment import Experiment

    cfg = load_config(None, {"data.clients": 200_000, "data.population": "generated",
                             "sampling.per_round": 100, "rounds": 12})
    data = load_data(cfg)
    assert isinstance(data, ResampledClients) and data.sizes.nbytes == 800_000
    result = Experiment(cfg, data).run()
    assert result.summary()["final_accuracy"] > 0.4  # chance: 0.1
    assert sum(r.accepted for r in result.records) == 1200
