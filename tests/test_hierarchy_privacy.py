"""Privacy per tier: SecAgg+ within each edge group, central DP at the global tier."""

from __future__ import annotations

import numpy as np
import pytest

from shoal import seeds
from shoal.build import load_data
from shoal.config import load_config
from shoal.events import TrainTask
from shoal.experiment import Experiment
from shoal.hierarchy.tiers import Tier


@pytest.fixture(scope="module")
def data():
    return load_data(load_config())


def _client_updates(devices, params: np.ndarray, ids: np.ndarray
                    ) -> dict[int, tuple[np.ndarray, float]]:
    """Each client's own delta (float64) and example count, trained here."""
    out = {}
    task = TrainTask(task_id=1, version=0, params=params, round=1)
    for batch in devices.train(task, ids):
        for c, d, n in zip(batch.client_ids.tolist(), batch.deltas, batch.num_examples):
            out[c] = (np.asarray(d, np.float64), float(n))
    return out


def _dropped(seed: int, group: np.ndarray, step: int, dropout: float) -> set[int]:
    """The clients of ``group`` the simulated SecAgg+ drops, from its seeded stream: the
    stream ``(seed, "secagg", step)`` draws one uniform per row, in the rows' order (the
    group's sorted ids), and a row drops when its draw is below ``dropout``."""
    rng = seeds.generator(seed, "secagg", step)
    return {int(c) for c in group if rng.random() < dropout}


def test_secagg_per_edge_group_with_dropouts_equals_the_plain_sum_of_survivors(data) -> None:
    """Oracle: who drops comes from the protocol's seeded dropout stream (edge ``i`` of
    ``E`` in round key ``k`` sums with step ``(k - 1) x E + i + 1``), and the model is the
    plain weighted mean of the survivors' own updates, trained here; a bug that drops other
    clients (or keeps a dropped one) changes it."""
    edges, dropout = 3, 0.1
    overrides = {"rounds": 1, "sampling.per_round": 45, "hierarchy.edges": edges,
                 "secure_aggregation.enabled": True, "secure_aggregation.dropout": dropout,
                 "secure_aggregation.dropout_stage": "share_keys"}
    cfg = load_config(None, overrides)
    exp = Experiment(cfg, data)
    tier = exp.pool
    assert isinstance(tier, Tier) and tier.aggregates_securely
    assert exp.pipeline.sum_rule.name == "plain"  # the global sees only the edges' sums
    base = exp.initial_params.astype(np.float32)
    cohort = exp.coordinator.cohort(1)
    groups = tier.route.groups(cohort)  # placing the cohort as the run will
    result = exp.run()
    total, weight, dropped = np.zeros(base.size), 0.0, 0
    for name, ids in groups.items():
        gone = _dropped(cfg.seed, ids, int(name.split("-")[1]) + 1, dropout)
        keep = np.array([c for c in ids.tolist() if c not in gone], np.int64)
        updates = _client_updates(tier.below, base, keep)
        total += sum(n * d for d, n in updates.values())
        weight += sum(n for _, n in updates.values())
        dropped += len(gone)
        record = tier.edges[name].records[-1]
        assert record.privacy["secagg_dropped"] == len(gone)
    assert dropped >= 2  # 10% of 45: the protocol really recovered from dropouts
    oracle = base + total / weight
    assert np.abs(result.state.params - oracle).max() < 1e-5  # fixed point, 20 bits
    assert result.records[1].accepted == len(cohort) - dropped
    assert result.records[1].privacy["secagg_dropped"] == dropped


def test_central_dp_at_the_global_tier_accounts_as_flat_and_commits_the_same_model(
        data) -> None:
    dp = {"rounds": 3, "privacy.placement": "central", "privacy.noise_multiplier": 1.0,
          "privacy.clip_norm": 0.5}
    flat = Experiment(load_config(None, dp), data).run()
    two = Experiment(load_config(None, {**dp, "hierarchy.edges": 4}), data).run()
    eps = [r.privacy["epsilon"] for r in flat.records[1:]]
    assert eps == [r.privacy["epsilon"] for r in two.records[1:]]
    assert eps[0] < eps[-1]  # composed over the rounds
    assert np.abs(flat.state.params - two.state.params).max() <= 1e-6
    # clipped where it matters: the edges clip each device, the global checks the promise
    assert two.records[1].rejected == {}
    # with SecAgg+ in each group too: the same accounting; the sum up to its fixed point
    bigger = {**dp, "rounds": 2, "sampling.per_round": 24, "hierarchy.edges": 4}
    plain = Experiment(load_config(None, bigger), data).run()
    secure = Experiment(load_config(None, {**bigger, "secure_aggregation.enabled": True}),
                        data).run()
    assert [r.privacy["epsilon"] for r in secure.records[1:]] == \
        [r.privacy["epsilon"] for r in plain.records[1:]]
    assert np.abs(secure.state.params - plain.state.params).max() < 1e-4


def test_a_group_too_small_to_sum_securely_is_not_revealed(data) -> None:
    cfg = load_config(None, {"rounds": 1, "sampling.per_round": 9, "hierarchy.edges": 4,
                             "secure_aggregation.enabled": True})
    exp = Experiment(cfg, data)
    groups = exp.pool.route.groups(exp.coordinator.cohort(1))
    small = sum(len(ids) for ids in groups.values() if len(ids) < 3)
    assert small  # nine clients over four edges: some group has fewer than three
    result = exp.run()
    big = sum(len(ids) for ids in groups.values() if len(ids) >= 3)
    assert result.records[-1].accepted == big
