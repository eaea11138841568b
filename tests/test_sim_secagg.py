"""Secure aggregation inside simulated rounds: the server learns the (weighted) mean only."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.privacy.secagg_rounds import SecAggAggregation
from shoal.sim.experiment import Experiment

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
    acc = agg.begin(1, 50)
    acc.add_stacked(rows, weights)
    # who drops is drawn from the round's generator first: replay it for the oracle
    replay = np.random.default_rng(1)
    dropped = {i for i in range(7) if replay.random() < 0.4}
    mean, info = agg.finish(acc, 1)
    kept = [i for i in range(7) if i not in dropped]
    assert 0 < len(dropped) < 5 and info["secagg_included"] == len(kept)
    expect = (weights[kept] @ rows[kept]) / weights[kept].sum()
    np.testing.assert_allclose(mean, expect, atol=2 * 4.0 / (2**20 - 1))


def test_secagg_refuses_codecs_and_central_dp():
    with pytest.raises(ConfigError, match="do not compress"):
        load_config(None, {"secure_aggregation.enabled": True, "compression.upload": "q8"})
    with pytest.raises(ConfigError, match="cannot clip updates it cannot see"):
        load_config(None, {"secure_aggregation.enabled": True,
                           "privacy.placement": "central"})
