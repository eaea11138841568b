"""The three secure sums -- plain, SecAgg+ and CKKS -- give the same aggregate for the same
uploads, with 0, 10 and 30 % of the clients vanishing after each SecAgg+ stage. The oracle
is the plain weighted sum over exactly the clients whose input reached the sum."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.pipeline import Pipeline
from shoal.privacy.secagg_driver import SecAggConfig, run_secagg_round
from shoal.privacy.secagg_encoding import FixedPoint
from shoal.privacy.secagg_messages import Stage
from shoal.privacy.secagg_rounds import SecAggAggregation

N, DIM, CLIP, MAX_W, BITS = 20, 600, 0.5, 64, 20
# the points a client can vanish at: before advertising keys, after them, after its shares,
# after its masked input (it never helps unmask)
STAGES = [Stage.SETUP, Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT]


def uploads(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.7, 0.7, (N, DIM)).astype(np.float32), rng.integers(1, MAX_W, N)


def plain_mean(x, w, who):
    who = sorted(who)
    c = np.clip(x[who].astype(np.float64), -CLIP, CLIP)
    return (w[who, None] * c).sum(0) / w[who].sum()


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.value)
def test_secagg_ckks_and_plain_agree_on_the_clients_whose_input_is_in(stage, rate):
    he = pytest.importorskip("shoal.privacy.he")
    x, w = uploads()
    vanish = set(range(0, N, 10 if rate == 0.1 else 3)) if rate else set()  # 2 or 7 of 20
    enc = FixedPoint(clip=CLIP, value_bits=BITS, max_weight=MAX_W)
    result = run_secagg_round({i: x[i] for i in range(N)}, {i: int(w[i]) for i in range(N)},
                              SecAggConfig(enc, None, N // 2 + 1),
                              {stage: vanish} if vanish else None, np.random.default_rng(1))
    # who is in: everyone but those gone before sending their masked input
    gone_before_input = vanish if stage is not Stage.MASKED_INPUT else set()
    assert result.included == frozenset(range(N)) - gone_before_input
    oracle = plain_mean(x, w, result.included)
    step = 2 * CLIP / (2**BITS - 1)
    np.testing.assert_allclose(result.mean, oracle, atol=2 * step)
    # CKKS over the same uploads: the clients that uploaded are the sum
    holder = he.KeyHolder(he.CkksParams())
    ctx = he.public_context(holder.public_context())
    acc = he.CkksSum(ctx, holder.params, DIM, clip=CLIP, max_weight=MAX_W)
    for i in sorted(result.included):
        acc.add(he.encrypt_update(ctx, x[i], float(w[i]), clip=CLIP, slots=holder.params.slots))
    total, weight = holder.decrypt_sum(acc.result(), DIM, acc.count, round=1)
    np.testing.assert_allclose(total / weight, oracle, atol=1e-7)


@pytest.mark.parametrize("stage", [*STAGES, None], ids=lambda s: s.value if s else "any")
def test_the_simulated_secagg_sum_rule_drops_clients_at_the_configured_stage(stage):
    x, w = uploads(seed=5)
    rule = SecAggAggregation(clip=CLIP, value_bits=BITS, max_weight=MAX_W, neighbours=-1,
                             threshold=N // 2 + 1, dropout=0.3, corrupt_rate=0.05,
                             rng_for_round=lambda r: np.random.default_rng(100 + r),
                             dropout_stage=stage)
    run = Pipeline(sum_rule=rule).begin((), 3, DIM)
    run.fold(x, w.astype(np.float64))
    mean, _, info = run.finish()
    # the documented draw: each client vanishes with probability `dropout`, in id order, then
    # (stage None) at a stage drawn uniformly from the four
    rng = np.random.default_rng(103)
    drops = [i for i in range(N) if rng.random() < 0.3]
    at = {i: stage if stage is not None else STAGES[int(rng.integers(4))] for i in drops}
    early = {i for i, s in at.items() if s is not Stage.MASKED_INPUT}
    assert info.info["secagg_dropped"] == len(drops) > 0
    assert info.info["secagg_included"] == N - len(early)
    for s in STAGES:
        assert info.info.get(f"secagg_dropped_at_{s.value}", 0) == \
            sum(1 for v in at.values() if v is s)
    step = 2 * CLIP / (2**BITS - 1)
    np.testing.assert_allclose(mean, plain_mean(x, w, set(range(N)) - early), atol=2 * step)
