"""A task's device session (DeviceTask), sans-I/O: check-in, upload keys, retries, closing,
pacing. The session has no round rule: here the test plays the coordinator, accepting what
it admits (``submit``) or refusing it (``refuse``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from shoal.device_task import SESSION_REASONS, ComeBack, DeviceTask, Task, UploadResult
from shoal.device_weights import WeightCap
from shoal.errors import ConfigError, UpdateRejected
from shoal.events import ClientUpdate

DIM = 5
OPEN = 1000.0
DEADLINE = OPEN + 600.0
SELECTED = [f"dev-{i:02d}" for i in range(13)]


def make_task(**kw) -> DeviceTask:
    args = dict(task_id=4, round=3, model_version=7, selected=SELECTED, deadline=DEADLINE,
                checkin_interval_s=300.0, retry_spread_s=20.0)
    args.update(kw)
    return DeviceTask(**args)


def delta_of(i: int) -> np.ndarray:
    return np.full(DIM, 0.1 * i, dtype=np.float32)


def upload_args(dev: str, task: Task, now: float = OPEN + 10, **over) -> dict:
    args = dict(device_id=dev, round=task.round, base_version=task.model_version,
                upload_key=task.upload_key, num_examples=int(dev[-2:]) + 1,
                delta=delta_of(int(dev[-2:])), now=now)
    args.update(over)
    return args


def submit(t: DeviceTask, dev: str, task: Task, now: float = OPEN + 10, **over
           ) -> UploadResult:
    """An upload the coordinator accepts (a retry is answered by the session alone)."""
    args = upload_args(dev, task, now, **over)
    admitted = t.admit(**args)
    if isinstance(admitted, UploadResult):
        return admitted
    return t.accept(args["device_id"], admitted, args["now"])


def snapshot(t: DeviceTask, devices: tuple[str, ...]) -> tuple:
    """What a refusal must not change: who holds a task, who was accepted, the close, the
    replays, and each device's answer to a check-in (asked of devices that already hold a
    task or were answered, so asking changes nothing either)."""
    rng = np.random.default_rng(0)
    return (t.tasked, t.devices_with("tasked"), t.devices_with("accepted"), t.accepted,
            t.closed, t.replays, [t.check_in(d, OPEN + 10, rng=rng) for d in devices])


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture()
def session(rng) -> tuple[DeviceTask, dict[str, Task]]:
    """A task with dev-00, dev-01 and dev-02 tasked and dev-00's update accepted."""
    t = make_task()
    tasks = {d: t.check_in(d, OPEN, rng=rng) for d in SELECTED[:3]}
    submit(t, "dev-00", tasks["dev-00"])
    return t, tasks


# ---------------------------------------------------------------------------------------------
# Check-in
# ---------------------------------------------------------------------------------------------


def test_each_selected_device_gets_its_own_one_time_key(rng):
    t = make_task()
    tasks = {d: t.check_in(d, OPEN + 1, rng=rng) for d in SELECTED}
    assert all(isinstance(k, Task) for k in tasks.values())
    assert {(k.round, k.model_version, k.deadline) for k in tasks.values()} == \
        {(3, 7, DEADLINE)}
    keys = [k.upload_key for k in tasks.values()]
    assert len(set(keys)) == 13 and all(len(bytes.fromhex(k)) == 16 for k in keys)
    assert t.tasked == tuple(SELECTED)


def test_check_in_is_idempotent_until_the_upload(rng):
    t = make_task()
    a = t.check_in("dev-04", OPEN, rng=rng)
    b = t.check_in("dev-04", OPEN + 50, rng=rng)
    assert a == b and a.upload_key == b.upload_key  # a lost reply costs nothing
    assert "upload_key='…'" in repr(a) and a.upload_key not in repr(a)
    assert t.devices_with("tasked") == ("dev-04",)
    submit(t, "dev-04", a, now=OPEN + 55)
    c = t.check_in("dev-04", OPEN + 60, rng=rng)
    assert isinstance(c, ComeBack) and c.reason == "already_reported"
    assert OPEN + 60 + 150 <= c.at <= OPEN + 60 + 450
    assert t.devices_with("tasked") == () and t.devices_with("accepted") == ("dev-04",)


def test_client_ids_can_be_the_coordinators_cohort(rng):
    t = make_task(selected=["a", "b", "c"], client_ids=[40, 7, 12])
    assert t.client_id("b") == 7 and t.device_id(12) == "c"
    task = t.check_in("b", OPEN, rng=rng)
    admitted = t.admit("b", 3, 7, task.upload_key, 2, delta_of(1), OPEN + 1)
    assert isinstance(admitted, ClientUpdate)
    assert (admitted.client_id, admitted.base_version, admitted.num_examples) == (7, 7, 2)
    assert t.accept("b", admitted, OPEN + 1).client_id == 7


# ---------------------------------------------------------------------------------------------
# Refusals: each reason, in order, changing nothing but its counter
# ---------------------------------------------------------------------------------------------


def _bad(reason: str, tasks: dict[str, Task]) -> dict:
    """Overrides of an upload from dev-01 that must fail with ``reason`` (only that fault)."""
    t = tasks["dev-01"]
    return {
        "not_selected": dict(device_id="stranger"),
        "wrong_round": dict(round=t.round + 1),
        "stale": dict(base_version=t.model_version - 1),
        "bad_key": dict(upload_key=tasks["dev-02"].upload_key),
        "duplicate": dict(device_id="dev-00", upload_key=tasks["dev-00"].upload_key,
                          delta=delta_of(5)),
        "late": dict(now=DEADLINE),
        "bad_metrics": dict(metrics={"loss": float("nan")}),
    }[reason]


@pytest.mark.parametrize("reason", SESSION_REASONS)
def test_each_refusal_reason_changes_nothing_but_its_counter(reason, session):
    t, tasks = session
    before = snapshot(t, tuple(tasks))
    with pytest.raises(UpdateRejected) as exc:
        t.admit(**upload_args("dev-01", tasks["dev-01"], **_bad(reason, tasks)))
    assert exc.value.reason == reason and exc.value.round == 3
    assert snapshot(t, tuple(tasks)) == before
    assert t.rejections == {reason: 1}
    # the device can still do what it could before (unless the fault was the time itself)
    if reason != "late":
        assert submit(t, "dev-01", tasks["dev-01"]).position == 2


def test_a_coordinator_refusal_is_counted_and_leaves_the_device_its_task(session):
    t, tasks = session
    before = snapshot(t, tuple(tasks))
    admitted = t.admit(**upload_args("dev-01", tasks["dev-01"],
                                     delta=np.full(DIM, np.nan, np.float32)))
    assert isinstance(admitted, ClientUpdate)  # the session does not judge the values
    error = t.refuse("dev-01", "non_finite", "element 0 is not finite")
    assert (error.reason, error.client_id, error.round) == ("non_finite", "dev-01", 3)
    assert snapshot(t, tuple(tasks)) == before and t.rejections == {"non_finite": 1}
    assert submit(t, "dev-01", tasks["dev-01"]).position == 2  # a corrected update


@pytest.mark.parametrize("over, reason", [
    (dict(device_id="stranger", round=4), "not_selected"),
    (dict(round=4, base_version=6, upload_key="x"), "wrong_round"),
    (dict(base_version=6, upload_key="x", now=DEADLINE + 1), "stale"),
    (dict(upload_key="x", now=DEADLINE + 1), "bad_key"),
    (dict(now=DEADLINE + 1, metrics={"loss": "high"}), "late"),
    (dict(metrics={"loss": "high"}, delta=np.full(DIM, np.nan, np.float32)), "bad_metrics"),
])
def test_first_failing_check_names_the_reason(over, reason, rng):
    t = make_task()
    task = t.check_in("dev-01", OPEN, rng=rng)
    with pytest.raises(UpdateRejected) as exc:
        t.admit(**upload_args("dev-01", task, **over))
    assert exc.value.reason == reason


def test_an_accepted_device_sending_another_payload_late_is_a_duplicate(session):
    t, tasks = session  # the retry rule is checked before the time
    with pytest.raises(UpdateRejected) as exc:
        t.admit(**upload_args("dev-00", tasks["dev-00"], now=DEADLINE + 5, num_examples=99))
    assert exc.value.reason == "duplicate"


def test_a_verified_payload_digest_stands_for_the_delta_in_the_retry_rule(rng):
    t = make_task()
    task = t.check_in("dev-01", OPEN, rng=rng)
    args = upload_args("dev-01", task)
    first = t.accept("dev-01", t.admit(**args, fingerprint=b"A" * 32), args["now"],
                     fingerprint=b"A" * 32)
    # the same bytes again: the original answer, whatever the delta object is
    again = t.admit(**{**args, "delta": delta_of(1).copy()}, fingerprint=b"A" * 32)
    assert again == first and t.replays == 1 and t.accepted == 1
    for over, fp in [({}, b"B" * 32), ({"num_examples": 99}, b"A" * 32), ({}, None)]:
        with pytest.raises(UpdateRejected) as exc:  # other bytes, weight, or no digest
            t.admit(**{**args, **over}, fingerprint=fp)
        assert exc.value.reason == "duplicate"
    assert t.accepted == 1 and t.replays == 1


def test_selected_device_without_a_task_has_no_valid_key(rng):
    t = make_task()
    task = t.check_in("dev-01", OPEN, rng=rng)
    with pytest.raises(UpdateRejected) as exc:  # dev-02 never checked in
        t.admit("dev-02", 3, 7, task.upload_key, 5, delta_of(2), OPEN + 1)
    assert exc.value.reason == "bad_key" and "no task" in str(exc.value)


@pytest.mark.parametrize("call", ["check_in", "admit", "is_open"])
def test_a_time_that_is_not_a_number_is_the_carriers_bug(call, rng):
    t = make_task()
    task = t.check_in("dev-01", OPEN, rng=rng)
    with pytest.raises(ConfigError) as exc:
        if call == "check_in":
            t.check_in("dev-01", math.nan, rng=rng)
        elif call == "admit":
            t.admit(**upload_args("dev-01", task, now=math.nan))
        else:
            t.is_open(math.inf)
    assert exc.value.key == "now"


# ---------------------------------------------------------------------------------------------
# Retries and closing
# ---------------------------------------------------------------------------------------------


def test_retry_returns_the_original_acceptance_without_double_counting(rng):
    t = make_task()
    tasks = {d: t.check_in(d, OPEN, rng=rng) for d in SELECTED[:2]}
    original = submit(t, "dev-00", tasks["dev-00"], now=OPEN + 5)
    # the same payload again (weight as a numpy int, delta a fresh copy): the lost reply
    again = t.admit(**upload_args("dev-00", tasks["dev-00"], now=OPEN + 9,
                                  num_examples=np.int64(1), delta=delta_of(0).copy()))
    assert again is original and again.accepted_at == OPEN + 5
    assert t.accepted == 1 and t.replays == 1 and t.rejections == {}
    second = submit(t, "dev-01", tasks["dev-01"], now=OPEN + 20)
    t.close("target reached")
    # a retry whose reply was lost learns it was accepted, after the close and the deadline
    assert t.admit(**upload_args("dev-01", tasks["dev-01"], now=DEADLINE + 100)) is second
    assert t.accepted == 2 and t.replays == 2
    with pytest.raises(UpdateRejected) as exc:  # same key, another payload
        t.admit(**upload_args("dev-01", tasks["dev-01"], num_examples=3))
    assert exc.value.reason == "duplicate" and t.accepted == 2


def test_close_makes_uploads_late_and_is_idempotent(rng):
    t = make_task()
    tasks = {d: t.check_in(d, OPEN, rng=rng) for d in SELECTED[:3]}
    submit(t, "dev-00", tasks["dev-00"])
    assert t.is_open(OPEN + 30)
    t.close("round closed: target_reached")
    t.close("something else")
    assert t.closed == "round closed: target_reached" and not t.is_open(OPEN + 31)
    with pytest.raises(UpdateRejected) as exc:
        t.admit(**upload_args("dev-01", tasks["dev-01"], now=OPEN + 32))
    assert exc.value.reason == "late" and "target_reached" in str(exc.value)
    assert t.check_in("dev-02", OPEN + 33, rng=rng).reason == "round_closed"
    # authentication still answers (a secure round authenticates after its close)
    assert t.authenticate("dev-02", 3, 7, tasks["dev-02"].upload_key) == 2
    with pytest.raises(UpdateRejected) as bad:
        t.authenticate("dev-02", 3, 7, "0" * 32)
    assert bad.value.reason == "bad_key"
    assert t.accepted == 1 and t.rejections == {"late": 1, "bad_key": 1}


def test_the_deadline_ends_the_window_and_is_not_in_it(rng):
    t = make_task()
    tasks = {d: t.check_in(d, OPEN, rng=rng) for d in SELECTED[:2]}
    assert submit(t, "dev-00", tasks["dev-00"], now=DEADLINE - 1e-6).position == 1
    with pytest.raises(UpdateRejected) as exc:
        t.admit(**upload_args("dev-01", tasks["dev-01"], now=DEADLINE))
    assert exc.value.reason == "late" and "deadline" in str(exc.value)
    assert t.check_in("dev-05", DEADLINE, rng=rng).reason == "round_closed"
    assert t.closed == ""  # only the coordinator closes a task


# ---------------------------------------------------------------------------------------------
# Pace steering
# ---------------------------------------------------------------------------------------------


def test_unselected_devices_spread_uniformly_over_the_pace_window():
    t = make_task(checkin_interval_s=300.0)
    now = OPEN + 5
    rng = np.random.default_rng(2024)
    backs = [t.check_in(f"other-{i}", now, rng=rng) for i in range(1000)]
    assert {b.reason for b in backs} == {"not_selected"}
    at = np.array([b.at for b in backs])
    # within 0.5-1.5 x the interval: none sooner (the interval is what the server asks)
    assert ((at >= now + 150) & (at <= now + 450)).all()
    assert len(np.unique(at)) == 1000  # no two devices come back at the same instant
    # Kolmogorov-Smirnov against U[now + 150, now + 450]; seeded, so deterministic
    assert stats.kstest(at, stats.uniform(loc=now + 150, scale=300).cdf).pvalue > 0.01
    assert stats.kstest(at, stats.uniform(loc=now, scale=300).cdf).pvalue < 1e-6
    counts, _ = np.histogram(at, bins=10, range=(now + 150, now + 450))
    assert counts.max() < 140  # expected 100 +- 10 per tenth of the window
    assert t.tasked == ()  # asking changed nothing
    # deterministic given the generator
    assert t.check_in("other-0", now, rng=np.random.default_rng(2024)).at == at[0]


def test_closed_task_sends_devices_back_soon():
    t = make_task(retry_spread_s=20.0, checkin_interval_s=300.0)
    t.close("round closed")
    rng = np.random.default_rng(7)
    backs = [t.check_in(d, OPEN + 2, rng=rng) for d in SELECTED + ["other"]]
    assert {b.reason for b in backs} == {"round_closed"}
    at = np.array([b.at for b in backs])
    assert ((at >= OPEN + 2) & (at <= OPEN + 22)).all() and np.ptp(at) > 0


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("over, key", [
    (dict(task_id=-1), "task_id"), (dict(round=-1), "round"), (dict(round=True), "round"),
    (dict(model_version=1.5), "model_version"), (dict(selected=[]), "selected"),
    (dict(selected=["a", "a", "b"]), "selected"), (dict(selected="abc"), "selected"),
    (dict(selected=["a", ""]), "selected"), (dict(selected=["a", 3]), "selected"),
    (dict(deadline=math.nan), "deadline"), (dict(deadline="soon"), "deadline"),
    (dict(client_ids=[1, 1] + list(range(2, 13))), "client_ids"),
    (dict(client_ids=[0]), "client_ids"), (dict(client_ids=[-1] + list(range(1, 13))),
                                           "client_ids"),
    (dict(checkin_interval_s=-1.0), "checkin_interval_s"), (dict(checkin_interval_s=math.inf),
                                                  "checkin_interval_s"),
    (dict(retry_spread_s=math.nan), "retry_spread_s"),
])
def test_bad_construction_names_the_field(over, key):
    with pytest.raises(ConfigError) as exc:
        make_task(**over)
    assert exc.value.key == key and key in str(exc.value)


def test_an_endless_task_has_no_deadline(rng):
    t = make_task(deadline=math.inf)
    task = t.check_in("dev-03", OPEN, rng=rng)
    assert task.deadline == math.inf
    assert submit(t, "dev-03", task, now=1e12).position == 1


# -- the weight cap ----------------------------------------------------------------------------


def test_a_fixed_max_weight_caps_every_claim_at_once():
    cap = WeightCap(max_weight=15)
    assert cap.cap == 15 and [cap.weigh(n) for n in (0, 3, 15, 16, 10**7)] == [0, 3, 15, 15, 15]


def test_the_derived_cap_is_a_multiple_of_the_median_size_each_device_counted_once():
    cap = WeightCap(multiple=4.0, min_devices=3)
    cap.note("a", 10)
    cap.note("b", 20)
    assert cap.refresh() is None and cap.weigh(10**7) == 10**7  # too few sizes yet
    cap.note("c", 30)
    cap.note("z", 0)  # a device without examples does not pull the median down
    assert cap.cap is None  # sizes count from the next refresh (a task opening)
    assert cap.refresh() == 80 and cap.weigh(10**7) == 80 and cap.weigh(79) == 79
    for _ in range(50):  # a device repeating a huge claim is still one vote
        cap.note("c", 10**7)
    assert cap.refresh() == 80  # median of 10, 20, 10**7


@settings(max_examples=60, deadline=None)
@given(honest=st.lists(st.integers(1, 10_000), min_size=3, max_size=40),
       lies=st.lists(st.integers(1, 10**9), max_size=40), multiple=st.floats(1.0, 10.0))
def test_a_lying_minority_cannot_raise_the_cap_above_the_honest_sizes(honest, lies,
                                                                      multiple):
    lies = lies[:(len(honest) - 1) // 2]  # strictly fewer liars than honest devices
    cap = WeightCap(multiple=multiple, min_devices=1)
    for i, n in enumerate(honest):
        cap.note(f"h{i}", n)
    for i, n in enumerate(lies):
        cap.note(f"l{i}", n)
    # the median of all sizes lies between the honest devices' smallest and largest
    assert multiple * min(honest) - 1 <= cap.refresh() <= multiple * max(honest)
    share = cap.weigh(10**9) / (cap.weigh(10**9) + sum(honest))
    assert share <= multiple * max(honest) / (multiple * max(honest) + sum(honest))


def test_weight_cap_arguments_are_checked():
    for kw in (dict(max_weight=-1), dict(multiple=0.5), dict(multiple=float("nan")),
               dict(min_devices=0)):
        with pytest.raises(ConfigError):
            WeightCap(**kw)


def test_device_metrics_are_bounded_in_number_name_and_value():
    task = make_task()
    t = task.check_in("dev-01", OPEN, rng=np.random.default_rng(0))
    for metrics, why in (({"loss": 2e9}, "bound"), ({f"m{i}": 1.0 for i in range(33)},
                                                    "at most 32"),
                         ({"": 1.0}, "name"), ({"loss": float("inf")}, "finite")):
        with pytest.raises(UpdateRejected, match=why) as info:
            task.admit(**upload_args("dev-01", t), metrics=metrics)
        assert info.value.reason == "bad_metrics"
    admitted = task.admit(**upload_args("dev-01", t), metrics={"loss": -1e9, "acc": 0.5})
    assert dict(admitted.metrics) == {"loss": -1e9, "acc": 0.5}
