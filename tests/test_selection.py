from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shoal.selection as selection
from shoal.errors import ConfigError
from shoal.registry import Device, RegistryError
from shoal.selection import (
    AvailabilityAware,
    FairnessAware,
    Selector,
    Stratified,
    Uniform,
    over_selection_count,
    proportional_allocation,
)

MONDAY = datetime(2026, 11, 30, tzinfo=timezone.utc).timestamp()  # a Monday, 00:00 UTC
NOON = MONDAY + 12 * 3600


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def population(n: int = 100) -> list[Device]:
    """eu: 50, us: 30, as: 20 devices; participation i % 7; half available Monday 11-13h."""
    regions = ["eu"] * 50 + ["us"] * 30 + ["as"] * 20
    return [Device(f"d{i:03d}", attributes={"region": regions[i % 100], "tier": i % 4},
                   windows=[(11 * 60, 13 * 60)] if i % 2 else [(20 * 60, 21 * 60)],
                   participation=i % 7) for i in range(n)]


SELECTORS = [Uniform(), Stratified("region"), AvailabilityAware(),
             AvailabilityAware(Stratified("tier")), FairnessAware("least"),
             FairnessAware("weighted")]


@pytest.mark.parametrize("sel", SELECTORS, ids=repr)
def test_same_seed_same_cohort_whatever_the_candidate_order(sel):
    pop = population()
    first = sel.select(pop, 10, rng(7), NOON)
    assert first == sel.select(pop, 10, rng(7), NOON)
    assert first == sel.select(pop[::-1], 10, rng(7), NOON)
    shuffled = [pop[i] for i in np.random.default_rng(3).permutation(len(pop))]
    assert first == sel.select(shuffled, 10, rng(7), NOON)
    assert first == sorted(set(first))  # sorted, no duplicates
    assert set(first) <= {d.device_id for d in pop}
    assert isinstance(sel, Selector)
    others = {tuple(sel.select(pop, 10, rng(s), NOON)) for s in range(8, 14)}
    assert len(others) > 1  # the cohort really depends on the generator


@pytest.mark.parametrize("sel", SELECTORS, ids=repr)
def test_shortfall_returns_every_eligible_device(sel):
    pop = population(12)
    eligible = [d.device_id for d in pop
                if not isinstance(sel, AvailabilityAware) or d.available_at(NOON)]
    assert sel.select(pop, 50, rng(), NOON) == sorted(eligible)
    assert sel.select([], 5, rng(), NOON) == []
    assert sel.select(pop, 0, rng(), NOON) == []


@pytest.mark.parametrize("sel", SELECTORS, ids=repr)
def test_bad_arguments_are_refused(sel):
    pop = population(5)
    with pytest.raises(ConfigError, match="must be an int >= 0"):
        sel.select(pop, -1, rng(), NOON)
    with pytest.raises(RegistryError, match="'d001' appears twice"):
        sel.select(pop + [Device("d001")], 2, rng(), NOON)


def test_uniform_gives_every_device_the_same_chance():
    pop = population(20)
    hits = Counter()
    trials = 2000
    g = rng(1)
    for _ in range(trials):
        hits.update(Uniform().select(pop, 5, g, NOON))
    freq = np.array([hits[d.device_id] for d in pop]) / trials
    # each inclusion probability is 5/20; 4.5 standard deviations of a binomial mean
    assert np.abs(freq - 0.25).max() < 4.5 * np.sqrt(0.25 * 0.75 / trials)


# --- stratified ----------------------------------------------------------------------------


@pytest.mark.parametrize("count, expected", [
    (10, {"eu": 5, "us": 3, "as": 2}),   # exact proportions
    (7, {"eu": 4, "us": 2, "as": 1}),    # 3.5/2.1/1.4 -> floors 3/2/1, leftover to eu (0.5)
    (9, {"eu": 4, "us": 3, "as": 2}),    # 4.5/2.7/1.8 -> 4/2/1, leftovers to as (.8), us (.7)
    (1, {"eu": 1}),                      # 0.5/0.3/0.2
])
def test_stratified_allocates_in_proportion_with_largest_remainders(count, expected):
    pop = population()
    region = {d.device_id: d.attributes["region"] for d in pop}
    for seed in range(5):
        got = Stratified("region").select(pop, count, rng(seed), NOON)
        assert dict(Counter(region[i] for i in got)) == expected


def test_stratified_treats_a_missing_attribute_as_its_own_stratum():
    pop = [Device(f"a{i}", attributes={"os": "android"}) for i in range(6)] + \
          [Device(f"n{i}") for i in range(3)] + [Device(f"i{i}", attributes={"os": 7})
                                                 for i in range(3)]
    got = Stratified("os").select(pop, 4, rng(), NOON)
    assert Counter(i[0] for i in got) == {"a": 2, "n": 1, "i": 1}


def test_stratified_is_uniform_within_a_stratum():
    pop = population()
    hits = Counter()
    trials = 600
    g = rng(2)
    for _ in range(trials):
        hits.update(Stratified("region").select(pop, 10, g, NOON))
    us = np.array([hits[f"d{i:03d}"] for i in range(50, 80)]) / trials
    assert np.abs(us - 3 / 30).max() < 4.5 * np.sqrt(0.1 * 0.9 / trials)


def test_proportional_allocation_by_hand():
    assert proportional_allocation([5, 3, 2], 7, rng()).tolist() == [4, 2, 1]
    assert proportional_allocation([5, 3, 2], 20, rng()).tolist() == [5, 3, 2]
    assert proportional_allocation([0, 4, 0], 2, rng()).tolist() == [0, 2, 0]
    # Ties in the remainder are broken at random, so no stratum is always the lucky one.
    winners = Counter(int(np.argmax(proportional_allocation([1, 1, 1], 1, rng(s))))
                      for s in range(60))
    assert set(winners) == {0, 1, 2}
    with pytest.raises(ConfigError, match="sizes"):
        proportional_allocation([3, -1], 1, rng())


@given(st.lists(st.integers(0, 50), min_size=1, max_size=8), st.integers(0, 200),
       st.integers(0, 2**32 - 1))
@settings(max_examples=100, deadline=None)
def test_proportional_allocation_properties(sizes, count, seed):
    alloc = proportional_allocation(sizes, count, rng(seed))
    total = sum(sizes)
    assert alloc.sum() == min(count, total)
    assert (alloc <= np.array(sizes)).all() and (alloc >= 0).all()
    if total and count < total:
        # Hamilton's method stays within one of the exact quota.
        assert (np.abs(alloc - count * np.array(sizes) / total) < 1).all()


# --- availability --------------------------------------------------------------------------


def test_availability_keeps_only_devices_whose_window_covers_now():
    pop = population(20)  # odd: Monday 11:00-13:00, even: Monday 20:00-21:00
    got = AvailabilityAware().select(pop, 5, rng(), NOON)
    assert len(got) == 5 and all(int(i[1:]) % 2 == 1 for i in got)
    evening = MONDAY + 20.5 * 3600
    assert all(int(i[1:]) % 2 == 0 for i in AvailabilityAware().select(pop, 5, rng(), evening))
    assert AvailabilityAware().select(pop, 5, rng(), MONDAY + 13 * 3600) == []  # end exclusive


def test_availability_handles_windows_that_wrap_around_the_week():
    pop = [Device("night", windows=[(10000, 60)]),     # Sunday 22:40 -> Monday 01:00
           Device("monday", windows=[(0, 24 * 60)]),
           Device("anytime")]                           # no declared window
    sunday_late = MONDAY - 30 * 60
    assert AvailabilityAware().select(pop, 3, rng(), sunday_late) == ["anytime", "night"]
    assert AvailabilityAware().select(pop, 3, rng(), MONDAY + 59 * 60) == [
        "anytime", "monday", "night"]
    assert AvailabilityAware().select(pop, 3, rng(), MONDAY + 60 * 60) == ["anytime", "monday"]


# --- fairness ------------------------------------------------------------------------------


def test_fairness_least_picks_the_least_used_exactly():
    counts = {"a": 3, "b": 0, "c": 1, "d": 0, "e": 1, "f": 5}
    pop = [Device(k, participation=v) for k, v in counts.items()]
    thirds = Counter()
    for seed in range(40):
        got = FairnessAware("least").select(pop, 3, rng(seed), NOON)
        assert {"b", "d"} < set(got)  # both never-used devices, always
        (third,) = set(got) - {"b", "d"}
        thirds[third] += 1
    assert set(thirds) == {"c", "e"}  # the tie among count-1 devices is broken at random
    assert FairnessAware("least").select(pop, 5, rng(), NOON) == ["a", "b", "c", "d", "e"]


def test_fairness_weighted_draws_with_weights_inverse_to_participation():
    # One draw among weights 1/(1+0), 1/(1+1), 1/(1+3) = 1, 1/2, 1/4: P = 4/7, 2/7, 1/7.
    pop = [Device("x", participation=0), Device("y", participation=1),
           Device("z", participation=3)]
    trials = 4000
    g = rng(5)
    hits = Counter(FairnessAware("weighted").select(pop, 1, g, NOON)[0] for _ in range(trials))
    expected = {"x": 4 / 7, "y": 2 / 7, "z": 1 / 7}
    for k, p in expected.items():
        assert abs(hits[k] / trials - p) < 4.5 * np.sqrt(p * (1 - p) / trials), (k, hits)


def test_fairness_weighted_prefers_rarely_used_devices_over_many_draws():
    pop = population()  # participation i % 7
    hits = Counter()
    g = rng(9)
    for _ in range(300):
        hits.update(FairnessAware("weighted").select(pop, 10, g, NOON))
    per_count = [np.mean([hits[d.device_id] for d in pop if d.participation == c])
                 for c in range(7)]
    assert per_count[0] > 2 * per_count[6]
    assert np.all(np.diff(per_count) < 0)  # strictly fewer picks as participation grows


def test_fairness_mode_is_validated():
    with pytest.raises(ConfigError, match="'least' or 'weighted'"):
        FairnessAware("oldest")


# --- over-selection ------------------------------------------------------------------------


@pytest.mark.parametrize("target, factor, expected", [
    (10, 1.3, 13), (100, 1.3, 130), (10, 1.0, 10), (7, 1.5, 11), (3, 1.01, 4), (0, 2.0, 0),
    (1, 1.3, 2), (20, 1.25, 25),
])
def test_over_selection_count(target, factor, expected):
    assert over_selection_count(target, factor) == expected


@pytest.mark.parametrize("target, factor", [(10, 0.9), (10, float("nan")), (10, float("inf")),
                                            (-1, 1.3), (10, True), (2.5, 1.3)])
def test_over_selection_refuses_bad_settings(target, factor):
    with pytest.raises(ConfigError):
        over_selection_count(target, factor)


def test_public_api():
    assert all(hasattr(selection, name) for name in selection.__all__)
