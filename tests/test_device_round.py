"""The sans-I/O device round: check-in, task, upload validation, closing, pacing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from shoal.events import TrainTask
from shoal.coordinator import Coordinator
from shoal.runner import run_round
from shoal.sampling import UniformSampler
from shoal.device_round import (REJECTION_REASONS, ComeBack, DeviceRound, RoundStatus, Task,
                                UploadResult)
from shoal.errors import ConfigError, UpdateRejected
from shoal.strategy import FedAvg
from shoal.summation import WeightedMean

DIM = 5
OPEN = 1000.0
DEADLINE_S = 600.0
DEADLINE = OPEN + DEADLINE_S


def make_round(n_selected: int = 13, target: int = 10, **kw) -> DeviceRound:
    args = dict(round=3, model_version=7, selected=[f"dev-{i:02d}" for i in range(n_selected)],
                target=target, opened_at=OPEN, deadline_s=DEADLINE_S, min_fraction=0.7,
                dim=DIM, max_norm=5.0)
    args.update(kw)
    return DeviceRound(**args)


def delta_of(i: int) -> np.ndarray:
    # norm of (0.1 i, ..., 0.1 i) is 0.1 i sqrt(5) <= 2.7 for i < 13: inside max_norm = 5
    return np.full(DIM, 0.1 * i, dtype=np.float32)


def snapshot(r: DeviceRound, now: float, devices: tuple[str, ...]) -> tuple:
    """What a rejection must not change: progress, queue, and each device's answer (asked of
    devices that already hold a task, so asking changes nothing either)."""
    return (r.status(now), r.queued, r.replays,
            [r.check_in(d, now, rng=np.random.default_rng(0)) for d in devices])


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def upload(r: DeviceRound, dev: str, task: Task, now: float = OPEN + 10, **over):
    args = dict(device_id=dev, round=task.round, base_version=task.model_version,
                upload_key=task.upload_key, num_examples=int(dev[-2:]) + 1,
                delta=delta_of(int(dev[-2:])), now=now)
    args.update(over)
    return r.upload(**args)


# ---------------------------------------------------------------------------------------------
# Happy path
# ---------------------------------------------------------------------------------------------


def test_happy_path_commits_and_refuses_stragglers_as_late(rng):
    r = make_round()
    tasks = {d: r.check_in(d, OPEN + 1, rng=rng) for d in r.selected}
    assert all(isinstance(t, Task) for t in tasks.values())
    assert {t.round for t in tasks.values()} == {3} and {t.deadline for t in tasks.values()} \
        == {DEADLINE}
    assert len({t.upload_key for t in tasks.values()}) == 13  # one fresh key per device
    assert all(len(t.upload_key) == 32 for t in tasks.values())
    assert r.status(OPEN + 1) == RoundStatus(accepted=0, outstanding=13, done=False,
                                             commit=False, abandoned=False, min_accepted=7,
                                             closed_by="open")
    sent = {}
    for k, dev in enumerate(r.selected[:10]):
        i = int(dev[-2:])
        res = upload(r, dev, tasks[dev], now=OPEN + 20 + k, metrics={"loss": 0.5 * i})
        assert res == UploadResult(device_id=dev, client_id=i, round=3, num_examples=i + 1,
                                   accepted_at=OPEN + 20 + k, position=k + 1)
        sent[i] = (delta_of(i), i + 1)
    st_ = r.status(OPEN + 40)
    assert (st_.accepted, st_.outstanding, st_.done, st_.commit, st_.abandoned) == \
        (10, 3, True, True, False)
    assert st_.closed_by == "target_reached"
    for dev in r.selected[10:]:
        with pytest.raises(UpdateRejected) as exc:
            upload(r, dev, tasks[dev], now=OPEN + 50)
        assert exc.value.reason == "late" and "target reached" in str(exc.value)
        assert exc.value.client_id == dev and exc.value.round == 3
    assert r.rejections == {"late": 3}
    assert r.check_in("dev-12", OPEN + 60, rng=rng).reason == "round_closed"

    drained = r.drain()
    assert r.drain() == [] and r.queued == 0
    assert [u.client_id for u in drained] == list(range(10))  # acceptance order
    for u in drained:
        want, n = sent[u.client_id]
        np.testing.assert_array_equal(u.delta, want)
        assert u.delta.dtype == np.float32 and u.num_examples == n
        assert u.metrics == {"loss": 0.5 * u.client_id}
        assert r.device_id(u.client_id) == f"dev-{u.client_id:02d}"
    # the queue folds into the strategy's accumulator: oracle is np.average by hand
    acc = WeightedMean(DIM)
    for u in drained:
        acc.add(u.delta, u.num_examples)
    ids = np.arange(10)
    np.testing.assert_allclose(acc.mean(), np.full(DIM, np.average(0.1 * ids, weights=ids + 1)),
                               rtol=1e-6)


def test_queue_holds_a_read_only_copy_of_the_delta(rng):
    r = make_round()
    t = r.check_in("dev-01", OPEN, rng=rng)
    buf = delta_of(1)
    upload(r, "dev-01", t, delta=buf)
    buf[:] = 99.0  # the transport reuses its buffer
    (u,) = r.drain()
    np.testing.assert_array_equal(u.delta, delta_of(1))
    assert not u.delta.flags.writeable


def test_client_ids_can_be_the_coordinators_cohort(rng):
    r = make_round(n_selected=3, target=2, client_ids=[40, 7, 12])
    assert r.client_id("dev-01") == 7 and r.device_id(12) == "dev-02"
    t = r.check_in("dev-01", OPEN, rng=rng)
    assert upload(r, "dev-01", t).client_id == 7
    assert [u.client_id for u in r.drain()] == [7]


# ---------------------------------------------------------------------------------------------
# Rejections: each reason, in order, leaving the round unchanged
# ---------------------------------------------------------------------------------------------


def _bad(reason: str, r: DeviceRound, tasks: dict[str, Task]) -> dict:
    """Arguments of an upload from dev-01 that must fail with ``reason`` (only that fault)."""
    t = tasks["dev-01"]
    return {
        "not_selected": dict(device_id="stranger"),
        "wrong_round": dict(round=t.round + 1),
        "stale": dict(base_version=t.model_version - 1),
        "bad_key": dict(upload_key=tasks["dev-02"].upload_key),
        "duplicate": dict(device_id="dev-00", upload_key=tasks["dev-00"].upload_key,
                          delta=delta_of(5)),
        "late": dict(now=DEADLINE),
        "wrong_dtype": dict(delta=delta_of(1).astype(np.int32)),
        "wrong_shape": dict(delta=np.zeros(DIM + 1, np.float32)),
        "non_finite": dict(delta=np.array([0, 0, np.inf, 0, 0], np.float32)),
        "norm_too_large": dict(delta=np.array([3.0, 4.001, 0, 0, 0], np.float32)),
        "bad_weight": dict(num_examples=0),
        "bad_metrics": dict(metrics={"loss": float("nan")}),
    }[reason]


@pytest.mark.parametrize("reason", REJECTION_REASONS)
def test_each_rejection_reason_changes_nothing_but_its_counter(reason, rng):
    r = make_round()
    tasks = {d: r.check_in(d, OPEN, rng=rng) for d in ("dev-00", "dev-01", "dev-02")}
    first = upload(r, "dev-00", tasks["dev-00"])  # so that "duplicate" has something to hit
    before = snapshot(r, OPEN + 10, tuple(tasks))
    with pytest.raises(UpdateRejected) as exc:
        upload(r, "dev-01", tasks["dev-01"], **_bad(reason, r, tasks))
    assert exc.value.reason == reason
    assert snapshot(r, OPEN + 10, tuple(tasks)) == before
    assert r.rejections == {reason: 1}
    # the device can still do what it could before (unless it was the fault itself)
    if reason not in ("duplicate", "late"):
        assert upload(r, "dev-01", tasks["dev-01"]).position == 2
    assert [u.client_id for u in r.drain()][0] == first.client_id


@pytest.mark.parametrize("delta, reason", [
    ([0.0] * DIM, "wrong_dtype"),                            # not an ndarray
    (np.zeros(DIM, np.complex64), "wrong_dtype"),
    (np.zeros((1, DIM), np.float32), "wrong_shape"),
    (np.array([0, np.nan, 0, 0, 0], np.float64), "non_finite"),
])
def test_delta_faults(delta, reason, rng):
    r = make_round()
    t = r.check_in("dev-01", OPEN, rng=rng)
    with pytest.raises(UpdateRejected) as exc:
        upload(r, "dev-01", t, delta=delta)
    assert exc.value.reason == reason


@pytest.mark.parametrize("n", [0, -3, 1.5, True, 10_000_001, np.int64(0), "7"])
def test_bad_weights(n, rng):
    r = make_round()
    t = r.check_in("dev-01", OPEN, rng=rng)
    with pytest.raises(UpdateRejected) as exc:
        upload(r, "dev-01", t, num_examples=n)
    assert exc.value.reason == "bad_weight"
    assert upload(r, "dev-01", t, num_examples=np.int64(10_000_000)).num_examples == 10_000_000


def test_norm_bound_is_inclusive_and_computed_in_float64(rng):
    r = make_round(max_norm=5.0)
    t = {d: r.check_in(d, OPEN, rng=rng) for d in ("dev-01", "dev-02")}
    # 3-4-5 triangle: exactly at the bound is accepted
    assert upload(r, "dev-01", t["dev-01"], delta=np.array([3, 4, 0, 0, 0], np.float32))
    # 1e20**2 overflows float32 but the norm (1.4e20) must still be refused as too large
    with pytest.raises(UpdateRejected) as exc:
        upload(r, "dev-02", t["dev-02"], delta=np.array([1e20, 1e20, 0, 0, 0], np.float32))
    assert exc.value.reason == "norm_too_large"
    unbounded = make_round(max_norm=None)
    t2 = unbounded.check_in("dev-02", OPEN, rng=rng)
    assert upload(unbounded, "dev-02", t2, delta=np.full(DIM, 1e30, np.float32))


def test_selected_device_without_a_task_has_no_valid_key(rng):
    r = make_round()
    t = r.check_in("dev-01", OPEN, rng=rng)
    with pytest.raises(UpdateRejected) as exc:  # dev-02 never checked in
        r.upload("dev-02", 3, 7, t.upload_key, 5, delta_of(2), OPEN + 1)
    assert exc.value.reason == "bad_key" and "no task" in str(exc.value)


@pytest.mark.parametrize("over, reason", [
    (dict(round=4, upload_key="x"), "wrong_round"),
    (dict(base_version=6, upload_key="x", now=DEADLINE + 1), "stale"),
    (dict(upload_key="x", now=DEADLINE + 1), "bad_key"),
    (dict(now=DEADLINE + 1, delta=np.full(DIM, np.nan, np.float32)), "late"),
    (dict(delta=np.full(DIM, np.nan, np.float32), num_examples=0), "non_finite"),
    (dict(delta=np.full(DIM, 10, np.float32), num_examples=0), "norm_too_large"),
    (dict(num_examples=0, metrics={"loss": "high"}), "bad_weight"),
])
def test_first_failing_check_names_the_reason(over, reason, rng):
    r = make_round()
    t = r.check_in("dev-01", OPEN, rng=rng)
    with pytest.raises(UpdateRejected) as exc:
        upload(r, "dev-01", t, **over)
    assert exc.value.reason == reason


def test_explicit_close_makes_uploads_late_and_is_idempotent(rng):
    r = make_round()
    t = {d: r.check_in(d, OPEN, rng=rng) for d in r.selected[:8]}
    for d in r.selected[:7]:
        upload(r, d, t[d])
    s = r.close(OPEN + 30)
    assert s.done and s.commit and s.closed_by == "closed" and s.accepted == 7
    assert r.close(OPEN + 31) == r.status(OPEN + 31)
    with pytest.raises(UpdateRejected) as exc:
        upload(r, "dev-07", t["dev-07"], now=OPEN + 32)
    assert exc.value.reason == "late" and "round closed" in str(exc.value)
    assert r.check_in("dev-08", OPEN + 33, rng=rng).reason == "round_closed"


# ---------------------------------------------------------------------------------------------
# Idempotency
# ---------------------------------------------------------------------------------------------


def test_retry_returns_the_original_acceptance_without_double_counting(rng):
    r = make_round(n_selected=3, target=2)
    t = {d: r.check_in(d, OPEN, rng=rng) for d in r.selected}
    original = upload(r, "dev-00", t["dev-00"], now=OPEN + 5)
    again = upload(r, "dev-00", t["dev-00"], now=OPEN + 9, num_examples=np.int64(1),
                   delta=delta_of(0).copy())
    assert again is original and again.accepted_at == OPEN + 5
    assert r.status(OPEN + 9).accepted == 1 and r.queued == 1 and r.replays == 1
    assert r.rejections == {}
    upload(r, "dev-01", t["dev-01"])  # reaches target 2: the round closes
    # a retry whose response was lost must still learn it was accepted, after the close too
    assert upload(r, "dev-01", t["dev-01"], now=DEADLINE + 100).position == 2
    assert r.status(DEADLINE + 100).accepted == 2 and r.queued == 2 and r.replays == 2
    assert [u.client_id for u in r.drain()] == [0, 1]
    with pytest.raises(UpdateRejected) as exc:  # same key, different payload
        upload(r, "dev-01", t["dev-01"], num_examples=3)
    assert exc.value.reason == "duplicate"
    assert r.drain() == []


def test_check_in_is_idempotent_until_the_upload(rng):
    r = make_round()
    a = r.check_in("dev-04", OPEN, rng=rng)
    b = r.check_in("dev-04", OPEN + 50, rng=rng)
    assert a == b and a.upload_key == b.upload_key
    assert r.status(OPEN + 50).outstanding == 1
    assert "upload_key='…'" in repr(a) and a.upload_key not in repr(a)
    upload(r, "dev-04", a)
    c = r.check_in("dev-04", OPEN + 60, rng=rng)
    assert isinstance(c, ComeBack) and c.reason == "already_reported"
    assert DEADLINE <= c.at <= DEADLINE + DEADLINE_S
    assert r.status(OPEN + 60).outstanding == 0


# ---------------------------------------------------------------------------------------------
# Completion
# ---------------------------------------------------------------------------------------------


def test_deadline_below_min_fraction_abandons(rng):
    r = make_round(min_fraction=0.5)  # ceil(0.5 * 10) = 5
    t = {d: r.check_in(d, OPEN, rng=rng) for d in r.selected}
    for d in r.selected[:4]:
        upload(r, d, t[d])
    assert not r.status(DEADLINE - 1e-6).done  # window is [opened_at, deadline)
    s = r.status(DEADLINE)
    assert (s.done, s.commit, s.abandoned, s.closed_by, s.min_accepted) == \
        (True, False, True, "deadline", 5)
    with pytest.raises(UpdateRejected) as exc:
        upload(r, r.selected[4], t[r.selected[4]], now=DEADLINE)
    assert exc.value.reason == "late" and "deadline" in str(exc.value)
    assert r.check_in(r.selected[5], DEADLINE, rng=rng).reason == "round_closed"

    r2 = make_round(min_fraction=0.5)
    t2 = {d: r2.check_in(d, OPEN, rng=rng) for d in r2.selected}
    for d in r2.selected[:5]:
        upload(r2, d, t2[d])
    assert r2.status(DEADLINE).commit


@pytest.mark.parametrize("fraction, target, want", [(0.7, 10, 7), (0.71, 10, 8), (1.0, 3, 3),
                                                    (0.01, 10, 1), (0.3, 10, 3)])
def test_min_accepted_is_ceil_of_fraction_times_target(fraction, target, want):
    assert make_round(target=target, min_fraction=fraction).min_accepted == want


# ---------------------------------------------------------------------------------------------
# Pace steering
# ---------------------------------------------------------------------------------------------


def test_unselected_population_spreads_uniformly_over_the_window():
    r = make_round(pace_spread_s=300.0)
    now = OPEN + 5
    rng = np.random.default_rng(2024)
    backs = [r.check_in(f"other-{i}", now, rng=rng) for i in range(1000)]
    assert {b.reason for b in backs} == {"not_selected"}
    at = np.array([b.at for b in backs])
    assert (at >= now).all() and (at >= DEADLINE).all() and (at <= DEADLINE + 300).all()
    assert len(np.unique(at)) == 1000  # no two devices come back at the same instant
    # Kolmogorov-Smirnov against U[deadline, deadline + 300]; seeded, so deterministic
    assert stats.kstest(at, stats.uniform(loc=DEADLINE, scale=300).cdf).pvalue > 0.01
    # at most ~10% of the population in any tenth of the window (expected 100 +- 10)
    counts, _ = np.histogram(at, bins=10, range=(DEADLINE, DEADLINE + 300))
    assert counts.max() < 140
    # deterministic given the generator
    again = [r.check_in(f"other-{i}", now, rng=np.random.default_rng(2024)).at
             for i in range(1)]
    assert again[0] == at[0]


def test_closed_round_sends_devices_back_soon():
    r = make_round(retry_spread_s=20.0)
    r.close(OPEN + 1)
    rng = np.random.default_rng(7)
    at = np.array([r.check_in(f"dev-{i:02d}", OPEN + 2, rng=rng).at for i in range(13)])
    assert ((at >= OPEN + 2) & (at <= OPEN + 22)).all() and np.ptp(at) > 0


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("over, key", [
    (dict(round=-1), "round"), (dict(model_version=1.5), "model_version"),
    (dict(target=0), "target"), (dict(target=14), "selected"),
    (dict(selected=["a", "a", "b"], target=2), "selected"), (dict(selected="abc"), "selected"),
    (dict(selected=["a", ""], target=1), "selected"), (dict(opened_at=math.nan), "opened_at"),
    (dict(deadline_s=0), "deadline_s"), (dict(deadline_s=math.inf), "deadline_s"),
    (dict(min_fraction=0.0), "min_fraction"), (dict(min_fraction=1.01), "min_fraction"),
    (dict(dim=0), "dim"), (dict(max_norm=0.0), "max_norm"), (dict(max_norm=-1), "max_norm"),
    (dict(client_ids=[1, 1] + list(range(2, 13))), "client_ids"),
    (dict(client_ids=[0]), "client_ids"), (dict(max_examples=0), "max_examples"),
    (dict(pace_spread_s=-1.0), "pace_spread_s"), (dict(retry_spread_s=math.nan),
                                                  "retry_spread_s"),
])
def test_bad_construction_names_the_field(over, key):
    with pytest.raises(ConfigError) as exc:
        make_round(**over)
    assert exc.value.key == key and key in str(exc.value)


# ---------------------------------------------------------------------------------------------
# Driving it through the coordinator's ClientPool boundary
# ---------------------------------------------------------------------------------------------


class SimulatedDevicePool:
    """What a GrpcClientPool does, with the network replaced by direct calls: open a
    DeviceRound for the cohort, let devices check in and upload, yield drained updates."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.rounds: list[DeviceRound] = []

    @property
    def num_clients(self) -> int:
        return self.n

    def train(self, task: TrainTask, client_ids: np.ndarray):
        devices = [f"phone-{c}" for c in client_ids]
        r = DeviceRound(task.round, task.round - 1, devices, target=4, opened_at=0.0,
                        deadline_s=60.0, min_fraction=0.5, dim=task.params.size,
                        max_norm=None, client_ids=[int(c) for c in client_ids])
        self.rounds.append(r)
        rng = np.random.default_rng(task.round)
        now = 0.0
        for dev, c in zip(devices, client_ids):
            now += 1.0
            t = r.check_in(dev, now, rng=rng)
            if isinstance(t, ComeBack):
                continue
            try:
                r.upload(dev, t.round, t.model_version, t.upload_key, int(c) + 1,
                         np.full(task.params.size, float(c), np.float32), now + 0.5)
            except UpdateRejected:
                pass
            yield from r.drain()
            if r.status(now).done:
                break


def test_coordinator_folds_exactly_the_first_target_updates():
    pool = SimulatedDevicePool(20)
    # 6 = 150% of target 4
    new, rec = run_round(FedAvg(), pool, UniformSampler(6), FedAvg().init(np.zeros(2, np.float32)),
                         seed=5)
    cohort = Coordinator(FedAvg(), pool.num_clients, UniformSampler(6), seed=5).cohort(1)
    first = cohort[:4].astype(float)
    want = np.average(first, weights=first + 1)
    np.testing.assert_allclose(new.params, [want, want], rtol=1e-6)
    assert rec.accepted == 4 and rec.committed and pool.rounds[0].status(10.0).commit


# ---------------------------------------------------------------------------------------------
# Arbitrary interleavings
# ---------------------------------------------------------------------------------------------

_SEL = [f"s{i}" for i in range(6)]
_DEVICES = _SEL + ["u0", "u1", "u2"]
_op = st.tuples(
    st.sampled_from(["check_in"] * 4 + ["upload"] * 6 + ["close"]),  # closing early is rare
    st.sampled_from(_SEL * 3 + _DEVICES[len(_SEL):]),
    st.sampled_from(["good"] * 8 + ["bad_key", "nan", "stale", "shape", "weight"]),
    st.sampled_from([0.0, 0.5, 1.0, 2.5, 4.0]),  # 60 ops cross the 200 s deadline only rarely
)


@settings(max_examples=120, deadline=None)
@given(ops=st.lists(_op, min_size=20, max_size=60), seed=st.integers(0, 2**32 - 1))
def test_any_interleaving_keeps_the_invariants(ops, seed):
    r = DeviceRound(1, 0, _SEL, target=4, opened_at=0.0, deadline_s=200.0, min_fraction=0.5,
                    dim=3, max_norm=10.0)
    rng = np.random.default_rng(seed)
    keys: dict[str, str] = {}
    now, raised, drained, accepted_devices = 0.0, 0, [], set()
    for kind, dev, variant, dt in ops:
        now += dt
        before = (r.status(now).accepted, r.queued)
        if kind == "check_in":
            d = r.check_in(dev, now, rng=rng)
            if isinstance(d, Task):
                assert dev in _SEL and keys.setdefault(dev, d.upload_key) == d.upload_key
            else:
                assert d.at >= now and d.reason in ("not_selected", "round_closed",
                                                    "already_reported")
        elif kind == "close":
            r.close(now)
            drained += r.drain()
        else:
            key = keys.get(dev, "0" * 32) if variant != "bad_key" else "f" * 32
            delta = {"nan": np.array([np.nan, 0, 0], np.float32),
                     "shape": np.zeros(4, np.float32)}.get(variant, np.ones(3, np.float32))
            try:
                res = r.upload(dev, 1, -1 if variant == "stale" else 0, key,
                               0 if variant == "weight" else 2, delta, now)
            except UpdateRejected as exc:
                raised += 1
                assert exc.reason in REJECTION_REASONS and exc.client_id == dev
                assert (r.status(now).accepted, r.queued) == before  # nothing changed
            else:
                assert dev in _SEL and keys[dev] == key and now < 200.0 or dev in \
                    accepted_devices
                accepted_devices.add(dev)
                assert r.client_id(dev) == res.client_id
        s = r.status(now)
        assert s.accepted <= 4 and s.accepted == len(accepted_devices)
        assert s.commit == (s.done and s.accepted >= 2) and s.abandoned == (s.done and
                                                                               not s.commit)
        assert sum(r.rejections.values()) == raised
    drained += r.drain()
    ids = [u.client_id for u in drained]
    assert len(ids) == len(set(ids)) == len(accepted_devices)
    assert {r.device_id(c) for c in ids} == accepted_devices
