"""Robust aggregation rules against brute-force references written from the papers'
definitions (loops over clients and coordinates), and the guarantees a user relies on:
assumptions refused with a clear error, honest-range outputs under attack, FedAvg unchanged
without a defense."""

from __future__ import annotations

import itertools
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.build import pipeline_from_config
from shoal.config import load_config
from shoal.errors import ConfigError, ProtocolError, UpdateRejected
from shoal.pipeline import Pipeline, PlainSum, stage_states_from_dict, stage_states_to_dict
from shoal.robust import (AssumptionBroken, CenteredClipping, HeldRule, NormBound,
                          byzantine_count)
from shoal.robust import rules


# --------------------------------------------------------------------------- references


def ref_median(rows):
    return np.array([statistics.median(rows[:, j].tolist()) for j in range(rows.shape[1])])


def ref_trimmed(rows, b):
    out = []
    for j in range(rows.shape[1]):
        col = sorted(rows[:, j].tolist())
        kept = col[b:len(col) - b]
        out.append(sum(kept) / len(kept))
    return np.array(out)


def ref_krum_scores(rows, f):
    n = len(rows)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((rows[i].astype(np.float64) - rows[j]) ** 2))
                   for j in range(n) if j != i)
        scores.append(sum(d[:n - f - 2]))
    return np.array(scores)


def ref_bulyan(rows, f):
    n = len(rows)
    remaining = list(range(n))
    chosen = []
    for _ in range(n - 2 * f):
        sub = rows[remaining]
        scores = ref_krum_scores(sub, f)
        pick = remaining[int(np.argmin(scores))]
        chosen.append(pick)
        remaining.remove(pick)
    sel = rows[chosen].astype(np.float64)
    beta = len(chosen) - 2 * f
    out = []
    for j in range(rows.shape[1]):
        col = sel[:, j].tolist()
        med = statistics.median(col)
        near = sorted(col, key=lambda v: abs(v - med))[:beta]
        out.append(sum(near) / beta)
    return np.array(out)


def ref_centered_clip(rows, center, tau):
    out = np.zeros(rows.shape[1])
    for x in rows.astype(np.float64):
        diff = x - center
        norm = float(np.sqrt(np.sum(diff ** 2)))
        out += diff * min(1.0, tau / norm) if norm > 0 else diff
    return center + out / len(rows)


# distinct values keep argmin/argsort free of ties, so the references and the rules agree on
# which row wins (ties are broken by index in both, but float rounding may differ)
def matrices(min_rows=1, max_rows=12, max_cols=6):
    return st.integers(min_rows, max_rows).flatmap(lambda n: st.integers(1, max_cols).flatmap(
        lambda d: st.lists(st.integers(-10_000, 10_000), min_size=n * d, max_size=n * d,
                           unique=True).map(
            lambda v: (np.array(v, np.float32) / 1000).reshape(n, d))))


# --------------------------------------------------------------------------- rules vs references


@settings(max_examples=60, deadline=None)
@given(matrices())
def test_median_matches_the_reference(rows):
    np.testing.assert_allclose(rules.coordinate_median(rows), ref_median(rows), atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(matrices(min_rows=1), st.floats(0.0, 0.49))
def test_trimmed_mean_matches_the_reference(rows, beta):
    b = rules.trim_count(len(rows), beta)
    if 2 * b >= len(rows):
        return
    np.testing.assert_allclose(rules.trimmed_mean(rows, b), ref_trimmed(rows, b), atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(matrices(min_rows=4), st.data())
def test_krum_and_multi_krum_match_the_reference(rows, data):
    n = len(rows)
    f = data.draw(st.integers(0, (n - 3) // 2))
    scores = rules.krum_scores(rules.pairwise_sq_distances(rows), f)
    ref = ref_krum_scores(rows, f)
    np.testing.assert_allclose(scores, ref, rtol=1e-9, atol=1e-9)
    if len(set(np.round(ref, 6))) == n:  # no tie between scores
        np.testing.assert_array_equal(rules.krum(rows, f), rows[int(np.argmin(ref))])
        m = data.draw(st.integers(1, n))
        expect = rows[np.argsort(ref)[:m]].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(rules.multi_krum(rows, f, m), expect, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(matrices(min_rows=3, max_rows=15), st.data())
def test_bulyan_matches_the_reference(rows, data):
    n = len(rows)
    f = data.draw(st.integers(0, (n - 3) // 4))
    scores = ref_krum_scores(rows, f)
    if len(set(np.round(scores, 6))) < n:
        return  # a tie: the selection order may legitimately differ
    np.testing.assert_allclose(rules.bulyan(rows, f), ref_bulyan(rows, f), atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(matrices(min_rows=1), st.floats(0.01, 5.0), st.data())
def test_centered_clipping_matches_the_reference(rows, tau, data):
    center = np.array(data.draw(st.lists(st.floats(-3, 3), min_size=rows.shape[1],
                                         max_size=rows.shape[1])))
    run = CenteredClipping(tau).begin(center, 1)
    out, w = run.rows(rows, np.full(len(rows), 7.0))
    assert (w == 1).all()  # every client weighs the same
    np.testing.assert_allclose(out.mean(axis=0), ref_centered_clip(rows, center, tau),
                               atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(matrices(min_rows=1), st.floats(0.01, 10.0))
def test_norm_bound_clips_every_row_to_the_bound_and_keeps_short_ones(rows, bound):
    run = NormBound(bound).begin(NormBound(bound).init(), 1)
    out, w = run.rows(rows, np.arange(1.0, len(rows) + 1))
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    out_norms = np.linalg.norm(out.astype(np.float64), axis=1)
    assert (out_norms <= bound * (1 + 1e-5)).all()
    short = norms <= bound
    np.testing.assert_array_equal(out[short], rows[short])
    np.testing.assert_array_equal(w, np.arange(1.0, len(rows) + 1))  # weights untouched


@settings(max_examples=40, deadline=None)
@given(matrices(min_rows=7), st.sampled_from(["median", "trimmed_mean", "krum", "multi_krum"]),
       st.randoms(use_true_random=False))
def test_every_rule_is_invariant_to_the_order_of_updates(rows, rule, rnd):
    """(Bulyan is not: a tie in distance to the median is broken by arrival order.)"""
    held = HeldRule(rule, 0.1)
    try:
        a, _ = held.aggregate(rows)
    except AssumptionBroken:
        return
    perm = list(range(len(rows)))
    rnd.shuffle(perm)
    b, _ = held.aggregate(rows[perm])
    scores = ref_krum_scores(rows, byzantine_count(len(rows), 0.1))
    if rule in ("krum", "multi_krum") and len(set(np.round(scores, 6))) < len(rows):
        return  # tied scores: index order breaks the tie
    np.testing.assert_allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multi_krum", "bulyan"])
def test_f_arbitrary_updates_cannot_leave_the_honest_range(rule):
    """With f attackers sending huge vectors, each coordinate of the aggregate stays within
    the honest updates' range (the property the rules exist for)."""
    rng = np.random.default_rng(0)
    n, f, d = 23, 5, 50
    honest = rng.normal(size=(n - f, d)).astype(np.float32)
    attack = np.full((f, d), 1e6, np.float32) * rng.choice([-1, 1], size=(f, d))
    rows = np.concatenate([attack, honest])
    out, used_f = HeldRule(rule, f / n).aggregate(rows)
    assert used_f == f
    assert (out >= honest.min(0) - 1e-6).all() and (out <= honest.max(0) + 1e-6).all()


@pytest.mark.parametrize("rule, n, f_ok", [("median", 5, 2), ("krum", 7, 2), ("bulyan", 11, 2),
                                           ("multi_krum", 7, 2)])
def test_a_round_that_breaks_the_assumption_is_refused_with_a_clear_error(rule, n, f_ok):
    rows = np.random.default_rng(1).normal(size=(n, 3)).astype(np.float32)
    fraction = f_ok / n
    HeldRule(rule, fraction).aggregate(rows)  # exactly at the bound: accepted
    with pytest.raises(AssumptionBroken) as err:
        HeldRule(rule, fraction).aggregate(rows[:-1])  # one fewer update, same f
    assert err.value.rule == rule and err.value.n == n - 1 and err.value.f == f_ok
    assert rules.RULES[rule] in str(err.value) and "refused" in str(err.value)
    assert isinstance(err.value, ProtocolError)  # the coordinator aborts the round on it


def test_trimmed_mean_refuses_to_trim_fewer_than_the_attackers():
    with pytest.raises(ConfigError, match="robust.trim"):
        HeldRule("trimmed_mean", 0.2, beta=0.1)
    with pytest.raises(ConfigError, match="robust.trim"):
        load_config(overrides={"robust.rule": "trimmed_mean", "robust.trim": 0.1})


def test_held_rule_in_the_pipeline_holds_every_update_and_refuses_a_group():
    pipe = Pipeline(sum_rule=HeldRule("median", 0.2))
    assert pipe.holds_updates and not Pipeline().holds_updates
    run = pipe.begin(pipe.init(), 1, 4)
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    for i in range(0, 10, 3):  # arrivals of several sizes, buffer grows
        run.fold(rows[i:i + 3], np.full(len(rows[i:i + 3]), 5.0))
    with pytest.raises(UpdateRejected) as err:
        run.fold_partial(np.zeros(4), 10.0, 10, None)
    assert err.value.reason == "group_refused"
    mean, _, info = run.finish()
    np.testing.assert_allclose(mean, ref_median(rows))
    assert info.count == 10 and info.info["robust_f"] == 2


def test_centered_clipping_carries_its_center_and_checkpoints_it():
    stage = CenteredClipping(0.5)
    pipe = Pipeline(stages=(stage,))
    states = pipe.init()
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [100.0, 100.0]], np.float32)
    for step in (1, 2):
        run = pipe.begin(states, step, 2)
        run.fold(rows, np.ones(3))
        mean, states, _ = run.finish()
        center = states[0]
        np.testing.assert_allclose(center, mean)
    saved = stage_states_to_dict(pipe, states)
    back = stage_states_from_dict(pipe, saved)
    np.testing.assert_array_equal(back[0], states[0])
    # second round is centered on the first round's aggregate
    first = ref_centered_clip(rows, np.zeros(2), 0.5)
    np.testing.assert_allclose(mean, ref_centered_clip(rows, first, 0.5), atol=1e-12)


def test_adaptive_norm_bound_follows_the_median_norm_of_the_last_round():
    stage = NormBound(1.0, adaptive=True, factor=2.0)
    pipe = Pipeline(stages=(stage,))
    states = pipe.init()
    rows = np.diag([3.0, 4.0, 5.0]).astype(np.float32)  # norms 3, 4, 5
    run = pipe.begin(states, 1, 3)
    run.fold(rows, np.ones(3))
    mean, states, info = run.finish()
    np.testing.assert_allclose(mean, np.full(3, 1 / 3), rtol=1e-6)  # clipped to 1 each
    assert states[0].bound == pytest.approx(8.0) and info.info["norm_clipped"] == 3
    assert stage_states_from_dict(pipe, stage_states_to_dict(pipe, states))[0].bound == 8.0


def test_norm_bound_accepts_a_group_only_with_a_clipping_promise():
    run = Pipeline(stages=(NormBound(1.0),)).begin((NormBound(1.0).init(),), 1, 2)
    with pytest.raises(UpdateRejected, match="not_clipped|clipped"):
        run.fold_partial(np.zeros(2), 3.0, 3, None)
    run.fold_partial(np.array([0.1, 0.1]), 3.0, 3, 1.0)
    assert run.count == 1


# --------------------------------------------------------------------------- configuration


def test_fedavg_is_unchanged_without_a_defense():
    cfg = load_config()
    pipe = pipeline_from_config(cfg)
    assert pipe.stages == () and pipe.sum_rule == PlainSum()
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(6, 5)).astype(np.float32)
    w = rng.integers(1, 50, size=6).astype(np.float64)
    run = pipe.begin(pipe.init(), 1, 5)
    run.fold(rows, w)
    mean, _, _ = run.finish()
    np.testing.assert_allclose(mean, (w[:, None] * rows).sum(0) / w.sum(), rtol=1e-6)


@pytest.mark.parametrize("overrides, describe", [
    ({"robust.rule": "bulyan"}, "validate -> sum:bulyan"),
    ({"robust.rule": "trimmed_mean", "robust.norm_bound": 3.0},
     "validate -> norm_bound -> sum:trimmed_mean"),
    ({"robust.rule": "centered_clip"}, "validate -> centered_clip -> sum:plain"),
    ({"robust.norm_bound": 3.0, "privacy.placement": "central"},
     "validate -> norm_bound -> central_dp -> sum:plain"),
])
def test_the_pipeline_is_built_from_the_robust_section(overrides, describe):
    assert pipeline_from_config(load_config(overrides=overrides)).describe() == describe


@pytest.mark.parametrize("overrides, key", [
    ({"robust.rule": "median", "secure_aggregation.enabled": True}, "robust.rule"),
    ({"robust.rule": "krum", "privacy.placement": "central"}, "robust.rule"),
    ({"robust.norm_adaptive": True}, "robust.norm_adaptive"),
])
def test_combinations_that_cannot_work_are_refused(overrides, key):
    with pytest.raises(ConfigError) as err:
        pipeline_from_config(load_config(overrides=overrides))
    assert err.value.key == key


def test_byzantine_count_rounds_up():
    assert [byzantine_count(n, 0.2) for n in (1, 5, 10, 19, 20, 21)] == [1, 1, 2, 4, 4, 5]
    assert byzantine_count(20, 0.0) == 0


def test_requirement_table_matches_the_stated_assumptions():
    # brute force over small n, f: the text in RULES is what requirement() enforces
    for n, f in itertools.product(range(1, 16), range(0, 8)):
        assert (rules.requirement("median", n, f) == "") == (f < n / 2)
        assert (rules.requirement("krum", n, f) == "") == (n > 2 * f + 2)
        assert (rules.requirement("bulyan", n, f) == "") == (n >= 4 * f + 3)
