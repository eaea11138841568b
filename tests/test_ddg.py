"""Distributed DP: the distributed discrete Gaussian inside SecAgg+ (Kairouz, Liu and Steinke,
ICML 2021). Oracles: dp-accounting's Gaussian and zCDP events, the exact Rényi divergence of
a sum of discrete Gaussians computed from its pmf, the clients' own clipped updates, and the
discrete Gaussian's variance."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from shoal.build import pipeline_from_config, secagg_from_config, secure_sum_from_config
from shoal.config import load_config
from shoal.errors import ConfigError, PrivacyError, UpdateRejected
from shoal.experiment import Experiment
from shoal.pipeline import Sum
from shoal.privacy.accountant import PrivacyLedger, RoundEvent
from shoal.privacy.csprng import CryptoRandom
from shoal.privacy.ddg import DistributedDiscreteGaussian
from shoal.privacy.ddg_accounting import ORDERS, DistributedEvent, ddg_rdp, tau
from shoal.privacy.rotated_encoding import (RotatedQuantization, decode_sum,
                                            plan_quantization, privatize_and_encode,
                                            rounding_bound)
from shoal.privacy.rotation import rotation_seed
from shoal.privacy.secagg_driver import run_secagg_ring
from shoal.privacy.secagg_messages import SecAggAborted, SecAggParams, Stage
from shoal.privacy.secagg_rounds import SecAggAggregation

SEED = bytes(range(32))
DELTA = 1e-5


def _dp_accounting_epsilon(event, count: int, replace_one: bool = True) -> float:
    rel = NeighboringRelation.REPLACE_ONE if replace_one else NeighboringRelation.ADD_OR_REMOVE_ONE
    acc = RdpAccountant(list(ORDERS), rel)
    acc.compose(dp_event.SelfComposedDpEvent(event, count))
    return acc.get_epsilon(DELTA)


# ------------------------------------------------------------------------------ accounting


def _log_pmf_of_sum(sigma: float, shares: int, half_width: int = 60) -> np.ndarray:
    """log P(X_1 + ... + X_n = k) for discrete Gaussians X_i, k = -n w..n w, by convolving
    in log space (the tails underflow in linear space)."""
    k = np.arange(-half_width, half_width + 1, dtype=np.float64)
    one = -k**2 / (2 * sigma**2)
    one -= np.logaddexp.reduce(one)
    total = one
    for _ in range(shares - 1):
        m = total.size + one.size - 1
        pairs = np.full((total.size, m), -np.inf)
        for i, lp in enumerate(total):
            pairs[i, i:i + one.size] = lp + one
        total = np.logaddexp.reduce(pairs, axis=0)
    return total


@pytest.mark.parametrize("sigma,shares", [(0.6, 2), (0.6, 3), (1.0, 3), (0.8, 5)])
def test_the_bound_holds_for_the_exact_divergence_of_a_sum_of_discrete_gaussians(sigma, shares):
    """In one dimension the sum of n discrete Gaussians has a pmf we can convolve exactly; its
    Rényi divergence against itself shifted by 1 must stay under the paper's bound (and is
    visibly above the Gaussian's alpha/(2 n sigma^2) at small sigma: the tau term matters)."""
    total = _log_pmf_of_sum(sigma, shares)
    log_p, log_q = total[1:], total[:-1]  # P(Z = k) and P(Z + 1 = k)
    orders = np.arange(2, 12)
    exact = np.array([np.logaddexp.reduce(a * log_p + (1 - a) * log_q) / (a - 1)
                      for a in orders])
    bound = ddg_rdp(orders, 1 / (math.sqrt(shares) * sigma), tau(sigma, shares), 1)
    assert np.all(exact <= bound + 1e-12)
    gaussian = orders / (2 * shares * sigma**2)
    if sigma < 0.7:
        assert np.any(exact > gaussian * 1.001)


@pytest.mark.parametrize("z", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("m,n", [(10, 100), (100, 1000), (20, 20)])
def test_with_negligible_tau_the_accountant_is_dp_accountings_gaussian(z, m, n):
    """At the noise scales a run uses (sigma >= 4 grid steps: tau ~ 1e-68) the accountant's
    epsilon is dp-accounting's for fixed-size sampling of the Gaussian it approaches:
    SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z/2)) under replace-one."""
    event = DistributedDiscreteGaussian(z, 1.0, m).event(m, n)
    ledger = PrivacyLedger("rdp").record(event, 30)
    oracle = _dp_accounting_epsilon(
        dp_event.SampledWithoutReplacementDpEvent(n, m, dp_event.GaussianDpEvent(z / 2)), 30)
    assert ledger.epsilon(DELTA) == pytest.approx(oracle, rel=1e-9)


def test_the_tau_term_raises_epsilon_between_two_zcdp_oracles():
    """Unsampled (every client every round) at a small noise scale: the bound's epsilon lies
    between dp-accounting's Gaussian (tau = 0) and each zCDP relaxation of the bound's two
    terms, and strictly above the Gaussian."""
    z, h, sigma, d = 2.0, 5, 0.6, 1000
    event = DistributedEvent(noise_multiplier=z, honest=h, grid_sigma=sigma, dim=d,
                             sample_size=40, population=40)
    eps = PrivacyLedger("rdp").record(event, 10).epsilon(DELTA)
    t, l2 = tau(sigma, h), 2 / z  # replace-one: twice the sensitivity
    gaussian = _dp_accounting_epsilon(dp_event.GaussianDpEvent(z / 2), 10)
    first = _dp_accounting_epsilon(dp_event.ZCDpEvent(rho=l2**2 / 2, xi=t * d), 10)
    third = _dp_accounting_epsilon(dp_event.ZCDpEvent(rho=(l2 + t * math.sqrt(d)) ** 2 / 2), 10)
    assert gaussian < eps <= min(first, third) + 1e-9


def test_the_ledger_keeps_distributed_rounds_apart_and_round_trips():
    event = DistributedDiscreteGaussian(1.0, 0.5, 10).event(10, 100)
    ledger = PrivacyLedger("rdp").record(event, 3)
    again = PrivacyLedger.from_dict(ledger.to_dict())
    assert again == ledger and again.epsilon(DELTA) == ledger.epsilon(DELTA) > 0
    with pytest.raises(PrivacyError, match="cannot compose"):
        ledger.record(RoundEvent.fixed_size(10, 100, 1.0))
    with pytest.raises(PrivacyError, match="Rényi"):
        PrivacyLedger("pld").record(event)


# ------------------------------------------------------------------------------ the client step


def test_conditional_rounding_keeps_every_rounded_vector_within_its_bound():
    d, clip = 4000, 1.0
    x = np.random.default_rng(0).normal(size=d)
    x *= clip / np.linalg.norm(x)
    plan = plan_quantization(d, 10, 10, clip)  # a coarse grid: rounding adds a lot of norm
    loose = RotatedQuantization(dim=d, clip=clip, bits=10, gamma=plan.gamma)

    def norms(params: RotatedQuantization) -> np.ndarray:
        out = []
        for i in range(60):
            v = privatize_and_encode(x, SEED, params, np.random.default_rng(i))[:-1]
            s = v.astype(np.int64)
            s[s >= 512] -= 1024
            out.append(math.sqrt(float(s @ s)))
        return np.array(out)

    plain = norms(loose)
    # the paper's bound at beta = 1/2 holds for plain rounding at least half the time
    assert np.mean(plain > rounding_bound(clip / plan.gamma, plan.padded, beta=0.5)) <= 0.5
    bound = float(np.median(plain))  # half of plain rounding's draws exceed this
    tight = RotatedQuantization(dim=d, clip=clip, bits=10, gamma=plan.gamma, norm_bound=bound)
    assert norms(tight).max() <= bound
    assert (plain > bound).any()  # the condition is what keeps the bound


def test_each_client_adds_a_discrete_gaussian_share_of_the_planned_variance():
    """n clients with zero updates: the decoded sum is pure noise, mean 0 and variance
    n (sigma gamma)^2 per coordinate (the rotation is orthogonal)."""
    d, n = 8192, 10
    mech = DistributedDiscreteGaussian(noise_multiplier=1.0, clip_norm=1.0, honest=n)
    enc = mech.plan(16).for_round(d, n, SEED)
    p = enc.params
    assert p.noise_std >= 4 and p.norm_bound == pytest.approx((1 + mech.slack) / p.gamma)
    total = sum(privatize_and_encode(np.zeros(d), SEED, p, CryptoRandom()).astype(np.uint64)
                for _ in range(n))
    noise, count = decode_sum((total % (1 << 16)).astype(np.uint32), SEED, p)
    want = n * (p.noise_std * p.gamma) ** 2
    assert count == n
    assert want == pytest.approx(mech.sum_noise_std(n) ** 2, rel=1e-12)
    assert noise.var() == pytest.approx(want, rel=0.06)
    assert abs(noise.mean()) < 4 * math.sqrt(want / d)


def _ddg_rule(honest: int, colluding: int, dropout: float, stage: Stage,
              z: float = 1.0) -> SecAggAggregation:
    mech = DistributedDiscreteGaussian(z, 1.0, honest, colluding)
    return SecAggAggregation(clip=1.0, value_bits=16, max_weight=1, neighbours=-1,
                             threshold=0, dropout=dropout, corrupt_rate=0.0,
                             rng_for_round=lambda r: np.random.default_rng(100 + r),
                             dropout_stage=stage, rotated=mech.plan(16),
                             rotation_seed=lambda r: SEED, min_inputs=mech.min_inputs)


def test_the_server_only_ever_unmasks_a_noised_sum():
    """What the secure sum returns is the clients' clipped sum plus noise of the planned
    variance, far above rounding's: the server never holds the noiseless sum."""
    n, d = 10, 4096
    x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32) * 0.05
    rule = _ddg_rule(n, 0, 0.0, Stage.SHARE_KEYS)
    run = rule.begin(d, 1)
    run.add(x, np.ones(n))
    total = run.finish()
    assert total.info["ddg_noise_shares"] == n == total.weight
    x64 = x.astype(np.float64)
    clipped = x64 * np.minimum(1, 1 / np.linalg.norm(x64, axis=1, keepdims=True))
    err = total.vector - clipped.sum(0)
    want = DistributedDiscreteGaussian(1.0, 1.0, n).sum_noise_std(n) ** 2
    assert err.var() == pytest.approx(want, rel=0.08)


def test_a_round_with_fewer_than_h_plus_f_inputs_releases_nothing():
    n, d = 10, 256
    x = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
    # h = 8 honest + f = 1 colluding: 9 inputs needed; dropping 2 before their input aborts
    rule = _ddg_rule(8, 1, 0.35, Stage.SHARE_KEYS)
    drops = [i for i in range(n) if np.random.default_rng(101).random() < 0.35]
    replay = np.random.default_rng(101)
    drops = [i for i in range(n) if replay.random() < 0.35]
    assert len(drops) >= 2
    run = rule.begin(d, 1)
    run.add(x, np.ones(n))
    with pytest.raises(SecAggAborted, match="fewer than the 9"):
        run.finish()
    # the same dropouts after their masked input: their noise is in the sum, it releases
    late = _ddg_rule(8, 1, 0.35, Stage.MASKED_INPUT).begin(d, 1)
    late.add(x, np.ones(n))
    assert late.finish().info["ddg_noise_shares"] == n


def test_devices_can_run_the_client_step_with_the_session_derived_seed():
    """The deployment contract: each device derives the rotation seed from the round's
    SecAgg session nonce, runs privatize_and_encode with its own CSPRNG, and masks the result;
    the server unmasks and decodes with the same seed."""
    n, d, session = 6, 700, bytes(range(100, 132))
    mech = DistributedDiscreteGaussian(0.5, 1.0, n)
    enc = mech.plan(16).for_round(d, n, rotation_seed(session))
    p = enc.params
    x = np.random.default_rng(2).normal(size=(n, d)) * 0.02
    vectors = {i: privatize_and_encode(x[i], rotation_seed(session), p, CryptoRandom())
               for i in range(n)}
    params = SecAggParams(neighbours=n - 1, threshold=n // 2 + 1, bits=p.bits, length=p.length)
    total, included = run_secagg_ring(vectors, params, session=session, min_inputs=n)
    assert included == frozenset(range(n))
    vector, count = decode_sum(total, rotation_seed(session), p)
    assert count == n
    err = vector - x.sum(0)
    assert np.linalg.norm(err) < 6 * mech.sum_noise_std(n) * math.sqrt(d)


# ------------------------------------------------------------------------------ the stage and runs

SYNTH = {"data.dataset": "synthetic", "data.clients": 20, "model.name": "logreg",
         "sampling.per_round": 8, "client.batch_size": 10, "rounds": 2}
DDG = {"secure_aggregation.enabled": True, "secure_aggregation.encoding": "rotated",
       "privacy.placement": "distributed", "privacy.noise_multiplier": 0.7,
       "privacy.clip_norm": 1.0}


def test_the_stage_refuses_sums_without_noise_shares_and_groups():
    stage = pipeline_from_config(load_config(None, {**SYNTH, **DDG})).stages[0]
    assert stage.name == "distributed_dp"
    run = stage.begin(stage.init(), 1)
    with pytest.raises(PrivacyError, match="noise shares"):
        run.finish(Sum(np.zeros(3), 8.0, 8, {}))
    with pytest.raises(PrivacyError, match="noise shares"):
        run.finish(Sum(np.zeros(3), 7.0, 7, {"ddg_noise_shares": 7.0}))
    with pytest.raises(UpdateRejected, match="noise share"):
        run.partial(np.zeros((1, 3)), np.ones(1), 4, 1.0)
    total, state = run.finish(Sum(np.ones(3) * 8, 8.0, 8, {"ddg_noise_shares": 8.0}))
    np.testing.assert_allclose(total.mean(), np.ones(3))  # over the cohort of 8
    assert total.info["epsilon"] == state.ledger.epsilon(1e-5) > 0


def test_a_simulated_run_accounts_the_distributed_mechanism():
    """Two rounds: every committed round holds the noise of the 8 clients, and epsilon is
    the distributed accountant's, which here equals dp-accounting's fixed-size Gaussian and
    central DP's at the same z (central uses dp-accounting's fractional orders too)."""
    result = Experiment(load_config(None, {**SYNTH, **DDG})).run()
    central = Experiment(load_config(None, {**SYNTH, "privacy.placement": "central",
                                            "privacy.noise_multiplier": 0.7,
                                            "privacy.clip_norm": 1.0})).run()
    oracle = _dp_accounting_epsilon(
        dp_event.SampledWithoutReplacementDpEvent(20, 8, dp_event.GaussianDpEvent(0.35)), 2)
    rec = result.records[-1].privacy
    assert rec["ddg_noise_shares"] == 8 and rec["secagg_ring_bits"] == 16
    assert rec["epsilon"] == pytest.approx(oracle, rel=1e-9)
    assert rec["epsilon"] == pytest.approx(central.records[-1].privacy["epsilon"], rel=1e-3)
    assert rec["noise_std"] == pytest.approx(0.7 * 1.0 * (1 + 1 / 64) / 8)


@pytest.mark.parametrize("change,key", [
    ({"secure_aggregation.enabled": False}, "privacy.placement"),
    ({"secure_aggregation.encoding": "fixed_point"}, "privacy.placement"),
    ({"secure_aggregation.protocol": "ckks"}, "privacy.placement"),
    ({"sampling.method": "poisson"}, "sampling.method"),
    ({"privacy.honest_clients": 8, "privacy.colluding_clients": 1}, "privacy.honest_clients"),
])
def test_combinations_distributed_dp_cannot_run_are_refused(change, key):
    with pytest.raises(ConfigError) as exc:
        pipeline_from_config(load_config(None, {**SYNTH, **DDG, **change}))
    assert exc.value.key == key


def test_a_deployment_folds_only_the_devices_noised_secure_sums():
    """Deployed, the devices run SecAgg+ and the stage receives each round's unmasked sum as
    a group: it folds a group of at least h + f clients clipped to C and weighing 1, and
    counts its noise shares; without a secure carrier the configuration is refused."""
    cfg = load_config(None, {**SYNTH, **DDG})
    with pytest.raises(ConfigError, match="secure aggregation"):
        pipeline_from_config(cfg, deployed=True, secure_in_transport=False)
    stage = pipeline_from_config(cfg, deployed=True, secure_in_transport=True).stages[0]
    assert stage.noised_groups and stage.client_clip_norm(stage.init()) == 1.0
    assert secagg_from_config(cfg).rotated.noise_std > 0  # what devices are told to add
    mean = np.full((1, 3), 0.25)
    for clients, weight, clip in ((7, 7.0, 1.0),  # fewer than h + f = 8
                                  (8, 8.0, None), (8, 8.0, 2.0),  # no or a looser clip
                                  (8, 20.0, 1.0)):  # weighed by examples
        with pytest.raises(UpdateRejected, match="not_noised|at least"):
            stage.begin(stage.init(), 1).partial(mean, np.array([weight]), clients, clip)
    run = stage.begin(stage.init(), 1)
    rows, weights = run.partial(mean, np.array([8.0]), 8, 1.0)
    total, state = run.finish(Sum(rows[0] * weights[0], weights[0], 8, {}))
    np.testing.assert_allclose(total.mean(), mean[0])  # over the cohort of 8
    assert total.info["epsilon"] == state.ledger.epsilon(1e-5) > 0
