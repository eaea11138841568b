"""Canary rollout: stable buckets, the statistical rule against an independent Welch test,
automatic promote / rollback through the real model store with an audit log, and the
simulated scenario (a candidate trained on corrupted labels is rolled back and never reaches
a device outside the canary; a better one is promoted)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from scipy import stats

from shoal.config import load_config
from shoal.data import partition, FederatedData
from shoal.errors import ConfigError
from shoal.evaluation import EvalTally
from shoal.events import EvalReports
from shoal.lifecycle.audit import AuditLog, read_audit
from shoal.lifecycle.canary import Canary, CanaryRule, canary_bucket, in_canary
from shoal.params import ParamSpec
from shoal.scenarios.canary import canary_scenario
from shoal.store import Checkpoint, ModelStore
from shoal.strategy import ServerState


def test_buckets_are_a_stable_hash_and_fractions_nest():
    # independent oracle: the documented formula
    digest = hashlib.sha256(b"s1:device-7").digest()
    assert canary_bucket("device-7", "s1") == int.from_bytes(digest[:8], "big") / 2 ** 64
    ids = [f"d{i}" for i in range(20_000)]
    small, large = in_canary(ids, 0.05, "s"), in_canary(ids, 0.2, "s")
    assert abs(small.mean() - 0.05) < 0.006 and abs(large.mean() - 0.2) < 0.012
    assert not (small & ~large).any()  # raising the fraction only adds devices
    other = in_canary(ids, 0.2, "t")
    assert abs((large & other).mean() - 0.04) < 0.01  # a new salt draws a new canary


def test_the_rule_is_welchs_test_and_decides_as_stated():
    rng = np.random.default_rng(0)
    rule = CanaryRule(min_clients=30, alpha=0.05, margin=0.0, max_rounds=5, trim=0.0)
    prod = rng.normal(1.0, 0.3, 200)
    worse = rng.normal(1.2, 0.4, 150)
    v = rule.judge(worse, prod, rounds=1)
    # the rule bounds every value to [0, cap] first (a loss is never negative)
    t = stats.ttest_ind(np.clip(worse, 0, 10), np.clip(prod, 0, 10), equal_var=False,
                        alternative="greater")
    assert v.z == pytest.approx(t.statistic, rel=1e-9)
    assert v.p_worse == pytest.approx(t.pvalue, abs=0.002)  # normal vs t at ~300 dof
    assert v.decision == "rollback" and "worse" in v.reason
    better = rng.normal(0.9, 0.3, 150)
    v = rule.judge(better, prod, rounds=1)
    assert v.decision == "promote" and v.p_not_worse < 0.05
    same = prod[:100] + rng.normal(0, 1e-3, 100)
    assert rule.judge(same, prod[100:], rounds=1).decision == "wait"
    assert rule.judge(same, prod[100:], rounds=5).decision == "rollback"
    assert rule.judge(better[:10], prod, rounds=1).decision == "wait"  # minimum sample
    # a margin lets a slightly worse candidate pass as not worse
    slight = prod[:150] + 0.01
    assert CanaryRule(margin=0.1).judge(slight, prod, 1).decision == "promote"
    with pytest.raises(ConfigError):
        CanaryRule(min_clients=1)
    with pytest.raises(ConfigError):
        CanaryRule(alpha=0.7)


def test_the_default_rule_is_yuens_trimmed_test_on_bounded_values():
    """Oracle: SciPy's Yuen-Welch test (``ttest_ind(trim=...)``) on the values clipped to
    [0, cap] by hand."""
    rng = np.random.default_rng(3)
    rule = CanaryRule(min_clients=30)
    assert (rule.cap, rule.trim) == (10.0, 0.1)
    cand = np.concatenate([rng.normal(1.3, 0.3, 57), [-5.0, 40.0, np.inf]])
    prod = rng.normal(1.0, 0.4, 83)
    v = rule.judge(cand, prod, rounds=1)
    clipped = np.concatenate([cand[:57], [0.0, 10.0]])  # the infinite value is dropped
    t = stats.ttest_ind(clipped, prod, equal_var=False, trim=0.1, alternative="greater")
    assert v.z == pytest.approx(t.statistic, rel=1e-9)
    assert v.mean_candidate == pytest.approx(stats.trim_mean(clipped, 0.1), rel=1e-12)
    assert v.n_candidate == 59 and v.decision == "rollback"
    for bad in ({"cap": 0.0}, {"cap": math.inf}, {"trim": 0.5}, {"trim": -0.1}):
        with pytest.raises(ConfigError):
            CanaryRule(**bad)


@pytest.mark.parametrize("liars", [0, 1, 2, 3, 4])
def test_colluding_devices_cannot_promote_a_worse_candidate(tmp_path, liars):
    """The reviewer's scenario: a clearly worse candidate (loss 2.5 against 1.5, 30 clients
    an arm); ``liars`` canary devices report a loss of -1e6 and as many production devices
    report +1e6. The plain Welch rule promoted it from 3 liars on (z = -1.8); bounded,
    trimmed values still roll it back, through the real store."""
    rng = np.random.default_rng(0)
    store = _store(tmp_path)
    audit = AuditLog()
    canary = Canary(store, 2, 0.1, now=10.0, rule=CanaryRule(min_clients=30), audit=audit)
    prod = rng.normal(1.5, 0.1, 30)
    cand = rng.normal(2.5, 0.1, 30)
    honest = cand.copy()
    cand[:liars], prod[:liars] = -1e6, 1e6
    canary.record(_result(1, range(100, 130), prod))
    canary.record(_result(2, range(30), cand))
    verdict = canary.decide(11.0)
    assert verdict.decision != "promote" and store.production().id == 1
    if liars <= 3:  # up to floor(0.1 x 30) per arm and side are trimmed away
        assert verdict.decision == "rollback" and verdict.z > 1.645
        assert store.get(2).status == "rolled_back"
    else:  # more only widen the standard error: no verdict yet (rolled back at max_rounds)
        assert verdict.decision in ("rollback", "wait")
    # what the devices claimed beyond [0, cap] is on record
    assert [e["clipped"] for e in audit.entries if e["action"] == "canary_evaluated"] == \
        [liars, liars]
    # the bound the docs state: k liars move an arm's trimmed mean by at most k cap / h
    h = 30 - 2 * 3
    assert abs(verdict.mean_candidate - stats.trim_mean(honest, 0.1)) <= liars * 10.0 / h
    store.close()


def _result(version, ids, losses, task_id=1):
    tally = EvalTally(task_id, version, "", np.asarray(ids))
    tally.fold(EvalReports(np.asarray(ids), np.ones(len(ids), np.int64),
                           {"loss": np.asarray(losses, float)}))
    return tally.close("complete")


def _store(tmp_path):
    store = ModelStore(tmp_path)
    for i in (1, 2):
        ck = Checkpoint(ServerState(np.full(3, i, np.float32), version=i),
                        ParamSpec.from_shapes({"w": (3,)}), seed=0)
        store.commit(ck, round=i, metrics={}, now=float(i), parent=i - 1 or None,
                     status="production" if i == 1 else "candidate")
    return store


@pytest.mark.parametrize("worse", [True, False])
def test_a_canary_moves_the_real_store_and_audits_every_step(tmp_path, worse):
    store = _store(tmp_path / "s")
    audit = AuditLog(tmp_path / "audit.jsonl")
    canary = Canary(store, 2, 0.1, now=10.0, rule=CanaryRule(min_clients=20), audit=audit)
    devices = [f"d{i}" for i in range(500)]
    inside = [d for d in devices if canary_bucket(d, "canary-v2") < 0.1]
    assert {canary.serves(d) for d in inside} == {2}
    assert {canary.serves(d) for d in devices if d not in inside} == {1}
    rng = np.random.default_rng(1)
    canary.record(_result(1, range(100, 130), rng.normal(1.0, 0.1, 30)))
    assert canary.decide(11.0).decision == "wait"  # the candidate has no evaluation yet
    # the same clients reported twice count once
    canary.record(_result(2, range(10), rng.normal(1.0, 0.1, 10)))
    canary.record(_result(2, range(10), rng.normal(1.0, 0.1, 10)))
    assert canary.decide(12.0).n_candidate == 10
    shift = 0.3 if worse else -0.3
    canary.record(_result(2, range(10, 40), rng.normal(1.0 + shift, 0.1, 30)))
    verdict = canary.decide(13.0)
    assert verdict.decision == ("rollback" if worse else "promote")
    assert canary.decide(14.0) is verdict  # decided once
    statuses = {v.id: v.status for v in store.list()}
    if worse:
        assert statuses == {1: "production", 2: "rolled_back"}
        assert store.history()[-1].action == "reject" and store.production().id == 1
    else:
        assert statuses == {1: "candidate", 2: "production"}
        assert store.history()[-1].action == "promote"
    assert store.history()[-1].reason.startswith("canary: ")
    # after the verdict every device gets production (the candidate only if promoted)
    assert {canary.serves(d) for d in devices} == {1 if worse else 2}
    assert not canary.in_canary(devices).any()
    actions = [e["action"] for e in read_audit(tmp_path / "audit.jsonl")]
    assert actions[0] == "canary_start" and actions.count("canary_evaluated") == 4
    assert actions[-1] == ("canary_rollback" if worse else "canary_promote")
    assert read_audit(tmp_path / "audit.jsonl") == audit.entries
    with pytest.raises(ConfigError):
        canary.record(_result(7, [1], [1.0]))
    store.close()


def test_a_canary_needs_a_production_version_and_a_candidate(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(ConfigError, match="not a candidate"):
        Canary(store, 1, 0.1, now=0.0)
    with pytest.raises(ConfigError, match="fraction"):
        Canary(store, 2, 1.5, now=0.0)
    store.close()


@pytest.mark.parametrize("corrupt", [True, False])
def test_simulated_canary_rolls_back_a_corrupted_candidate_and_promotes_a_better_one(
        tmp_path, fmnist, corrupt):
    train, test = fmnist
    cfg = load_config(overrides={"rounds": 10})
    parts = partition(train.y, 100, "dirichlet", alpha=0.5, seed=0)
    data = FederatedData(train, test, tuple(parts))
    audit = AuditLog()
    run = canary_scenario(cfg, data, str(tmp_path), corrupt=corrupt, candidate_rounds=20,
                          fraction=0.3, rule=CanaryRule(min_clients=20, margin=0.02),
                          cohort=15, audit=audit)
    assert run.verdict.decision == ("rollback" if corrupt else "promote")
    # devices outside the canary never received the candidate
    assert run.sent_candidate and run.sent_candidate <= run.canary_clients
    assert not run.sent_production & run.canary_clients
    reader = ModelStore(tmp_path, readonly=True)
    assert reader.production().id == (1 if corrupt else 2)
    assert reader.get(2).status == ("rolled_back" if corrupt else "production")
    assert reader.get(2).parent == 1 and reader.get(2).rounds == (11, 30)
    if corrupt:  # the corrupted candidate is much worse centrally too
        assert run.accuracy[2] < run.accuracy[1] - 0.3
    assert math.isfinite(run.verdict.z)
    assert [e["action"] for e in audit.entries][-1] == f"canary_{run.verdict.decision}"


def test_a_canary_does_not_promote_over_a_production_moved_meanwhile(tmp_path):
    from shoal.store.model_versions import PointerMoved

    store = _store(tmp_path)
    ck = Checkpoint(ServerState(np.full(3, 3, np.float32), version=3),
                    ParamSpec.from_shapes({"w": (3,)}), seed=0)
    store.commit(ck, round=3, metrics={}, now=3.0, parent=1)
    audit = AuditLog()
    canary = Canary(store, 2, 0.1, now=10.0, rule=CanaryRule(min_clients=20), audit=audit)
    rng = np.random.default_rng(0)
    canary.record(_result(1, range(100, 130), rng.normal(1.0, 0.1, 30)))
    canary.record(_result(2, range(30), rng.normal(0.5, 0.1, 30)))
    store.promote(3, now=11.0, reason="by hand")  # an operator moved production
    with pytest.raises(PointerMoved):
        canary.decide(12.0)
    assert store.production().id == 3 and store.get(2).status == "candidate"
    # the audit log says the promotion was refused, never that it happened; the canary is
    # still undecided (it keeps serving its arms)
    actions = [e["action"] for e in audit.entries]
    assert "canary_promote" not in actions and actions[-1] == "canary_promote_refused"
    assert "PointerMoved" in audit.entries[-1]["error"]
    assert canary.verdict is None and not canary.decided
    assert [h.action for h in store.history()][-1] == "promote"
    assert store.history()[-1].version == 3  # the operator's move, not the canary's
    store.close()
