"""DeviceGateway in front of a real Coordinator and SyncPolicy, driven by scripted devices at
explicit times: this direct driving of the gateway is the in-memory transport. The round
rules (target, deadline, minimum fraction, abandon and retry) are the policy's; the gateway
and its sessions must carry them to the devices faithfully -- every answer a device gets is
the coordinator's verdict, nothing is counted twice, a refused update changes nothing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from shoal.coordinator import Coordinator
from shoal.device_task import SESSION_REASONS, ComeBack, Task, UploadResult
from shoal.errors import UpdateRejected
from shoal.gateway import DeviceGateway, GatewaySettings
from shoal.pipeline import Pipeline, Validation
from shoal.policy import BufferedPolicy, SyncPolicy
from shoal.registry import MemoryRegistry, SQLiteRegistry
from shoal.sampling import UniformSampler
from shoal.strategy import FedAvg

DIM = 4
DEVICES = tuple(f"dev-{i}" for i in range(8))  # client id i is dev-i (sorted order)
GATEWAY = GatewaySettings(idle_retry_s=2.0, checkin_interval_s=100.0)
#: reasons the coordinator's pipeline gives (the sessions give SESSION_REASONS)
VALIDATION_REASONS = ("wrong_dtype", "wrong_shape", "no_data", "bad_weight", "non_finite",
                      "norm_too_large")


class ScriptedSampler:
    """Samples the given cohorts in order, one per round attempt; then uniformly."""

    def __init__(self, cohorts: Sequence[Sequence[int]], per_round: int = 2) -> None:
        self._cohorts = [np.array(sorted(c), np.int64) for c in cohorts]
        self.per_round = per_round

    def sample(self, num_clients: int, rng: np.random.Generator,
               count: int | None = None) -> np.ndarray:
        if self._cohorts:
            return self._cohorts.pop(0)
        return np.sort(rng.choice(num_clients, size=count or self.per_round, replace=False))


class Devices:
    """Scripted devices in front of a gateway at a fake time ``now``; every call is followed
    by what the carrier's driving thread does: carry the backlog out (versions committed,
    rounds abandoned, the next task opened)."""

    def __init__(self, policy, sampler, *, steps: int | None = 3, devices=DEVICES,
                 max_norm: float | None = None, seed: int = 0,
                 on_commit: Callable[[Devices, object, object], None] | None = None,
                 on_abort: Callable[[object], None] | None = None,
                 settings: GatewaySettings = GATEWAY) -> None:
        self.gateway = DeviceGateway(devices, DIM, settings, rng=np.random.default_rng(seed))
        self.coordinator = Coordinator(FedAvg(), len(devices), sampler, seed=seed,
                                       policy=policy, steps=steps,
                                       pipeline=Pipeline(validation=Validation(max_norm)))
        self.commits: list[tuple[object, object]] = []
        self.aborts: list[tuple[object, str, bool]] = []
        self.outcomes: list = []
        self.registry = MemoryRegistry()  # where the aggregator writes the outcomes
        self.registry.enroll_many(list(devices), now=0.0)
        self._on_commit, self._on_abort = on_commit, on_abort
        self.now = 0.0
        self.gateway.start(self.coordinator, FedAvg().init(np.zeros(DIM, np.float32)), 0.0)
        self.settle()

    def settle(self) -> None:
        def committed(state, record) -> None:
            self.commits.append((state, record))
            if self._on_commit is not None:
                self._on_commit(self, state, record)

        def abandoned(record, reason, retry) -> None:
            self.aborts.append((record, reason, retry))
            if self._on_abort is not None:
                self._on_abort(record)

        self.gateway.carry_out(lambda: self.now, on_commit=committed, on_abort=abandoned)
        for o in self.gateway.take_outcomes():
            self.outcomes.append(o)
            self.registry.record_outcome(o.device_id, o.round, o.outcome, now=o.now)

    def check_in(self, device: str, at: float | None = None) -> Task | ComeBack:
        self.now = self.now if at is None else at
        decision, _, _ = self.gateway.check_in(device, self.now)
        self.settle()
        return decision

    def tasks(self, devices: Sequence[str], at: float | None = None) -> dict[str, Task]:
        out = {d: self.check_in(d, at) for d in devices}
        assert all(isinstance(t, Task) for t in out.values()), out
        return out

    def upload(self, device: str, task: Task, value: float = 1.0, n: int = 1, *,
               at: float | None = None, **over) -> UploadResult:
        self.now = self.now if at is None else at
        args = dict(device_id=device, round=task.round, base_version=task.model_version,
                    upload_key=task.upload_key, num_examples=n,
                    delta=np.full(DIM, value, np.float32), now=self.now)
        args.update(over)
        try:
            return self.gateway.upload(**args)
        finally:
            self.settle()

    def tick(self, at: float) -> None:
        self.now = at
        self.gateway.tick(at)
        self.settle()

    def reason(self, *args, **kw) -> str:
        """The reason an upload is refused with (the test fails if it is accepted)."""
        with pytest.raises(UpdateRejected) as exc:
            self.upload(*args, **kw)
        return exc.value.reason

    def outcome_of(self, device: str) -> list[str]:
        """The device's outcomes as the registry keeps them (one per round)."""
        return [o.outcome for o in self.registry.outcomes(device)]


def sync(target: int, asked: int, *, deadline_s: float = 600.0, min_fraction: float = 0.5,
         max_attempts: int = 1) -> SyncPolicy:
    return SyncPolicy(target=target, over_selection=asked / target, deadline_s=deadline_s,
                      min_fraction=min_fraction, max_attempts=max_attempts)


def fedavg(*updates: tuple[float, int]) -> np.ndarray:
    """The example-weighted mean of constant deltas ``(value, examples)``, as a model."""
    values, weights = zip(*updates)
    return np.full(DIM, np.average(values, weights=weights))


@pytest.fixture()
def devices() -> Callable[..., Devices]:
    return Devices


# ---------------------------------------------------------------------------------------------
# Round rules: target, deadline, minimum fraction, abandon
# ---------------------------------------------------------------------------------------------


def test_target_commits_exactly_the_first_updates_and_stragglers_are_late(devices):
    run = devices(sync(target=3, asked=5), ScriptedSampler([[0, 1, 2, 3, 4], [5, 6, 7]]),
                  steps=2)
    tasks = run.tasks(DEVICES[:5], at=1.0)
    assert {(t.round, t.model_version, t.deadline) for t in tasks.values()} == {(1, 0, 600.0)}
    assert len({t.upload_key for t in tasks.values()}) == 5
    assert run.check_in("dev-5").reason == "not_selected"
    receipts = [run.upload("dev-0", tasks["dev-0"], 1.0, 1, at=2.0),
                run.upload("dev-1", tasks["dev-1"], 2.0, 2, at=3.0),
                run.upload("dev-2", tasks["dev-2"], 4.0, 1, at=4.0)]
    assert [r.position for r in receipts] == [1, 2, 3]
    ((state, record),) = run.commits
    np.testing.assert_allclose(state.params, fedavg((1, 1), (2, 2), (4, 1)), rtol=1e-6)
    assert (record.version, record.accepted, record.examples, record.closed_by) == \
        (1, 3, 4, "target_reached")
    # the over-selected stragglers are refused as late, however good their update
    assert run.reason("dev-3", tasks["dev-3"], 100.0, 50, at=5.0) == "late"
    assert run.check_in("dev-4", at=6.0).reason == "not_selected"  # round 2 is open
    assert run.coordinator.accepted == 0 and len(run.commits) == 1
    nxt = run.check_in("dev-5", at=6.0)
    assert (nxt.round, nxt.model_version) == (2, 1)
    assert {d: run.outcome_of(d) for d in DEVICES[:5]} == {
        "dev-0": ["accepted"], "dev-1": ["accepted"], "dev-2": ["accepted"],
        "dev-3": ["late"], "dev-4": ["late"]}


def test_the_deadline_commits_what_arrived_in_time(devices):
    run = devices(sync(target=4, asked=4, deadline_s=10.0, min_fraction=0.5),
                  ScriptedSampler([[0, 1, 2, 3], [4, 5, 6, 7]]), steps=2)
    tasks = run.tasks(DEVICES[:4], at=0.0)
    run.upload("dev-0", tasks["dev-0"], 1.0, 3, at=2.0)
    run.upload("dev-1", tasks["dev-1"], 5.0, 1, at=10.0 - 1e-6)  # the window is [0, 10)
    assert run.reason("dev-2", tasks["dev-2"], at=10.0) == "late"
    assert run.commits == [] and run.gateway.next_wake() == 10.0
    run.tick(10.0)
    ((state, record),) = run.commits
    np.testing.assert_allclose(state.params, fedavg((1, 3), (5, 1)), rtol=1e-6)
    assert (record.accepted, record.closed_by, record.rejected) == \
        (2, "deadline", {"timed_out": 2})
    # the closed round stays closed for its devices, and they are recorded as late
    assert run.reason("dev-3", tasks["dev-3"], at=11.0) == "late"
    assert run.outcome_of("dev-2") == ["late"] and run.outcome_of("dev-3") == ["late"]
    # the gateway keeps only the versions an open task trains from
    assert run.check_in("dev-4", at=11.0).model_version == 1
    assert run.gateway.params(0) is None and run.gateway.params(1) is not None


def test_too_few_by_the_deadline_abandons_and_retries_with_a_fresh_cohort(devices):
    run = devices(sync(target=4, asked=4, deadline_s=10.0, min_fraction=0.75,
                       max_attempts=2), ScriptedSampler([[0, 1, 2, 3], [4, 5, 6, 7]]),
                  steps=1)
    tasks = run.tasks(DEVICES[:4], at=0.0)
    run.upload("dev-0", tasks["dev-0"], 7.0, 1, at=1.0)
    run.upload("dev-1", tasks["dev-1"], 7.0, 1, at=2.0)
    run.tick(10.0)
    ((record, reason, retry),) = run.aborts
    assert retry and not record.committed and record.closed_by == "deadline"
    assert record.accepted == 2 and record.rejected == {"timed_out": 2}
    assert "fewer than the round's minimum" in reason
    # the same round again, with a fresh cohort and deadline, from the same version
    again = run.tasks(DEVICES[4:], at=11.0)
    assert {(t.round, t.model_version, t.deadline) for t in again.values()} == {(1, 0, 20.0)}
    assert run.reason("dev-2", tasks["dev-2"], at=12.0) == "late"
    assert run.check_in("dev-0", at=12.0).reason == "not_selected"
    run.tick(20.0)  # nobody reported: the last attempt is abandoned and the run stops
    assert [retry for _, _, retry in run.aborts] == [True, False]
    assert "could not commit" in run.gateway.finished
    assert run.commits == [] and np.all(run.coordinator.state.params == 0)
    assert run.check_in("dev-4", at=22.0).reason == "no_round"
    assert run.reason("dev-5", again["dev-5"], at=22.0) == "late"


@pytest.mark.parametrize("fraction, target, least", [(0.7, 8, 6), (0.71, 7, 5), (1.0, 3, 3),
                                                     (0.01, 8, 1), (0.3, 8, 3)])
def test_a_round_commits_with_ceil_of_min_fraction_times_target(fraction, target, least,
                                                                 devices):
    for reported, commits in ((least - 1, False), (least, True)):
        run = devices(sync(target=target, asked=target, deadline_s=10.0,
                           min_fraction=fraction), ScriptedSampler([range(target)]), steps=1)
        tasks = run.tasks(DEVICES[:target], at=0.0)
        for i in range(reported):
            run.upload(f"dev-{i}", tasks[f"dev-{i}"], float(i), 1, at=1.0 + i)
        run.tick(10.0)
        assert (len(run.commits), len(run.aborts)) == ((1, 0) if commits else (0, 1))
        if commits:
            assert run.commits[0][1].accepted == least


# ---------------------------------------------------------------------------------------------
# What a device is told: refusals, retries, check-ins
# ---------------------------------------------------------------------------------------------


def _fault(reason: str, tasks: dict[str, Task]) -> dict:
    """Overrides of a dev-0 upload that must be refused with ``reason``."""
    t = tasks["dev-0"]
    return {
        "wrong_dtype": dict(delta=np.ones(DIM, np.int32)),
        "wrong_shape": dict(delta=np.ones(DIM + 1, np.float32)),
        "no_data": dict(n=0),
        "bad_weight": dict(n=-3),
        "non_finite": dict(delta=np.array([0, np.nan, 0, 0], np.float32)),
        "norm_too_large": dict(delta=np.full(DIM, 6.0, np.float32)),  # norm 12 > 10
        "not_selected": dict(device_id="dev-7"),
        "wrong_round": dict(round=t.round + 1),
        "stale": dict(base_version=t.model_version + 1),
        "bad_key": dict(upload_key=tasks["dev-1"].upload_key),
        "bad_metrics": dict(metrics={"loss": float("inf")}),
    }[reason]


@pytest.mark.parametrize("reason", VALIDATION_REASONS + tuple(
    r for r in SESSION_REASONS if r not in ("duplicate", "late")))
def test_a_refused_update_changes_nothing(reason, devices):
    run = devices(sync(target=2, asked=3), ScriptedSampler([[0, 1, 2]]), steps=1,
                  max_norm=10.0)
    tasks = run.tasks(DEVICES[:3], at=0.0)
    run.upload("dev-1", tasks["dev-1"], 2.0, 1, at=1.0)
    before = (run.coordinator.accepted, run.coordinator.version, run.gateway.latest_version,
              run.check_in("dev-0"), run.check_in("dev-2"))
    assert run.reason("dev-0", tasks["dev-0"], 1.0, **_fault(reason, tasks), at=2.0) == reason
    assert (run.coordinator.accepted, run.coordinator.version, run.gateway.latest_version,
            run.check_in("dev-0"), run.check_in("dev-2")) == before
    assert run.gateway.rejections == {reason: 1}
    # the device still holds its task: its corrected update completes the round
    assert run.upload("dev-0", tasks["dev-0"], 4.0, 3, at=3.0).position == 2
    ((state, record),) = run.commits
    np.testing.assert_allclose(state.params, fedavg((2, 1), (4, 3)), rtol=1e-6)
    assert record.accepted == 2 and record.examples == 4
    assert record.rejected == ({reason: 1} if reason in VALIDATION_REASONS else {})


@pytest.mark.parametrize("over, reason", [
    (dict(delta=[0.0] * DIM), "wrong_dtype"),                    # not an array
    (dict(delta=np.zeros(DIM, np.complex64)), "wrong_dtype"),
    (dict(delta=np.zeros((), np.float32)), "wrong_shape"),
    (dict(delta=np.array([0, np.nan, 0, 0], np.float64)), "non_finite"),
    # 1e20 ** 2 overflows float32: the norm is computed in float64 and still refused
    (dict(delta=np.array([1e20, 1e20, 0, 0], np.float32)), "norm_too_large"),
    (dict(n=0), "no_data"), (dict(n=np.int64(0)), "no_data"), (dict(n=-3), "bad_weight"),
    (dict(n=1.5), "bad_weight"), (dict(n=True), "bad_weight"), (dict(n="7"), "bad_weight"),
    (dict(n=None), "bad_weight"), (dict(n=10_000_001), "bad_weight"),
])
def test_what_the_pipeline_refuses_reaches_the_device(over, reason, devices):
    run = devices(sync(target=2, asked=2), ScriptedSampler([[0, 1]]), steps=1, max_norm=5.0)
    tasks = run.tasks(DEVICES[:2], at=0.0)
    assert run.reason("dev-0", tasks["dev-0"], at=1.0, **over) == reason
    assert run.coordinator.accepted == 0
    # the bounds themselves are allowed: a norm of exactly max_norm, the largest weight
    assert run.upload("dev-0", tasks["dev-0"], n=np.int64(10_000_000), at=2.0,
                      delta=np.array([3, 4, 0, 0], np.float32)).num_examples == 10_000_000


@pytest.mark.parametrize("rows", [1, 2])
def test_a_delta_with_rows_is_refused_as_wrong_shape(rows, devices):
    run = devices(sync(target=2, asked=2), ScriptedSampler([[0, 1]]), steps=1)
    tasks = run.tasks(DEVICES[:2], at=0.0)
    delta = np.ones((rows, DIM), np.float32)
    assert run.reason("dev-0", tasks["dev-0"], delta=delta, at=1.0) == "wrong_shape"


def test_a_retry_gets_the_original_acceptance_and_counts_once(devices):
    run = devices(sync(target=2, asked=3), ScriptedSampler([[0, 1, 2]]), steps=1)
    tasks = run.tasks(DEVICES[:3], at=0.0)
    first = run.upload("dev-0", tasks["dev-0"], 1.0, 2, at=1.0)
    assert run.upload("dev-0", tasks["dev-0"], 1.0, 2, at=2.0) is first  # a lost reply
    assert run.coordinator.accepted == 1 and run.gateway.rejections == {}
    assert run.reason("dev-0", tasks["dev-0"], 9.0, 2, at=3.0) == "duplicate"
    second = run.upload("dev-1", tasks["dev-1"], 4.0, 1, at=4.0)
    # after the round closed and the run finished, the retry still learns it was accepted
    assert run.upload("dev-1", tasks["dev-1"], 4.0, 1, at=700.0) is second
    ((state, record),) = run.commits
    assert record.accepted == 2 and record.examples == 3
    np.testing.assert_allclose(state.params, fedavg((1, 2), (4, 1)), rtol=1e-6)
    assert run.outcome_of("dev-0") == ["accepted"] and run.outcome_of("dev-1") == ["accepted"]


def test_check_in_is_idempotent_until_the_upload(devices):
    run = devices(sync(target=2, asked=3), ScriptedSampler([[0, 1, 2]]), steps=1)
    a = run.check_in("dev-0", at=1.0)
    assert run.check_in("dev-0", at=50.0) == a  # same task, same key
    run.upload("dev-0", a, at=60.0)
    back = run.check_in("dev-0", at=70.0)
    assert isinstance(back, ComeBack) and back.reason == "already_reported"
    interval = GATEWAY.checkin_interval_s
    assert 70.0 + 0.5 * interval <= back.at <= 70.0 + 1.5 * interval
    assert run.coordinator.accepted == 1


def test_devices_the_open_task_does_not_need_are_paced_over_the_interval(devices):
    run = devices(sync(target=2, asked=2), ScriptedSampler([[0, 1]]), steps=1)
    now, interval = 5.0, GATEWAY.checkin_interval_s
    at = np.array([run.check_in(f"phone-{i:04d}", at=now).at for i in range(1000)]
                  + [run.check_in("dev-5").at])
    assert ((at >= now + 0.5 * interval) & (at <= now + 1.5 * interval)).all()
    assert len(np.unique(at)) == len(at)
    # Kolmogorov-Smirnov against U[now + 0.5 i, now + 1.5 i]; seeded, so deterministic
    assert stats.kstest(at, stats.uniform(loc=now + 0.5 * interval, scale=interval).cdf
                        ).pvalue > 0.01
    counts, _ = np.histogram(at, bins=10, range=(now + 0.5 * interval, now + 1.5 * interval))
    assert counts.max() < 140


def test_devices_that_reported_are_paced_over_the_same_interval(devices):
    # a device the open task already has an update from comes back like one it never asked:
    # within 0.5-1.5 x checkin_interval_s, uniformly (it used to be the earlier of that and
    # a draw from [0, interval]: back twice as often, and as many check-ins to answer)
    n = 400
    names = [f"dev-{i}" for i in range(n + 1)]
    run = devices(sync(target=n + 1, asked=n + 1), ScriptedSampler([list(range(n + 1))]),
                  steps=1, devices=names)
    for dev in names[:n]:  # the last one keeps the round open
        run.upload(dev, run.check_in(dev, at=1.0), 1.0, 1)
    now, interval = 2.0, GATEWAY.checkin_interval_s
    backs = [run.check_in(dev, at=now) for dev in names[:n]]
    assert {b.reason for b in backs} == {"already_reported"}
    at = np.array([b.at for b in backs])
    assert ((at >= now + 0.5 * interval) & (at <= now + 1.5 * interval)).all()
    assert stats.kstest(at, stats.uniform(loc=now + 0.5 * interval, scale=interval).cdf
                        ).pvalue > 0.01


def test_an_accepted_upload_is_answered_with_what_a_check_in_would_get(devices):
    # the upload's reply carries the device's next come-back, so it need not check in right
    # after uploading to learn it (one call fewer per device and round)
    run = devices(sync(target=3, asked=3), ScriptedSampler([[0, 1, 2], [0, 1, 3]]), steps=2)
    tasks = run.tasks(["dev-0", "dev-1", "dev-2"], at=1.0)
    interval = GATEWAY.checkin_interval_s
    run.upload("dev-0", tasks["dev-0"], at=2.0)
    after = run.gateway.after_upload("dev-0", tasks["dev-0"].round, 2.0)
    asked = run.check_in("dev-0", at=2.0)
    assert isinstance(after, ComeBack) and isinstance(asked, ComeBack)
    assert after.reason == asked.reason == "already_reported"
    assert 2.0 + 0.5 * interval <= after.at <= 2.0 + 1.5 * interval
    # it is the device's appointment: absent only past it (and the grace)
    assert run.gateway.appointments.absent(after.at + 0.5 * interval, ["dev-0"]) == []
    # the last upload closes the round; the driver opens the next one, which asks dev-0,
    # dev-1 and dev-3: the two it asked again are told to check in at once (None), dev-2,
    # which it did not ask, is paced like any device no task needs
    run.upload("dev-1", tasks["dev-1"], at=3.0)
    run.upload("dev-2", tasks["dev-2"], at=3.0)
    assert len(run.commits) == 1
    assert run.gateway.after_upload("dev-0", tasks["dev-0"].round, 3.0) is None
    assert run.gateway.after_upload("dev-1", tasks["dev-1"].round, 3.0) is None
    paced = run.gateway.after_upload("dev-2", tasks["dev-2"].round, 3.0)
    assert paced is not None and paced.reason == "not_selected"
    assert 3.0 + 0.5 * interval <= paced.at <= 3.0 + 1.5 * interval
    assert isinstance(run.check_in("dev-0", at=3.0), Task)


def test_after_the_last_round_an_upload_is_answered_as_a_check_in_would_be(devices):
    run = devices(sync(target=2, asked=2), ScriptedSampler([[0, 1]]), steps=1)
    tasks = run.tasks(["dev-0", "dev-1"], at=1.0)
    run.upload("dev-0", tasks["dev-0"], at=2.0)
    run.upload("dev-1", tasks["dev-1"], at=2.0)
    assert run.gateway.finished
    after = run.gateway.after_upload("dev-1", tasks["dev-1"].round, 2.0)
    asked = run.check_in("dev-1", at=2.0)
    assert isinstance(after, ComeBack) and isinstance(asked, ComeBack)
    assert after.reason == asked.reason
    assert 2.0 <= after.at <= 2.0 + GATEWAY.idle_retry_s


def test_while_a_version_is_persisted_its_round_sends_devices_back_soon(devices):
    answers: dict[str, ComeBack] = {}

    def persist(run: Devices, state, record) -> None:  # the I/O runs outside the lock
        answers["member"] = run.gateway.check_in("dev-2", run.now)[0]
        answers["other"] = run.gateway.check_in("dev-6", run.now)[0]

    run = devices(sync(target=2, asked=3), ScriptedSampler([[0, 1, 2], [3, 4]]), steps=2,
                  on_commit=persist)
    tasks = run.tasks(DEVICES[:3], at=0.0)
    run.upload("dev-0", tasks["dev-0"], at=1.0)
    run.upload("dev-1", tasks["dev-1"], at=2.0)
    assert answers["member"].reason == "round_closed"
    assert answers["other"].reason == "no_round"
    for back in answers.values():
        assert 2.0 <= back.at <= 2.0 + GATEWAY.idle_retry_s
    assert run.check_in("dev-3", at=3.0).model_version == 1  # then the next task opens


def test_the_registry_learns_each_devices_final_answer(devices, tmp_path):
    run = devices(sync(target=2, asked=4), ScriptedSampler([[0, 1, 2, 3]]), steps=1)
    tasks = run.tasks(DEVICES[:4], at=0.0)
    assert run.reason("dev-0", tasks["dev-0"], np.nan, at=1.0) == "non_finite"
    run.upload("dev-0", tasks["dev-0"], 1.0, at=2.0)  # a corrected update
    assert run.reason("dev-1", tasks["dev-1"], upload_key="0" * 32, at=3.0) == "bad_key"
    run.upload("dev-3", tasks["dev-3"], 1.0, at=4.0)  # the target: dev-2 dropped out
    assert run.reason("dev-0", tasks["dev-0"], 5.0, at=5.0) == "duplicate"
    registry = SQLiteRegistry(tmp_path / "registry.db")  # the aggregator's default
    for d in DEVICES:
        registry.enroll(d, now=0.0)
    for o in run.outcomes:
        registry.record_outcome(o.device_id, o.round, o.outcome, now=o.now)
    assert {d: [o.outcome for o in registry.outcomes(d)] for d in DEVICES[:4]} == {
        "dev-0": ["accepted"], "dev-1": ["late"], "dev-2": ["late"], "dev-3": ["accepted"]}
    assert [registry.get(d).participation for d in DEVICES[:5]] == [1, 0, 0, 1, 0]


def test_buffered_tasks_free_the_versions_they_trained_from(devices):
    policy = BufferedPolicy(concurrency=2, buffer_size=1, staleness_exponent=0.0,
                            max_staleness=5)
    run = devices(policy, UniformSampler(1), steps=None)
    seen = Counter()
    for step in range(6):
        now = 1.0 + step
        tasks = {d: t for d in DEVICES if isinstance(t := run.check_in(d, at=now), Task)}
        assert 1 <= len(tasks) <= 2
        dev, task = min(tasks.items(), key=lambda kv: kv[1].model_version)
        run.upload(dev, task, 1.0, 1, at=now + 0.5)
        seen[task.model_version] += 1
        open_versions = {t.model_version for d, t in tasks.items() if d != dev}
        newest = run.coordinator.version
        for v in range(newest):
            assert (run.gateway.params(v) is not None) == (v in open_versions)
    assert run.coordinator.version == 6 and sum(seen.values()) == 6


# ---------------------------------------------------------------------------------------------
# Arbitrary interleavings
# ---------------------------------------------------------------------------------------------

_N = 6
_DEVS = tuple(f"d{i}" for i in range(_N))
_op = st.tuples(
    st.sampled_from(["check_in"] * 3 + ["everyone"] + ["upload"] * 6 + ["retry"] * 2
                    + ["tick"] * 2),
    st.integers(0, _N - 1),
    st.sampled_from(["good"] * 8 + ["nan", "shape", "stale", "bad_key", "foreign", "weight",
                                    "metrics", "unselected"]),
    st.integers(-3, 3),   # the delta's value
    st.integers(1, 4),    # the update's examples
    st.sampled_from([0.0, 0.5, 1.0, 5.0]),  # time passing before the op (deadline: 20)
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(_op, min_size=10, max_size=70), seed=st.integers(0, 2**16))
def test_any_interleaving_keeps_the_invariants(ops, seed):
    policy = SyncPolicy(target=2, over_selection=1.5, deadline_s=20.0, min_fraction=0.5,
                        max_attempts=1000)
    params = [np.zeros(DIM, np.float64)]
    folded: list[tuple[np.ndarray, int]] = []   # the open aggregation, as devices were told
    refused: Counter[str] = Counter()           # validation refusals in the open aggregation
    closed: list = []

    def close(record, committed: bool, state=None) -> None:
        assert record.accepted == len(folded)
        assert record.examples == sum(n for _, n in folded)
        for reason in VALIDATION_REASONS:  # the coordinator saw what devices were told
            assert record.rejected.get(reason, 0) == refused[reason]
        if committed:
            mean = sum(n * d for d, n in folded) / sum(n for _, n in folded)
            np.testing.assert_allclose(state.params, params[-1] + mean, atol=1e-6)
            params.append(np.asarray(state.params, np.float64))
        closed.append(record)
        folded.clear()
        refused.clear()

    run = Devices(policy, UniformSampler(2), steps=None, devices=_DEVS, seed=seed,
                  on_commit=lambda _, state, record: close(record, True, state),
                  on_abort=lambda record: close(record, False))
    known: dict[str, Task] = {}
    last: dict[str, tuple[dict, object]] = {}   # device -> (upload args, its answer)
    accepted: dict[str, list[tuple[UploadResult, tuple]]] = {d: [] for d in _DEVS}
    reported: dict[str, Task] = {}              # device -> the task it was accepted for
    for kind, i, variant, value, n, dt in ops:
        run.now += dt
        dev = _DEVS[i]
        # uploads mostly come from devices holding a task of the current version
        holders = [d for d, t in known.items() if t.model_version == run.coordinator.version]
        fresh = [d for d in holders if reported.get(d) is not known[d]]
        if fresh and value != 0:  # sometimes (value 0) a device that already reported
            holders = fresh
        if kind in ("upload", "retry") and variant != "unselected" and holders:
            dev = holders[i % len(holders)]
        elif kind in ("upload", "retry"):
            dev = next((d for d in _DEVS[i:] + _DEVS[:i] if d not in holders), dev)
        if kind == "tick":
            run.tick(run.now)
            continue
        for who in (_DEVS if kind == "everyone" else (dev,) if kind == "check_in" else ()):
            got = run.check_in(who)
            if isinstance(got, Task):
                assert (got.round, got.model_version) == (run.coordinator.version + 1,
                                                           run.coordinator.version)
                old = known.get(who)
                if old is not None and (old.round, old.model_version, old.deadline) == \
                        (got.round, got.model_version, got.deadline):
                    assert got.upload_key == old.upload_key  # the same task, the same key
                known[who] = got
            else:
                assert got.at >= run.now and got.reason in (
                    "no_round", "not_selected", "round_closed", "already_reported")
        if kind in ("check_in", "everyone"):
            continue
        if kind == "retry":
            if dev not in last:
                continue
            args, answer = last[dev]
            args = dict(args, now=run.now)
        else:
            args = _upload(dev, known, variant, value, n, run.now)
        before = (run.coordinator.accepted, run.coordinator.version, len(closed),
                  sum(run.gateway.rejections.values()))
        try:
            result = run.gateway.upload(**args)
        except UpdateRejected as exc:
            # a refused update changes nothing, and is counted once
            assert exc.reason in SESSION_REASONS + VALIDATION_REASONS
            assert (run.coordinator.accepted, run.coordinator.version, len(closed)) == \
                before[:3]
            assert sum(run.gateway.rejections.values()) == before[3] + 1
            if exc.reason in VALIDATION_REASONS:
                refused[exc.reason] += 1
            if kind == "retry" and isinstance(answer, UploadResult):
                # a retry of an accepted update is only refused once its task is forgotten
                # or the device has moved on to another task
                assert exc.reason in ("not_selected", "wrong_round", "bad_key")
            answer = exc
        else:
            replayed = next((p for r, p in accepted[dev] if r is result), None)
            if replayed is not None:
                # the same payload again: the original acceptance, not counted again
                assert replayed == _payload(args)
            else:
                assert kind != "retry", "a retried update was accepted anew"
                assert all(result is not r for rs in accepted.values() for r, _ in rs)
                assert result.device_id == dev and result.num_examples == args["num_examples"]
                accepted[dev].append((result, _payload(args)))
                reported[dev] = known[dev]
                folded.append((np.asarray(args["delta"], np.float64),
                               int(args["num_examples"])))
            answer = result
        finally:
            run.settle()
        last[dev] = (args, answer)
    # every acceptance is in exactly one closed aggregation or in the open one
    assert sum(r.accepted for r in closed) + run.coordinator.accepted == \
        sum(len(v) for v in accepted.values())
    # the registry counts a device's participation in exactly the rounds it was told its
    # update was accepted in (a retried round asks again under the same number)
    for d in _DEVS:
        told = {r.round for r, _ in accepted[d]}
        assert run.registry.get(d).participation == len(told)
        rounds = {o.round: o.outcome for o in run.registry.outcomes(d)}
        assert {r for r, o in rounds.items() if o == "accepted"} == told


def _payload(args: dict) -> tuple:
    delta = np.asarray(args["delta"])
    return int(args["num_examples"]), delta.dtype.str, delta.tobytes()


def _upload(dev: str, known: dict[str, Task], variant: str, value: int, n: int,
            now: float) -> dict:
    task = known.get(dev) or Task(round=1, model_version=0, upload_key="0" * 32,
                                  deadline=float("inf"))
    args = dict(device_id=dev, round=task.round, base_version=task.model_version,
                upload_key=task.upload_key, num_examples=n,
                delta=np.full(DIM, float(value), np.float32), now=now)
    if variant == "nan":
        args["delta"] = np.array([value, np.nan, 0, 0], np.float32)
    elif variant == "shape":
        args["delta"] = np.full(DIM - 1, float(value), np.float32)
    elif variant == "stale":
        args["base_version"] = task.model_version - 1 if task.model_version else 1
    elif variant == "bad_key":
        args["upload_key"] = "f" * 32
    elif variant == "foreign":  # another device's task: not its key, maybe not its round
        other = next((t for d, t in known.items() if d != dev), task)
        args.update(round=other.round, base_version=other.model_version,
                    upload_key=other.upload_key)
    elif variant == "weight":
        args["num_examples"] = 0 if n % 2 else -n
    elif variant == "metrics":
        args["metrics"] = {"loss": float("nan")}
    return args
