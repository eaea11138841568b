"""Drift detection (Page–Hinkley on the federated loss, PSI on the label mix), the continual
training policy, and the simulated label-shift scenario."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.evaluation import EvalTally
from shoal.events import EvalReports
from shoal.lifecycle.drift import (ContinualPolicy, DriftMonitor, PageHinkley, Retrain,
                                   label_mix, population_stability)
from shoal.scenarios.drift import LabelShift, drift_scenario
from shoal.store import ModelStore


def _page_hinkley_oracle(xs, delta, threshold, min_samples):
    """The textbook recursion, written out independently: first index that alarms."""
    total, cums = 0.0, []
    for t, x in enumerate(xs, start=1):
        mean_t = sum(xs[:t]) / t
        total += x - mean_t - delta
        cums.append(total)
        if t >= min_samples and total - min([0.0] + cums) > threshold:
            return t - 1
    return None


def test_page_hinkley_alarms_where_the_textbook_recursion_does():
    rng = np.random.default_rng(0)
    xs = list(rng.normal(0.5, 0.05, 40)) + list(rng.normal(0.8, 0.05, 20))
    ph = PageHinkley(delta=0.01, threshold=0.5, min_samples=5)
    first = next(i for i, x in enumerate(xs) if ph.update(x))
    assert first == _page_hinkley_oracle(xs, 0.01, 0.5, 5)
    assert 40 <= first <= 45  # soon after the change, not before it
    ph.reset()
    assert not any(ph.update(x) for x in xs[:40])  # a stable stream never alarms
    assert not ph.update(math.nan)
    with pytest.raises(ConfigError):
        PageHinkley(threshold=0)


def test_population_stability_matches_the_formula():
    assert population_stability([50, 50], [90, 10]) == pytest.approx(
        0.4 * math.log(1.8) + 0.4 * math.log(5.0))
    assert population_stability([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)
    assert population_stability([1, 0], [1, 1]) > 1.0  # an empty class is smoothed, not inf
    with pytest.raises(ConfigError):
        population_stability([1, 2], [1, 2, 3])


def _result(loss, labels):
    ids = np.arange(len(loss))
    tally = EvalTally(1, 1, "", ids)
    metrics = {"loss": np.asarray(loss, float)} | {
        f"label_{k}": np.asarray(col, float) for k, col in enumerate(np.asarray(labels).T)}
    tally.fold(EvalReports(ids, np.ones(len(ids), np.int64), metrics))
    return tally.close("complete")


def test_the_monitor_raises_once_orders_one_retraining_and_restarts_after_deployment():
    monitor = DriftMonitor(PageHinkley(0.01, 0.3, 3), psi_threshold=0.25,
                           policy=ContinualPolicy(cooldown=100.0))
    stable = [[5, 5], [6, 4]]
    assert label_mix(_result([0.5, 0.5], stable)).tolist() == [11, 9]
    for t in range(5):
        raised, order = monitor.observe(_result([0.5, 0.5], stable), float(t), 1)
        assert not raised and order is None
    raised, order = monitor.observe(_result([0.5, 0.5], [[9, 1], [10, 0]]), 5.0, 1)
    assert [a.detector for a in raised] == ["psi"] and isinstance(order, Retrain)
    assert order.version == 1
    # while retraining, further alarms order nothing
    _, again = monitor.observe(_result([1.5, 1.5], [[9, 1], [10, 0]]), 6.0, 1)
    assert again is None and {a.detector for a in monitor.alarms} == {"psi", "page_hinkley"}
    monitor.deployed(7.0)
    assert monitor.reference is None and monitor.page_hinkley.n == 0
    monitor.observe(_result([0.4, 0.4], [[9, 1], [10, 0]]), 8.0, 2)  # the new reference
    raised, order = monitor.observe(_result([0.4, 0.4], [[1, 9], [0, 10]]), 9.0, 2)
    assert raised and order is None  # within the cooldown


def test_a_label_shift_is_detected_and_continual_training_recovers(tmp_path, fmnist):
    train, test = fmnist
    cfg = load_config(overrides={"rounds": 10})
    shift = LabelShift(shift_hour=48.0, ramp_hours=12.0)
    report = drift_scenario(cfg, train, test, str(tmp_path), shift=shift, days=4,
                            every_hours=2, retrain_rounds=15)
    assert report.false_alarms == 0
    assert 0 <= report.detection_delay_hours <= 12
    phases = report.phase_accuracy()
    without = report.phase_accuracy("accuracy_without_response")
    assert phases["after"] > phases["during"]
    assert phases["after"] > without["after"] + 0.1  # the response pays
    store = ModelStore(tmp_path, readonly=True)
    versions = store.list()
    assert len(versions) >= 2 and store.production().id == versions[-1].id
    assert versions[1].parent == 1
    assert [e.reason for e in store.history()][1:] == \
        ["continual training after drift"] * (len(versions) - 1)
    actions = [e["action"] for e in report.audit.entries]
    assert actions.index("drift_alarm") < actions.index("retrain") < actions.index("deployed")
