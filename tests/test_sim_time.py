"""Discrete-event simulation on device traces: timelines checked against hand-computed ones,
dropouts and windows against a brute-force availability oracle, lazy training, and
reproducibility.

The pool is the real in-process pool (a small MLP on random data, 50 examples per client) and
the engine the real coordinator and policies; only the traces are built by hand, so every
time in them is exact in floating point (50 examples x 20 ms = 1 s).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shoal import seeds
from shoal.clock import SimClock
from shoal.coordinator import Coordinator
from shoal.events import ClientsFailed, SendTask, UpdatesArrived
from shoal.policy import BufferedPolicy, SyncPolicy
from shoal.runner import drive
from shoal.sampling import OnlineSampler, UniformSampler
from shoal.sim.cohort import CohortTrainer
from shoal.sim.devices import TracedDevices
from shoal.sim.pool import InProcessPool
from shoal.sim.traces import Availability, Capacity, DeviceTrace
from shoal.strategy import FedAvg
from shoal.training import LocalTrainConfig

EXAMPLES = 50


def _pool(n: int, chunk: int = 0) -> InProcessPool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n * EXAMPLES, 12, generator=g)
    y = (x[:, :3].argmax(1)).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    parts = np.split(np.arange(n * EXAMPLES, dtype=np.int64), n)
    return InProcessPool(CohortTrainer(model, x, y), parts, LocalTrainConfig(lr=0.1), seed=0,
                         chunk=chunk)


def _trace(compute_s: np.ndarray, kbps: float | np.ndarray = math.inf,
           availability: Availability | None = None) -> DeviceTrace:
    """Per client: seconds to train its 50 examples (so ms per example = s x 20)."""
    compute_ms = np.asarray(compute_s, np.float64) * 1000.0 / EXAMPLES
    bw = np.broadcast_to(np.asarray(kbps, np.float64), compute_ms.shape)
    return DeviceTrace(Capacity(compute_ms, bw), availability or Availability.always())


def _run(pool, trace, policy, steps, sampler=None, seed=0):
    clock = SimClock()
    n = pool.num_clients
    sampler = sampler or UniformSampler(10)
    if isinstance(sampler, OnlineSampler):
        sampler = OnlineSampler(sampler.availability, sampler.per_round, clock.now)
    coord = Coordinator(FedAvg(), n, sampler, seed=seed, policy=policy, steps=steps)
    log: list[tuple] = []
    handle = coord.handle

    def spy(event):
        out = handle(event)
        if isinstance(event, UpdatesArrived):  # a run of arrivals may come as one batch
            log.extend(("arrived", event.task_id, int(c), event.now)
                       for c in event.arrival.client_ids)
        if isinstance(event, ClientsFailed):
            log.append(("failed", event.task_id, event.client_ids[0], event.now, event.reason))
        for c in out:
            if isinstance(c, SendTask):
                log.append(("sent", c.task.task_id, tuple(c.client_ids.tolist()), event.now))
        return out

    coord.handle = spy  # type: ignore[method-assign]
    start = coord.start

    def spy_start(*a, **k):
        out = start(*a, **k)
        log.extend(("sent", c.task.task_id, tuple(c.client_ids.tolist()), 0.0)
                   for c in out if isinstance(c, SendTask))
        return out

    coord.start = spy_start  # type: ignore[method-assign]
    commits = []
    state = FedAvg().init(pool.trainer.flat_module.get())
    drive(coord, pool, state, clock, task_seconds=TracedDevices(trace),
          on_commit=lambda st, rec: commits.append((clock.now(), st, rec)))
    return commits, log


def test_sync_rounds_take_their_slowest_client_exactly():
    """Half the devices take 1 s, half 3 s, always online: a sync round that awaits its whole
    cohort lasts 3 s if it drew a slow device, else 1 s; the oracle draws the cohorts itself
    (wave-1 uniform cohorts from the stream (seed, "sample", round))."""
    n = 40
    slow = np.arange(n) % 2 == 1
    commits, _ = _run(_pool(n), _trace(np.where(slow, 3.0, 1.0)), SyncPolicy(), steps=10,
                      sampler=UniformSampler(2))
    t, expected, lengths = 0.0, [], set()
    for r in range(1, 11):
        cohort = np.sort(seeds.generator(0, "sample", r).choice(n, 2, replace=False))
        lengths.add(3.0 if slow[cohort].any() else 1.0)
        t += 3.0 if slow[cohort].any() else 1.0
        expected.append(t)
    assert lengths == {1.0, 3.0}  # both kinds of round occur
    assert [c[0] for c in commits] == expected


def test_sync_transfer_time_is_model_bytes_over_bandwidth():
    """Download and upload each take bytes x 8 / 1000 / kbps seconds on top of compute."""
    n = 20
    pool = _pool(n)
    kbps = 100.0
    commits, _ = _run(pool, _trace(np.ones(n), kbps), SyncPolicy(), steps=2)
    wire = pool.uplink._raw_size  # float32 update in the wire format, both ways
    per_round = 1.0 + 2 * wire * 8 / 1000 / kbps
    assert commits[0][0] == pytest.approx(per_round, rel=1e-12)
    assert commits[1][0] == pytest.approx(2 * per_round, rel=1e-12)


def test_buffered_timeline_matches_the_hand_computed_one():
    """Four devices, two taking 1 s and two 3 s, all always busy (concurrency = population,
    so each refill is the device that just finished), a step every 2 updates: fast devices
    report at every second, slow ones every third, the slow ones first at a tie (asked
    earlier). Commits: t = 1, 2, 3, 3, 4, 5, 6, 6; the slow pair's first updates are
    2 versions stale."""
    commits, _ = _run(_pool(4), _trace(np.array([1.0, 1.0, 3.0, 3.0])),
                      BufferedPolicy(concurrency=4, buffer_size=2, max_staleness=10),
                      steps=8)
    assert [c[0] for c in commits] == [1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 6.0, 6.0]
    recs = [c[2] for c in commits]
    # v3 = the slow pair (base 0, current 2); v4 = the fast pair asked at t=2 from v1 and v2
    assert (recs[2].staleness_max, recs[2].staleness_mean) == (2, 2.0)
    assert (recs[3].staleness_max, recs[3].staleness_mean) == (2, 1.5)
    assert all(r.accepted == 2 for r in recs)


def _windows_oracle(av: Availability, c: int, t0: float, t1: float) -> bool:
    """Brute force: does one online window of client ``c`` cover [t0, t1]?"""
    r = c % av.rows
    p = float(av.period[r])
    spans = list(zip(av.start[av.offsets[r]:av.offsets[r + 1]].tolist(),
                     av.end[av.offsets[r]:av.offsets[r + 1]].tolist()))
    if not spans:
        return True
    k = math.floor(t0 / p)
    for base in ((k - 1) * p, k * p):
        for s, e in spans:
            if base + s <= t0 and t1 <= base + e:
                return True
    return False


def _random_windows(n: int, rng: np.random.Generator, period: float = 100.0) -> Availability:
    rows = []
    for _ in range(n):
        cuts = np.sort(rng.uniform(0, period, 2 * int(rng.integers(1, 4))))
        rows.append(list(zip(cuts[::2].tolist(), cuts[1::2].tolist())))
    return Availability.from_windows(period, rows)


@pytest.mark.parametrize("policy", ["sync", "buffered"])
def test_no_device_trains_outside_its_window_and_dropouts_happen_when_it_leaves(policy):
    """Random windows (period 100 s), tasks of 2-8 s plus transfers: every accepted update's
    download-to-upload interval (computed here from the trace: compute + 2 x bytes / rate)
    lies inside one window of its device and reached the coordinator no earlier than its
    end; every dropout happens exactly when the device's window ends, while its task was
    still running."""
    n = 60
    rng = np.random.default_rng(1)
    av = _random_windows(n, rng)
    compute, kbps = rng.uniform(2.0, 8.0, n), rng.uniform(200.0, 2000.0, n)
    trace = _trace(compute, kbps, av)
    pool = _pool(n)
    wire = pool.uplink._raw_size
    pol = SyncPolicy(idle_wait_s=5.0) if policy == "sync" else \
        BufferedPolicy(concurrency=8, buffer_size=4, idle_wait_s=5.0)
    commits, log = _run(pool, trace, pol, steps=25, sampler=OnlineSampler(av, 8, lambda: 0.0))
    sent = {}
    for e in log:
        if e[0] == "sent":
            for c in e[2]:
                sent[(e[1], c)] = e[3]
    arrived = [e for e in log if e[0] == "arrived"]
    failed = [e for e in log if e[0] == "failed"]
    assert len(arrived) >= 25 * 4 and failed, "the scenario must produce both"
    for _, task, c, now in arrived:
        done = sent[(task, c)] + compute[c] + 2 * wire * 8 / 1000 / kbps[c]
        assert done <= now + 1e-9 and _windows_oracle(av, c, sent[(task, c)], done)
    for _, task, c, now, reason in failed:
        start = sent[(task, c)]
        assert reason == "offline" and now >= start
        assert _windows_oracle(av, c, start, now)  # online until then ...
        assert not _windows_oracle(av, c, start, now + 1e-6)  # ... and not a moment longer
    assert all(r.rejected.get("offline", 0) >= 0 for _, _, r in commits)


def test_over_selection_keeps_the_first_k_and_never_trains_the_rest():
    """FedScale's rule in simulated time: ask ceil(1.3 x 10) = 13, commit when the 10th
    update is in, at the 10th-smallest completion time; the last three are cancelled and,
    trained lazily two at a time, at most one of them is ever trained."""
    n = 50
    rng = np.random.default_rng(4)
    times = rng.permutation(np.arange(1, n + 1, dtype=np.float64))  # all distinct
    pool = _pool(n, chunk=2)
    trained: list[int] = []
    real = pool.train_group

    def counting(tasks, ids, down):
        trained.extend(np.asarray(ids).tolist())
        return real(tasks, ids, down)

    pool.train_group = counting  # type: ignore[method-assign]
    commits, log = _run(pool, _trace(times), SyncPolicy(target=10, over_selection=1.3),
                        steps=1)
    asked = np.array(next(e[2] for e in log if e[0] == "sent"))
    assert asked.size == 13
    assert commits[0][0] == np.sort(times[asked])[9]
    assert commits[0][2].accepted == 10 and commits[0][2].closed_by == "target_reached"
    assert len(trained) <= 11 and set(trained) <= set(asked.tolist())


def test_a_deadline_closes_the_round_in_simulated_time():
    n = 30
    times = np.where(np.arange(n) < 20, 2.0, 50.0)
    commits, _ = _run(_pool(n), _trace(times),
                      SyncPolicy(target=10, deadline_s=10.0, min_fraction=0.1), steps=3,
                      sampler=UniformSampler(10))
    assert any(rec.closed_by == "deadline" for _, _, rec in commits)
    for (t, _, rec), prev in zip(commits, [0.0] + [c[0] for c in commits]):
        fast = rec.accepted
        if rec.closed_by == "deadline":
            assert t == prev + 10.0 and rec.rejected.get("timed_out", 0) == 10 - fast
        else:
            assert t == prev + 2.0 and fast == 10


def test_buffered_refills_of_one_version_train_together():
    """Twenty tasks of one client each, all from version 0: trained as one cohort."""
    pool = _pool(40, chunk=64)
    calls: list[int] = []
    real = pool.train_group

    def counting(tasks, ids, down):
        calls.append(len(ids))
        return real(tasks, ids, down)

    pool.train_group = counting  # type: ignore[method-assign]
    _run(pool, _trace(np.linspace(1.0, 2.0, 40)),
         BufferedPolicy(concurrency=20, buffer_size=10), steps=3)
    assert calls[0] == 20 and sum(calls) < 20 + 3 * 10 + 10


def test_same_seed_same_timeline_and_same_model():
    n = 60
    rng = np.random.default_rng(2)
    av = _random_windows(n, rng)
    trace = _trace(rng.uniform(2.0, 8.0, n), rng.uniform(200.0, 2000.0, n), av)

    def once():
        commits, log = _run(_pool(n), trace,
                            BufferedPolicy(concurrency=8, buffer_size=4, idle_wait_s=5.0),
                            steps=10, sampler=OnlineSampler(av, 8, lambda: 0.0))
        return [c[0] for c in commits], log, commits[-1][1].params

    a, b = once(), once()
    assert a[0] == b[0] and a[1] == b[1]
    np.testing.assert_array_equal(a[2], b[2])


def test_runs_of_arrivals_delivered_together_change_nothing_but_the_cost():
    """Arrivals of one task that the coordinator can take before its policy acts reach it as
    one batch: the same commits at the same simulated times, the same model up to float
    summation order, as delivering them one by one."""
    n = 60
    rng = np.random.default_rng(3)
    trace = _trace(rng.uniform(1.0, 9.0, n), rng.uniform(300.0, 3000.0, n))
    batched, _ = _run(_pool(n), trace, SyncPolicy(target=8, over_selection=1.5), steps=5)
    original = Coordinator.room
    Coordinator.room = lambda self, task_id: 1  # type: ignore[method-assign]
    try:
        single, _ = _run(_pool(n), trace, SyncPolicy(target=8, over_selection=1.5), steps=5)
    finally:
        Coordinator.room = original  # type: ignore[method-assign]
    assert [c[0] for c in batched] == [c[0] for c in single]
    assert [c[2].accepted for c in batched] == [8] * 5
    np.testing.assert_allclose(batched[-1][1].params, single[-1][1].params, atol=1e-6)


def test_buffered_clients_past_their_deadline_free_their_slots():
    """Six devices always busy (concurrency 6), four taking 1 s and two 100 s, a 10 s
    deadline: the fast ones commit two versions a second; at t = 10 the slow pair times out
    (counted in the open aggregation), their slots are refilled -- by themselves, the only
    idle devices -- and the run goes on."""
    commits, log = _run(_pool(6), _trace(np.array([1.0] * 4 + [100.0] * 2)),
                        BufferedPolicy(concurrency=6, buffer_size=2, deadline_s=10.0),
                        steps=20)
    assert [c[0] for c in commits] == [float(t) for t in range(1, 11) for _ in (0, 1)]
    assert sum(c[2].rejected.get("timed_out", 0) for c in commits) == 2
    sends = [(e[2][0], e[3]) for e in log if e[0] == "sent"]
    assert sorted(t for c, t in sends if c in (4, 5)) == [0.0, 0.0, 10.0, 10.0]


def test_nothing_of_a_closed_round_stays_behind():
    """After rounds that closed without their stragglers, the timeline holds no trained
    update and no training still due for them (memory does not grow with the rounds)."""
    from shoal.discrete_event import DeviceTimeline

    made: list[DeviceTimeline] = []
    real = DeviceTimeline.__init__

    def keep(self, *a, **k):
        real(self, *a, **k)
        made.append(self)

    DeviceTimeline.__init__ = keep  # type: ignore[method-assign]
    try:
        n = 50
        times = np.random.default_rng(5).permutation(np.arange(1, n + 1, dtype=np.float64))
        _run(_pool(n, chunk=4), _trace(times), SyncPolicy(target=10, over_selection=1.5),
             steps=6)
    finally:
        DeviceTimeline.__init__ = real  # type: ignore[method-assign]
    timeline = made[0]
    assert not timeline.due  # nothing still to train
    # only the last round's cancelled stragglers, holding nothing, await their events
    assert all(f.cancelled and not f.ready for f in timeline.flights.values())
    assert len(timeline.rows.free) == sum(len(b) for b in timeline.rows.blocks)
