"""Selectors over registry columns, the samplers the coordinator calls, and selection in
simulation (the in-memory registry, outcomes recorded as a run goes)."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shoal.selection as selection
from shoal.build import majority_labels, sampler_from_config, simulated_registry
from shoal.config import parse_config
from shoal.data import Dataset, FederatedData
from shoal.errors import ConfigError
from shoal.registry import Columns, Device, MemoryRegistry, SQLiteRegistry, sequential_ids
from shoal.sampling import PoissonSampler, RegistrySampler, UniformSampler
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


def devices(n: int = 100) -> list[Device]:
    """eu: 50, us: 30, as: 20 devices; participation i % 7; odd ones available Monday
    11-13h, even ones Monday 20-21h."""
    regions = ["eu"] * 50 + ["us"] * 30 + ["as"] * 20
    return [Device(f"d{i:03d}", attributes={"region": regions[i % 100], "tier": i % 4},
                   windows=[(11 * 60, 13 * 60)] if i % 2 else [(20 * 60, 21 * 60)],
                   participation=i % 7) for i in range(n)]


def columns(devs: list[Device]) -> Columns:
    return Columns.from_devices(devs)


def ids(cols: Columns, rows: np.ndarray) -> list[str]:
    return cols.ids_at(rows)


SELECTORS = [Uniform(), Stratified("region"), AvailabilityAware(),
             AvailabilityAware(Stratified("tier")), FairnessAware("least"),
             FairnessAware("weighted")]


# --- the wave-1 cohorts ----------------------------------------------------------------------


@pytest.mark.parametrize("n, k", [(100, 10), (1000, 100), (20, 20), (7, 1), (50_000, 37),
                                  (10, 9)])
def test_uniform_sampler_draws_exactly_the_wave_1_cohorts(n, k):
    for seed in range(6):
        want = np.sort(rng(seed).choice(n, size=k, replace=False))
        got = UniformSampler(k).sample(n, rng(seed))
        assert got.dtype == np.int64 and np.array_equal(got, want)
        # the same draw however the uniform selector is reached: the simulated registry,
        # availability over clients without windows, fairness before anyone took part
        reg = MemoryRegistry()
        reg.enroll_many(sequential_ids(n), now=0.0)
        for sel in (Uniform(), AvailabilityAware(), FairnessAware("least")):
            sampler = RegistrySampler(sel, k, registry=lambda: reg, clock=lambda: NOON)
            assert np.array_equal(sampler.sample(n, rng(seed)), want), sel
    assert np.array_equal(UniformSampler(k).sample(n, rng(1), count=min(n, k + 1)),
                          np.sort(rng(1).choice(n, size=min(n, k + 1), replace=False)))


def test_the_default_config_samples_with_the_uniform_sampler():
    assert isinstance(sampler_from_config(parse_config({})), UniformSampler)
    assert sampler_from_config(parse_config({})) == UniformSampler(10)
    poisson = parse_config({"sampling": {"method": "poisson", "q": 0.2}})
    assert sampler_from_config(poisson) == PoissonSampler(0.2)


# --- conventions every selector keeps ------------------------------------------------------


@pytest.mark.parametrize("sel", SELECTORS, ids=repr)
def test_same_seed_same_cohort_whatever_the_enrolment_order(sel, tmp_path):
    devs = devices()
    first = sel.select(columns(devs), 10, rng(7), NOON)
    assert first.dtype == np.int64 and np.array_equal(first, np.unique(first))
    assert isinstance(sel, Selector)
    shuffled = [devs[i] for i in np.random.default_rng(3).permutation(len(devs))]
    mem = MemoryRegistry()
    with SQLiteRegistry(tmp_path / "r.db") as sql:
        for reg in (mem, sql):
            for d in shuffled:
                reg.enroll(d.device_id, now=1.0, attributes=dict(d.attributes),
                           windows=d.windows)
                for r in range(d.participation):
                    reg.record_outcome(d.device_id, r, "accepted", now=1.0)
            assert np.array_equal(sel.select(reg.columns(), 10, rng(7), NOON), first)
    assert np.array_equal(sel.select(columns(devs[::-1]), 10, rng(7), NOON), first)
    others = {tuple(sel.select(columns(devs), 10, rng(s), NOON)) for s in range(8, 14)}
    assert len(others) > 1  # the cohort really depends on the generator


@pytest.mark.parametrize("sel", SELECTORS, ids=repr)
def test_shortfall_returns_every_eligible_device(sel):
    devs = devices(12)
    eligible = [d.device_id for d in devs
                if not isinstance(sel, AvailabilityAware) or d.available_at(NOON)]
    cols = columns(devs)
    assert ids(cols, sel.select(cols, 50, rng(), NOON)) == eligible
    assert sel.select(columns([]), 5, rng(), NOON).size == 0
    assert sel.select(cols, 0, rng(), NOON).size == 0
    among = np.array([1, 4, 5, 9])
    assert set(sel.select(cols, 50, rng(), NOON, among).tolist()) <= set(among.tolist())


@pytest.mark.parametrize("sel", SELECTORS, ids=repr)
def test_a_negative_count_is_refused(sel):
    with pytest.raises(ConfigError, match="must be an int >= 0"):
        sel.select(columns(devices(5)), -1, rng(), NOON)


# --- against brute force, on small random registries -----------------------------------------

DEVICE = st.fixed_dictionaries({
    "region": st.sampled_from(["eu", "us", "as", 3, None]),
    "windows": st.lists(st.tuples(st.integers(0, 10079), st.integers(0, 10080))
                        .filter(lambda w: w[0] != w[1]), max_size=2),
    "participation": st.integers(0, 4),
})


def _registry(specs: list[dict]) -> tuple[list[Device], Columns]:
    devs = [Device(f"x{i:02d}", attributes={} if s["region"] is None
                   else {"region": s["region"]}, windows=s["windows"],
                   participation=s["participation"]) for i, s in enumerate(specs)]
    return devs, columns(devs)


@given(st.lists(DEVICE, max_size=25), st.integers(0, 30), st.integers(0, 10079),
       st.integers(0, 2**32 - 1), st.booleans())
@settings(max_examples=150, deadline=None)
def test_selectors_agree_with_brute_force(specs, count, minute, seed, subset):
    devs, cols = _registry(specs)
    now = MONDAY + 60 * minute
    among = np.arange(0, len(devs), 2) if subset else None
    pool = list(range(len(devs))) if among is None else among.tolist()
    up = [r for r in pool if devs[r].available_at(now)]
    assert cols.available(now).tolist() == [d.available_at(now) for d in devs]

    def check(got: np.ndarray, eligible: list[int]) -> list[int]:
        assert got.dtype == np.int64 and np.array_equal(got, np.unique(got))
        assert set(got.tolist()) <= set(eligible)
        assert len(got) == min(count, len(eligible))
        return got.tolist()

    def uniform_reference(eligible: list[int]) -> list[int]:
        if count >= len(eligible):
            return eligible
        return [eligible[i] for i in np.sort(rng(seed).choice(len(eligible), count, False))]

    assert check(Uniform().select(cols, count, rng(seed), now, among), pool) == \
        uniform_reference(pool)
    assert check(AvailabilityAware().select(cols, count, rng(seed), now, among), up) == \
        uniform_reference(up)

    got = check(Stratified("region").select(cols, count, rng(seed), now, among), pool)
    strata: dict[object, list[int]] = {}
    for r in pool:
        value = devs[r].attributes.get("region")
        strata.setdefault((type(value), value), []).append(r)
    taken = {k: sum(r in got for r in rows) for k, rows in strata.items()}
    quota = {k: Fraction(min(count, len(pool)) * len(rows), len(pool))
             for k, rows in strata.items()}
    for k in strata:  # Hamilton: floor or ceil of the exact quota ...
        assert int(quota[k]) <= taken[k] <= int(quota[k]) + 1
    for a in strata:  # ... and the leftover draws went to the largest remainders
        for b in strata:
            if taken[a] > int(quota[a]) and taken[b] == int(quota[b]):
                assert quota[a] - int(quota[a]) >= quota[b] - int(quota[b])

    got = check(FairnessAware("least").select(cols, count, rng(seed), now, among), pool)
    rest = [devs[r].participation for r in pool if r not in got]
    if got and rest:
        assert max(devs[r].participation for r in got) <= min(rest)
    check(FairnessAware("weighted").select(cols, count, rng(seed), now, among), pool)


# --- uniform and stratified ------------------------------------------------------------------


def test_uniform_gives_every_device_the_same_chance():
    cols = columns(devices(20))
    hits: Counter[int] = Counter()
    trials = 2000
    g = rng(1)
    for _ in range(trials):
        hits.update(Uniform().select(cols, 5, g, NOON).tolist())
    freq = np.array([hits[i] for i in range(20)]) / trials
    # each inclusion probability is 5/20; 4.5 standard deviations of a binomial mean
    assert np.abs(freq - 0.25).max() < 4.5 * np.sqrt(0.25 * 0.75 / trials)


@pytest.mark.parametrize("count, expected", [
    (10, {"eu": 5, "us": 3, "as": 2}),   # exact proportions
    (7, {"eu": 4, "us": 2, "as": 1}),    # 3.5/2.1/1.4 -> floors 3/2/1, leftover to eu (0.5)
    (9, {"eu": 4, "us": 3, "as": 2}),    # 4.5/2.7/1.8 -> 4/2/1, leftovers to as (.8), us (.7)
    (1, {"eu": 1}),                      # 0.5/0.3/0.2
])
def test_stratified_allocates_in_proportion_with_largest_remainders(count, expected):
    devs = devices()
    cols = columns(devs)
    for seed in range(5):
        got = Stratified("region").select(cols, count, rng(seed), NOON)
        assert dict(Counter(devs[r].attributes["region"] for r in got)) == expected


def test_stratified_treats_a_missing_attribute_as_its_own_stratum():
    devs = [Device(f"a{i}", attributes={"os": "android"}) for i in range(6)] + \
        [Device(f"n{i}") for i in range(3)] + [Device(f"i{i}", attributes={"os": 7})
                                               for i in range(3)]
    cols = columns(devs)
    got = ids(cols, Stratified("os").select(cols, 4, rng(), NOON))
    assert Counter(i[0] for i in got) == {"a": 2, "n": 1, "i": 1}


def test_stratified_proportions_and_uniformity_within_a_stratum_over_many_draws():
    # 10 000 devices in strata of 60/25/10/5 %: every cohort of 40 is 24/10/4/2, and within
    # a stratum each device is drawn with the same probability
    n = 10_000
    share = np.repeat(np.array(["a", "b", "c", "d"]), [6000, 2500, 1000, 500])
    reg = MemoryRegistry()
    reg.enroll_many(sequential_ids(n), now=0.0,
                    attributes={"os": share[np.random.default_rng(0).permutation(n)]})
    cols = reg.columns()
    codes = cols.attributes["os"]
    hits = np.zeros(n)
    g = rng(4)
    trials = 500
    for _ in range(trials):
        got = Stratified("os").select(cols, 40, g, 0.0)
        counts = Counter(codes.value_at(int(r)) for r in got)
        assert counts == {"a": 24, "b": 10, "c": 4, "d": 2}
        hits[got] += 1
    for value, size, k in [("a", 6000, 24), ("d", 500, 2)]:
        rows = codes.equal_to(value)
        p = k / size
        # the mean inclusion frequency is p; the spread across devices is binomial
        assert abs(hits[rows].mean() / trials - p) < 1e-9
        assert abs(hits[rows].std() / trials - np.sqrt(p * (1 - p) / trials)) \
            < 0.2 * np.sqrt(p * (1 - p) / trials)


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


# --- availability ----------------------------------------------------------------------------


def test_availability_keeps_only_devices_whose_window_covers_now():
    devs = devices(20)  # odd: Monday 11:00-13:00, even: Monday 20:00-21:00
    cols = columns(devs)
    got = AvailabilityAware().select(cols, 5, rng(), NOON)
    assert len(got) == 5 and all(r % 2 == 1 for r in got.tolist())
    evening = MONDAY + 20.5 * 3600
    assert all(r % 2 == 0 for r in AvailabilityAware().select(cols, 5, rng(), evening).tolist())
    assert AvailabilityAware().select(cols, 5, rng(), MONDAY + 13 * 3600).size == 0  # end open
    # the same devices a week later, and never outside their windows over a whole week
    assert np.array_equal(AvailabilityAware().select(cols, 5, rng(3), NOON + 7 * 86400),
                          AvailabilityAware().select(cols, 5, rng(3), NOON))
    for minute in range(0, 7 * 1440, 17):
        now = MONDAY + 60 * minute
        for r in AvailabilityAware().select(cols, 20, rng(), now).tolist():
            assert devs[r].available_at(now)


def test_availability_handles_windows_that_wrap_around_the_week():
    devs = [Device("night", windows=[(10000, 60)]),     # Sunday 22:40 -> Monday 01:00
            Device("monday", windows=[(0, 24 * 60)]),
            Device("anytime")]                           # no declared window
    cols = columns(devs)

    def chosen(now: float) -> list[str]:
        return ids(cols, AvailabilityAware().select(cols, 3, rng(), now))

    assert chosen(MONDAY - 30 * 60) == ["anytime", "night"]
    assert chosen(MONDAY + 59 * 60) == ["anytime", "monday", "night"]
    assert chosen(MONDAY + 60 * 60) == ["anytime", "monday"]


# --- fairness --------------------------------------------------------------------------------


def test_fairness_least_picks_the_least_used_exactly():
    counts = {"a": 3, "b": 0, "c": 1, "d": 0, "e": 1, "f": 5}
    cols = columns([Device(k, participation=v) for k, v in counts.items()])
    thirds: Counter[str] = Counter()
    for seed in range(40):
        got = set(ids(cols, FairnessAware("least").select(cols, 3, rng(seed), NOON)))
        assert {"b", "d"} < got  # both never-used devices, always
        (third,) = got - {"b", "d"}
        thirds[third] += 1
    assert set(thirds) == {"c", "e"}  # the tie among count-1 devices is broken at random
    assert ids(cols, FairnessAware("least").select(cols, 5, rng(), NOON)) == list("abcde")


def test_fairness_weighted_draws_with_weights_inverse_to_participation():
    # One draw among weights 1/(1+0), 1/(1+1), 1/(1+3) = 1, 1/2, 1/4: P = 4/7, 2/7, 1/7.
    cols = columns([Device("x", participation=0), Device("y", participation=1),
                    Device("z", participation=3)])
    trials = 4000
    g = rng(5)
    hits = Counter(ids(cols, FairnessAware("weighted").select(cols, 1, g, NOON))[0]
                   for _ in range(trials))
    for k, p in {"x": 4 / 7, "y": 2 / 7, "z": 1 / 7}.items():
        assert abs(hits[k] / trials - p) < 4.5 * np.sqrt(p * (1 - p) / trials), (k, hits)


def test_fairness_weighted_prefers_rarely_used_devices_over_many_draws():
    devs = devices()  # participation i % 7
    cols = columns(devs)
    hits: Counter[int] = Counter()
    g = rng(9)
    for _ in range(300):
        hits.update(FairnessAware("weighted").select(cols, 10, g, NOON).tolist())
    per_count = [np.mean([hits[r] for r, d in enumerate(devs) if d.participation == c])
                 for c in range(7)]
    assert per_count[0] > 2 * per_count[6]
    assert np.all(np.diff(per_count) < 0)  # strictly fewer picks as participation grows


def test_fairness_mode_is_validated():
    with pytest.raises(ConfigError, match="'least' or 'weighted'"):
        FairnessAware("oldest")


# --- the registry sampler ----------------------------------------------------------------------


def test_registry_sampler_maps_rows_to_the_pools_positions(tmp_path):
    reg = SQLiteRegistry(tmp_path / "r.db")
    for i, d in enumerate(["dev-a", "dev-b", "dev-c", "dev-d", "zz-late"]):
        reg.enroll(d, now=1.0)
        for r in range(i):  # dev-a never took part, dev-d three times
            reg.record_outcome(d, r, "accepted", now=2.0)
    # the pool: in any order, one device the registry does not know, one it knows but the
    # pool does not hold (enrolled after the run started)
    pool = ("dev-d", "dev-b", "ghost", "dev-a", "dev-c", "dev-aa")  # dev-aa: not dev-a
    sampler = RegistrySampler(FairnessAware("least"), 2, pool, lambda: reg, clock=lambda: 3.0)
    assert [pool[i] for i in sampler.sample(len(pool), rng())] == ["dev-b", "dev-a"]
    for seed in range(10):
        picked = sampler.sample(len(pool), rng(seed), count=5)
        assert picked.tolist() == [0, 1, 3, 4]  # every known pool device, never "ghost"
    with pytest.raises(ConfigError, match="anonymous population"):
        RegistrySampler(Uniform(), 2, pool, lambda: _Anonymous()).sample(6, rng())
    sampler.record(np.array([4, 3]), 7, "accepted", now=4.0)  # dev-c, dev-a
    assert [reg.get(d).participation for d in ("dev-a", "dev-c")] == [1, 3]
    with pytest.raises(ConfigError, match="sampling.per_round"):
        RegistrySampler(Uniform(), 0)
    with pytest.raises(ConfigError, match="needs their registry"):
        RegistrySampler(Uniform(), 2, ("a", "b"))
    reg.close()


class _Anonymous:
    def columns(self) -> Columns:
        return Columns.of_size(6)


def test_registry_sampler_refuses_a_registry_that_is_not_the_pool():
    reg = simulated_registry(parse_config({"data": {"clients": 50}}))
    with pytest.raises(ConfigError, match="holds 50 clients, the pool 60"):
        RegistrySampler(Uniform(), 5, registry=lambda: reg).sample(60, rng())


# --- selection in simulation -----------------------------------------------------------------


def _config(**sampling) -> object:
    return parse_config({"model": {"name": "logreg"}, "rounds": 10,
                         "sampling": {"per_round": 10, **sampling}})


def test_majority_labels_against_a_loop():
    g = rng(2)
    y = g.integers(0, 5, size=300)
    parts = tuple(np.sort(g.choice(300, size=s, replace=False)) for s in
                  [0, 1, 7, 40, 0, 3, 12])
    x = np.zeros((300, 2), np.float32)
    y = y.astype(np.int64)
    data = FederatedData(train=Dataset(x, y, 5), test=Dataset(x, y, 5), client_indices=parts)
    got = majority_labels(data)
    for c, idx in enumerate(parts):
        if len(idx) == 0:
            assert got.mask[c]
        else:
            counts = np.bincount(y[idx], minlength=5)
            assert got[c] == int(np.flatnonzero(counts == counts.max())[0])  # ties: smaller


def test_simulated_stratification_by_label_keeps_each_cohort_proportional():
    from shoal.build import load_data

    cfg = parse_config({"data": {"clients": 200}, "sampling": {
        "per_round": 20, "selection": "stratified", "stratify_by": "label"}})
    data = load_data(cfg)
    sampler = sampler_from_config(cfg, data)
    label = majority_labels(data)
    sizes = Counter(label.compressed().tolist())
    for seed in range(20):
        got = Counter(label[sampler.sample(200, rng(seed))].tolist())
        for value, size in sizes.items():
            assert abs(got[value] - 20 * size / 200) < 1 + 1e-9  # floor or ceil of its quota


@pytest.mark.parametrize("raw, key", [
    ({"selection": "stratified", "stratify_by": "os"}, "sampling.stratify_by"),
    ({"selection": "stratified"}, "sampling.stratify_by"),
    ({"selection": "fairness", "method": "poisson"}, "sampling.selection"),
])
def test_simulation_refuses_selections_it_cannot_apply(raw, key):
    with pytest.raises(ConfigError) as exc:
        sampler_from_config(_config(**raw))
    assert exc.value.key == key
    buffered = parse_config({"round": {"policy": "buffered"},
                             "sampling": {"selection": "fairness"}})
    with pytest.raises(ConfigError, match="does not apply to round.policy = 'buffered'"):
        sampler_from_config(buffered)


def test_fairness_in_simulation_spreads_rounds_over_the_population():
    from shoal.experiment import Experiment

    fair = Experiment(_config(selection="fairness"))
    result = fair.run()
    part = fair.sampler.registry().columns().participation
    # 10 rounds of 10 out of 100: the outcomes are recorded as the run goes, so every client
    # trains exactly once (a uniform sampler repeats some and misses others)
    assert sum(r.accepted for r in result.records) == 100
    assert part.tolist() == [1] * 100
    assert fair.sampler.registry().outcomes("client-42")[0].outcome == "accepted"
    uniform = Experiment(_config())
    cohorts = [uniform.coordinator.cohort(r) for r in range(1, 11)]
    assert len(set(np.concatenate(cohorts).tolist())) < 100


def test_outcomes_in_simulation_name_refused_and_failed_clients():
    from shoal.coordinator import Coordinator
    from shoal.events import UpdateBatch
    from shoal.runner import drive
    from shoal.clock import WallClock
    from shoal.sampling import recording
    from shoal.strategy import FedAvg

    class Pool:
        num_clients = 8

        def train(self, task, client_ids):
            deltas = np.ones((len(client_ids), 3), np.float32)
            deltas[0] = np.nan  # the first client diverges
            examples = np.full(len(client_ids), 5)
            examples[-1] = 0  # the last one has no data; the third one never reports
            keep = np.arange(len(client_ids)) != 2
            yield UpdateBatch(np.asarray(client_ids)[keep], deltas[keep], examples[keep])

    reg = MemoryRegistry()
    reg.enroll_many(sequential_ids(8), now=0.0)
    sampler = RegistrySampler(FairnessAware(), 4, registry=lambda: reg)
    coord = Coordinator(FedAvg(), 8, sampler, seed=0, steps=2)
    drive(recording(coord, sampler), Pool(), FedAvg().init(np.zeros(3, np.float32)),
          WallClock())
    by_round: dict[int, dict[str, str]] = {1: {}, 2: {}}
    for i in reg.columns().ids.tolist():
        for o in reg.outcomes(i.decode()):
            by_round[o.round][i.decode()] = o.outcome
    for rnd, cohort in by_round.items():
        # of each cohort of 4: one diverged, one accepted, one never reported (no outcome:
        # the task ended without it), one had no data
        assert sorted(cohort.values()) == ["accepted", "rejected:no_data",
                                           "rejected:non_finite"], rnd
    assert reg.columns().participation.sum() == 2
    # round 2 was drawn knowing round 1's outcome: its accepted client was not asked again
    (first,) = [i for i, o in by_round[1].items() if o == "accepted"]
    assert first not in by_round[2]


# --- over-selection --------------------------------------------------------------------------


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
