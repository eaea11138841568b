"""Security-relevant randomness in deployment comes from a CSPRNG; simulation stays seeded.

Deployed cohorts under DP are drawn by :func:`shoal.build.unpredictable` (AES-CTR keyed
from ``os.urandom``, :class:`~shoal.privacy.csprng.CryptoRandom`), not from a PCG64 whose
state its outputs reveal. Oracles: the uniform distribution of cohort membership (a
chi-square test), the simulator's seeded cohorts (the same for the same seed).
"""

from __future__ import annotations

import numpy as np

from shoal.build import unpredictable
from shoal.config import load_config
from shoal.experiment import Experiment
from shoal.privacy.csprng import CryptoRandom
from shoal.sampling import UniformSampler

SYNTH = {"data.dataset": "synthetic", "data.clients": 40, "model.name": "logreg",
         "sampling.method": "uniform", "sampling.per_round": 10, "client.batch_size": 10,
         "rounds": 2, "privacy.placement": "central"}


def test_deployed_dp_cohorts_come_from_a_csprng_and_simulated_ones_from_the_seed():
    from shoal.sim.pool import InProcessPool

    cfg = load_config(None, SYNTH)
    sim = Experiment(cfg)
    assert not isinstance(sim.coordinator.sample_rng(1, 0), CryptoRandom)
    assert np.array_equal(sim.coordinator.cohort(1), Experiment(cfg).coordinator.cohort(1))
    pool = InProcessPool(sim.pool.trainer, sim.data.client_indices, sim.pool.config, seed=0)
    deployed = Experiment(cfg, sim.data, pool=pool).coordinator
    assert isinstance(deployed.sample_rng(1, 0), CryptoRandom)
    cohorts = [deployed.cohort(1) for _ in range(5)]
    assert len({tuple(c) for c in cohorts}) > 1  # equal draws: chance ~1e-36
    for c in cohorts:
        assert len(c) == 10 == len(set(c.tolist())) and (np.diff(c) > 0).all()
        assert 0 <= c.min() and c.max() < 40


def test_a_csprng_cohort_is_a_uniform_sample():
    """4,000 cohorts of 10 out of 40: every client is in one with probability 1/4, so its
    count is Binomial(4000, 1/4); the chi-square statistic over the 40 counts (39 degrees
    of freedom) stays below its 1e-6 quantile (about 95)."""
    sampler, n, draws = UniformSampler(10), 40, 4000
    counts = np.zeros(n)
    for _ in range(draws):
        counts[sampler.sample(n, unpredictable(1, 0))] += 1
    expected = draws * 10 / n
    chi2 = float((((counts - expected) ** 2) / expected).sum())
    assert chi2 < 95.0, counts
    assert counts.sum() == draws * 10
