"""Compressed SecAgg+: updates rotated by the round's shared randomized Hadamard transform and
quantized into an 8-bit ring. Oracles: scipy's Hadamard matrix for the rotation, the plain
mean of the L2-clipped updates over exactly the clients whose input reached the sum, and
today's default fixed-point encoding for the bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.linalg import hadamard

from shoal.build import secagg_from_config, secure_sum_from_config
from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.experiment import Experiment
from shoal.privacy.rotated_encoding import RotatedPlan, decode_sum, privatize_and_encode
from shoal.privacy.rotation import Rotation, padded_dim
from shoal.privacy.secagg_driver import SecAggConfig, run_secagg_ring, run_secagg_round
from shoal.privacy.secagg_encoding import FixedPoint, pack_ring
from shoal.privacy.secagg_messages import MaskedInput, Stage

SEED = bytes(range(32))
STAGES = [Stage.SETUP, Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT]


def test_the_rotation_is_a_blockwise_hadamard_transform_of_signed_permuted_coordinates():
    """Every basis vector lands, with a sign, on one column of H_B / sqrt(B) inside one
    block, and distinct coordinates land on distinct (block, column) places: the transform
    is exactly blockdiag(H_B) P S / sqrt(B)."""
    d, block = 40, 16
    rot = Rotation(d, SEED, block=block)
    assert (rot.block, rot.padded) == (16, 48) and padded_dim(d, block) == 48
    h = hadamard(block) / math.sqrt(block)
    places = set()
    for i in range(d):
        y = rot.forward(np.eye(d)[i]).reshape(-1, block)
        (blk,) = np.flatnonzero(np.abs(y).sum(1) > 0)
        col = [c for c in range(block) if np.allclose(np.abs(y[blk] @ h[:, c]), 1.0)]
        assert len(col) == 1
        np.testing.assert_allclose(np.abs(y[blk]), np.abs(h[:, col[0]]), atol=1e-15)
        places.add((blk, col[0]))
    assert len(places) == d


def test_the_rotation_is_orthogonal_and_shared_by_seed():
    x = np.random.default_rng(0).normal(size=1000)
    rot = Rotation(1000, SEED, block=256)
    y = rot.forward(x)
    assert y.shape == (1024,)
    assert math.isclose(np.linalg.norm(y), np.linalg.norm(x), rel_tol=1e-12)
    np.testing.assert_allclose(rot.inverse(y), x, atol=1e-12)
    np.testing.assert_array_equal(Rotation(1000, SEED, block=256).forward(x), y)
    assert not np.allclose(Rotation(1000, bytes(32), block=256).forward(x), y)
    # a spike is flattened to |x| / sqrt(B) in every coordinate of its block
    spike = np.zeros(1000)
    spike[7] = 3.0
    assert np.abs(rot.forward(spike)).max() == pytest.approx(3.0 / 16)


def _uploads(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # norms between 0.2 and 2.5: some are clipped to C = 1, some are not
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(0.2, 2.5, (n, 1))
            ).astype(np.float32)


def _clipped(x: np.ndarray, c: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x * np.minimum(1.0, c / np.linalg.norm(x, axis=1, keepdims=True))


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.value)
def test_the_compressed_secure_sum_is_the_mean_of_the_clipped_updates_that_reached_it(stage,
                                                                                     rate):
    n, d, c = 20, 3000, 1.0
    x = _uploads(n, d)
    encoding = RotatedPlan(bits=8, clip=c).for_round(d, n, SEED)
    vanish = set(range(0, n, 10 if rate == 0.1 else 3)) if rate else set()
    result = run_secagg_round({i: x[i] for i in range(n)}, None,
                              SecAggConfig(encoding, None, n // 2 + 1),
                              {stage: vanish} if vanish else None, np.random.default_rng(1))
    gone_before_input = vanish if stage is not Stage.MASKED_INPUT else set()
    assert result.included == frozenset(range(n)) - gone_before_input
    assert result.total_weight == len(result.included)  # every client weighs 1
    oracle = _clipped(x[sorted(result.included)], c).mean(0)
    err = result.mean - oracle
    gamma, big_d, m = encoding.params.gamma, encoding.params.padded, len(result.included)
    # each client's rounding moves each rotated coordinate by less than gamma: a hard bound
    assert np.linalg.norm(err) < gamma * math.sqrt(big_d)
    # and the rounding is unbiased with variance <= gamma^2 / 4 per client and coordinate
    rms = math.sqrt(float(err @ err) / big_d)
    assert rms < 1.1 * gamma / (2 * math.sqrt(m))
    assert abs(err.mean()) < 5 * rms / math.sqrt(d)


def test_a_compressed_upload_is_at_least_four_times_smaller_than_todays_default():
    """Config S: the 2NN (199,210 parameters), 10 clients. Today's default ring (value_bits 20
    + weight 4096 + 10 clients: 36 bits, 5 bytes) against the rotated 8-bit ring, measured on
    the masked vectors the server really receives."""
    d, n = 199_210, 10
    cfg = load_config(None, {"secure_aggregation.enabled": True})
    default = secure_sum_from_config(cfg)
    rotated = secure_sum_from_config(load_config(None, {"secure_aggregation.enabled": True,
                                                        "secure_aggregation.encoding":
                                                        "rotated"}))
    sizes = []
    rng = np.random.default_rng(0)
    x = rng.normal(scale=1e-3, size=(n, d)).astype(np.float32)
    for rule in (default, rotated):
        enc = rule.encoding if rule.rotated is None else rule.rotated.for_round(d, n, SEED)
        config = rule.config_for(n, enc)
        params = config.params_for(n, d)
        vectors = {i: enc.encode(x[i], 1, params.bits, rng) for i in range(n)}
        inbox: list = []
        run_secagg_ring(vectors, params, server_inbox=inbox)
        masked = [m for m in inbox if isinstance(m, MaskedInput)]
        sizes.append(len(pack_ring(masked[0].masked, params.bits)))
    assert sizes[0] == 5 * (d + 1)  # 996,055 bytes
    assert sizes[1] == padded_dim(d) + 1 == 200_705
    assert sizes[0] / sizes[1] >= 4


def test_the_device_step_is_a_pure_function_of_update_seed_and_parameters():
    """What a device runtime calls: the same update, seed, parameters and coins give the same
    ring vector; the server's decode_sum of several devices' vectors summed mod 2^b is their
    clipped sum (within rounding)."""
    d, n = 500, 6
    x = _uploads(n, d, seed=3)
    params = RotatedPlan(bits=12, clip=1.0).for_round(d, n, SEED).params
    a = privatize_and_encode(x[0], SEED, params, np.random.default_rng(5))
    b = privatize_and_encode(x[0], SEED, params, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint32 and a.shape == (params.length,) and a[-1] == 1
    total = sum(privatize_and_encode(x[i], SEED, params, np.random.default_rng(i)
                                     ).astype(np.uint64) for i in range(n))
    vector, count = decode_sum((total % (1 << 12)).astype(np.uint32), SEED, params)
    assert count == n
    assert np.linalg.norm(vector - _clipped(x, 1.0).sum(0)) < n * params.gamma * math.sqrt(
        params.padded)


def test_a_simulated_run_with_the_rotated_ring_matches_the_unweighted_fixed_point_one():
    """One round of logistic regression on synthetic data: the rotated 16-bit ring and a
    24-bit fixed point with unit weights (max_weight 1) both give the unweighted mean of the
    cohort's updates (none is clipped at norm 50); they agree to the rotated ring's rounding."""
    base = {"data.dataset": "synthetic", "data.clients": 20, "model.name": "logreg",
            "sampling.per_round": 8, "client.batch_size": 10, "rounds": 1,
            "secure_aggregation.enabled": True}
    fixed = Experiment(load_config(None, {**base, "secure_aggregation.max_weight": 1,
                                          "secure_aggregation.value_bits": 24,
                                          "secure_aggregation.clip": 8.0})).run()
    rotated = Experiment(load_config(None, {**base, "secure_aggregation.encoding": "rotated",
                                            "secure_aggregation.ring_bits": 16,
                                            "secure_aggregation.norm_clip": 50.0})).run()
    rec = rotated.records[-1].privacy
    assert rec["secagg_ring_bits"] == 16 and rec["secagg_included"] == 8
    diff = rotated.state.params - fixed.state.params
    d = diff.size
    plan = RotatedPlan(bits=16, clip=50.0).for_round(d, 8, SEED).params
    assert 0 < np.linalg.norm(diff) < plan.gamma * math.sqrt(plan.padded)


def test_configurations_the_rotated_ring_cannot_serve_are_refused():
    on = {"secure_aggregation.enabled": True, "secure_aggregation.encoding": "rotated"}
    with pytest.raises(ConfigError, match="protocol 'secagg'"):
        secure_sum_from_config(load_config(None, {**on, "secure_aggregation.protocol": "ckks"}))
    # what a deployment builds for devices: the plan, bound to each round's session there
    assert secagg_from_config(load_config(None, on)).rotated.bits == 8
    with pytest.raises(ConfigError, match="ring_bits"):
        load_config(None, {**on, "secure_aggregation.ring_bits": 3})
    # a 4-bit ring cannot hold 200 clients' rounding errors
    rule = secure_sum_from_config(load_config(None, {**on,
                                                     "secure_aggregation.ring_bits": 4}))
    with pytest.raises(ConfigError, match="raise secure_aggregation.ring_bits"):
        rule.rotated.for_round(1000, 200, SEED)
    # the fixed point and its deployment are untouched
    assert isinstance(secagg_from_config(load_config(None, {"secure_aggregation.enabled": True}
                                                     )).encoding, FixedPoint)
