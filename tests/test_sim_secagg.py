"""Secure aggregation inside simulated rounds: the server learns the (weighted) mean only."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.privacy.secagg_rounds import SecAggAggregation
from shoal.experiment import Experiment

SYNTH = {"data.dataset": "synthetic", "data.clients": 20, "model.name": "logreg",
         "sampling.per_round": 8, "client.batch_size": 10, "rounds": 1}


def test_one_round_under_secagg_matches_plain_fedavg_within_quantization():
    plain = Experiment(load_config(None, SYNTH)).run().state.params
    cfg = load_config(None, {**SYNTH, "secure_aggregation.enabled": True,
                             "secure_aggregation.clip": 4.0,
                             "secure_aggregation.value_bits": 24})
    result = Experiment(cfg).run()
    secure = result.state.params
    step = 2 * 4.0 / (2**24 - 1)
    np.testing.assert_allclose(secure, plain, atol=2 * step, rtol=0)
    assert not np.array_equal(secure, plain)  # it really went through the fixed-point ring
    info = result.records[-1].privacy
    assert info["secagg_included"] == 8 and info["secagg_dropped"] == 0


def test_dropped_clients_are_left_out_of_the_mean():
    agg = SecAggAggregation(clip=2.0, value_bits=20, max_weight=100, neighbours=-1,
                            threshold=3, dropout=0.4, corrupt_rate=0.0,
                            rng_for_round=lambda r: np.random.default_rng(r))
    rng = np.random.default_rng(1)
    rows = rng.uniform(-1, 1, size=(7, 50)).astype(np.float32)
    weights = np.arange(1, 8, dtype=np.float64) * 10
    acc = agg.begin(50, 1)
    acc.add(rows, weights)
    # who drops is drawn from the round's generator first: replay it for the oracle
    replay = np.random.default_rng(1)
    dropped = {i for i in range(7) if replay.random() < 0.4}
    total = acc.finish()
    mean, info = total.mean(), total.info
    kept = [i for i in range(7) if i not in dropped]
    assert 0 < len(dropped) < 5 and info["secagg_included"] == len(kept)
    expect = (weights[kept] @ rows[kept]) / weights[kept].sum()
    np.testing.assert_allclose(mean, expect, atol=2 * 4.0 / (2**20 - 1))


def test_secagg_refuses_codecs_and_local_dp():
    with pytest.raises(ConfigError, match="do not compress"):
        load_config(None, {"secure_aggregation.enabled": True, "compression.upload": "q8"})
    with pytest.raises(ConfigError, match="clip before the secure sum"):
        load_config(None, {"secure_aggregation.enabled": True, "privacy.placement": "local"})


def test_central_dp_composes_with_secagg_noise_after_the_secure_sum():
    """DP + SecAgg+: updates are clipped before masking and the noise is added to the unmasked
    sum. With the same seed the noise stream is the same, so the secure run's model equals the
    plain DP run's within the fixed-point quantization, and epsilon is recorded."""
    dp = {**SYNTH, "rounds": 2, "privacy.placement": "central", "privacy.clip_norm": 0.5,
          "privacy.noise_multiplier": 0.8}
    plain = Experiment(load_config(None, dp)).run()
    cfg = load_config(None, {**dp, "secure_aggregation.enabled": True,
                             "secure_aggregation.clip": 1.0,
                             "secure_aggregation.value_bits": 30})
    secure = Experiment(cfg).run()
    assert not np.array_equal(secure.state.params, plain.state.params)  # really went masked
    np.testing.assert_allclose(secure.state.params, plain.state.params, atol=1e-6, rtol=0)
    for a, b in zip(plain.records[1:], secure.records[1:]):
        assert b.privacy["epsilon"] == a.privacy["epsilon"] > 0
        assert b.privacy["secagg_included"] == 8
        assert b.privacy["noise_std"] == a.privacy["noise_std"]
