"""Round policies compared on the reference workload (config S: Fashion-MNIST, Dirichlet 0.5,
100 clients, 2NN), with simulated device time so that buffered aggregation really is
asynchronous: fast clients report often, slow ones late and stale."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.config import load_config
from shoal.experiment import Experiment


@pytest.mark.slow
def test_buffered_reaches_sync_accuracy_at_the_same_number_of_client_updates(fmnist):
    from shoal.data import FederatedData
    from shoal.data.partition import partition

    train, test = fmnist
    parts = tuple(partition(train.y, 100, "dirichlet", alpha=0.5, seed=0))
    data = FederatedData(train, test, parts)
    final: dict[str, list[float]] = {"sync": [], "buffered": []}
    for seed in (0, 1, 2):
        for policy in final:
            # 30 sync rounds of 10 clients, or 30 buffered steps of 10 updates: 300 updates
            cfg = load_config(None, {"seed": seed, "round.policy": policy,
                                     "sim.time_model": "lognormal"})
            result = Experiment(cfg, data).run()
            committed = [r for r in result.records if r.round > 0]
            assert len(committed) == 30 and sum(r.accepted for r in committed) == 300
            if policy == "buffered":  # it really ran asynchronously
                assert max(r.staleness_max for r in committed) >= 1
            final[policy].append(result.summary()["final_accuracy"])
    gap = np.mean(final["sync"]) - np.mean(final["buffered"])
    assert gap < 0.01, final
