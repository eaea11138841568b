"""Differential privacy inside simulated runs: the ledger, the budget and the placements."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shoal.cli import main
from shoal.config import load_config
from shoal.coordinator import Coordinator
from shoal.pipeline import Pipeline
from shoal.runner import run_round
from shoal.sampling import PoissonSampler
from shoal.errors import BudgetExhausted
from shoal.privacy import CentralDP
from shoal.privacy.accountant import RoundEvent
from shoal.privacy.stages import BudgetPolicy, CentralDPStage
from shoal.experiment import Experiment
from shoal.strategy import FedAvg

pytest.importorskip("dp_accounting")


def _oracle_eps(q, z, rounds, delta):
    """epsilon straight from dp-accounting (independent of shoal's wrapper)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return acc.get_epsilon(delta)


SYNTH = {"data.dataset": "synthetic", "data.clients": 40, "model.name": "logreg",
         "client.lr": 0.05, "client.batch_size": 10, "sampling.method": "poisson",
         "sampling.q": 0.25}


def test_central_dp_run_reports_the_accountants_epsilon_every_round():
    cfg = load_config(None, {**SYNTH, "rounds": 4, "privacy.placement": "central",
                             "privacy.noise_multiplier": 1.3, "privacy.clip_norm": 0.5})
    result = Experiment(cfg).run()
    eps = [r.privacy["epsilon"] for r in result.records if r.round > 0]
    assert len(eps) == 4
    for t, e in enumerate(eps, start=1):
        assert e == pytest.approx(_oracle_eps(0.25, 1.3, t, 1e-5), rel=1e-9)
    assert all(r.privacy["clip_norm"] == 0.5 for r in result.records if r.round > 0)
    assert result.summary()["epsilon"] == eps[-1]


def test_central_dp_noise_is_reproducible_and_changes_the_model():
    base = {**SYNTH, "rounds": 2, "privacy.clip_norm": 0.5}
    plain = Experiment(load_config(None, base)).run().state.params
    dp_cfg = load_config(None, {**base, "privacy.placement": "central",
                                "privacy.noise_multiplier": 1.0})
    a = Experiment(dp_cfg).run().state.params
    b = Experiment(dp_cfg).run().state.params
    np.testing.assert_array_equal(a, b)  # seeded noise in simulation
    assert not np.allclose(a, plain)


def test_deployed_central_noise_is_not_reproducible_from_the_config():
    """Simulation draws noise from the run seed (reproducible); a deployment from os.urandom,
    so nobody holding the config can recompute and subtract it."""
    from shoal.build import pipeline_from_config

    def dp_stage(deployed: bool):
        (stage,) = pipeline_from_config(cfg, deployed=deployed).stages
        return stage

    cfg = load_config(None, {**SYNTH, "privacy.placement": "central"})
    sim, dep = dp_stage(False), dp_stage(True)
    np.testing.assert_array_equal(sim.rng_for_step(3).standard_normal(8),
                                  dp_stage(False).rng_for_step(3).standard_normal(8))
    first = dep.rng_for_step(3).standard_normal(8)
    again = dp_stage(True)
    assert not np.array_equal(first, dep.rng_for_step(3).standard_normal(8))
    assert not np.array_equal(first, again.rng_for_step(3).standard_normal(8))


def test_deployed_dp_cohorts_are_not_predictable_from_the_config():
    """With DP and a device pool, who is sampled cannot be recomputed from the seed (the
    accountant's amplification by sampling assumes it is hidden); in simulation, and in
    deployments without DP, cohorts stay seeded (exact resume)."""
    from shoal.sim.pool import InProcessPool

    cfg = load_config(None, {**SYNTH, "sampling.method": "uniform", "sampling.per_round": 10,
                             "privacy.placement": "central"})
    sim = Experiment(cfg)
    assert np.array_equal(sim.coordinator.cohort(1), Experiment(cfg).coordinator.cohort(1))
    pool = InProcessPool(sim.pool.trainer, sim.data.client_indices, sim.pool.config, seed=0)
    deployed = Experiment(cfg, sim.data, pool=pool)
    draws = {tuple(deployed.coordinator.cohort(1)) for _ in range(5)}
    assert len(draws) > 1  # 10 of 40 clients: five equal draws would have chance ~1e-36
    plain = load_config(None, {**SYNTH, "sampling.method": "uniform",
                               "sampling.per_round": 10})
    seeded = Experiment(plain, sim.data, pool=pool)
    assert np.array_equal(seeded.coordinator.cohort(1), seeded.coordinator.cohort(1))


def test_budget_refuses_a_plan_that_would_exceed_it():
    cfg = load_config(None, {**SYNTH, "rounds": 50, "privacy.placement": "central",
                             "privacy.noise_multiplier": 1.0, "privacy.epsilon_budget": 2.0})
    exp = Experiment(cfg)
    with pytest.raises(BudgetExhausted) as info:
        exp.run()  # before the first round
    assert info.value.budget == 2.0 and info.value.epsilon > 2.0


def test_budget_stops_the_run_before_the_round_that_would_exceed_it():
    q, z, budget = 0.25, 3.0, 0.8  # affords a few rounds, not all
    # brute force: the first round count whose epsilon exceeds the budget
    first_over = next(t for t in range(1, 200) if _oracle_eps(q, z, t, 1e-5) > budget)
    cfg = load_config(None, {**SYNTH, "rounds": first_over + 5, "privacy.placement": "central",
                             "privacy.noise_multiplier": z, "privacy.epsilon_budget": budget,
                             "privacy.on_budget": "stop"})
    result = Experiment(cfg).run()
    assert result.state.version == first_over - 1
    assert result.stopped.startswith(f"privacy budget: round {first_over}")
    assert result.summary()["epsilon"] <= budget
    assert "accuracy" in result.records[-1].eval  # the last model is evaluated and kept


def test_local_dp_clients_noise_their_own_updates():
    cfg = load_config(None, {**SYNTH, "rounds": 2, "privacy.placement": "local",
                             "privacy.noise_multiplier": 0.5, "privacy.clip_norm": 0.1})
    exp = Experiment(cfg)
    result = exp.run()
    assert exp.pool.uplink.local_dp is not None
    eps = result.records[-1].privacy["epsilon"]
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()  # local: sensitivity 2C per release, z/2, composed every round
    acc.compose(dp_accounting.GaussianDpEvent(0.25), 2)
    assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


class _Pool:
    num_clients = 1000

    def __init__(self):
        self.cohorts = []

    def train(self, task, ids):
        self.cohorts.append(ids)
        return iter(())


def test_poisson_sampler_rate_and_noise_only_rounds_commit():
    pool = _Pool()
    stage = CentralDPStage(CentralDP(noise_multiplier=1.0, clip_norm=1.0,
                                     expected_clients=50.0),
                           RoundEvent.poisson(0.05, 1.0), BudgetPolicy(0.0, 1e-5),
                           rng_for_step=lambda r: np.random.default_rng(r))
    coord = Coordinator(FedAvg(), pool.num_clients, PoissonSampler(0.05), seed=0)
    sizes = [len(coord.cohort(r)) for r in range(1, 201)]
    assert 45 < np.mean(sizes) < 55 and np.std(sizes) > 2  # binomial(1000, 0.05)
    state = FedAvg().init(np.zeros(4, np.float32))
    # nobody answers: the noised (zero) sum is released
    new, rec = run_round(FedAvg(), pool, PoissonSampler(0.05), state, seed=0,
                         pipeline=Pipeline([stage]))
    assert rec.committed and rec.accepted == 0 and rec.privacy["epsilon"] > 0
    assert np.all(new.params != 0)


def test_privacy_command_json_matches_dp_accounting(capsys):
    assert main(["privacy", "--q", "0.1", "--noise-multiplier", "1.0", "--rounds", "30",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("epsilon", "delta", "q", "noise_multiplier", "rounds", "accountant"):
        assert key in report
    assert report["epsilon"] == pytest.approx(_oracle_eps(0.1, 1.0, 30, 1e-5), rel=1e-9)
    assert main(["privacy", "--q", "0.1", "--rounds", "30", "--target-epsilon", "3",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["epsilon"] <= 3.0 + 1e-9
    assert _oracle_eps(0.1, report["noise_multiplier"] * 0.99, 30, 1e-5) > 3.0


def test_run_refused_by_budget_exits_2_with_reason(capsys):
    code = main(["run", "--set", "data.dataset=\"synthetic\"", "--clients", "30",
                 "--set", "model.name=\"logreg\"", "--set", "privacy.placement=\"central\"",
                 "--set", "sampling.method=\"poisson\"", "--set", "privacy.epsilon_budget=0.5",
                 "--rounds", "100", "-q"])
    assert code == 2
    assert "over the budget 0.5" in capsys.readouterr().err


def test_a_resume_whose_new_settings_the_budget_cannot_afford_is_refused(tmp_path, capsys):
    """Resume prices the remaining rounds on top of the restored ledger at the new settings:
    refused before any round (exit 2) with what was spent and what is still affordable."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    q, budget = 0.25, 6.0
    sets = [a for k, v in {**SYNTH, "privacy.placement": "central",
                           "privacy.epsilon_budget": budget}.items()
            for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["run", "--rounds", "3", *sets, "--set", "privacy.noise_multiplier=3.0",
                 "--out", str(tmp_path), "--json", "-q"]) == 0
    run_dir = json.loads(capsys.readouterr().out)["run_dir"]

    def eps(low_noise_rounds: int) -> float:  # 3 rounds at z = 3, then some at z = 0.9
        acc = RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(3.0)), 3)
        if low_noise_rounds:
            acc.compose(dp_accounting.PoissonSampledDpEvent(
                q, dp_accounting.GaussianDpEvent(0.9)), low_noise_rounds)
        return acc.get_epsilon(1e-5)

    assert eps(27) > budget  # the resumed plan does not fit...
    affords = max(m for m in range(0, 28) if eps(m) <= budget)
    assert 0 < affords < 27  # ...though some of it would
    code = main(["run", "--rounds", "30", *sets, "--set", "privacy.noise_multiplier=0.9",
                 "--resume", f"{run_dir}/model.npz", "--out", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "already spent in 3 rounds" in err and f"affords {affords} more rounds" in err
    # at the old settings the same resume fits and runs
    assert main(["run", "--rounds", "5", *sets, "--set", "privacy.noise_multiplier=3.0",
                 "--resume", f"{run_dir}/model.npz", "--out", str(tmp_path), "-q"]) == 0
