"""Absent devices: a device selected for a round that has missed its last appointment with
the gateway (the come-back time it was given, its task's deadline, or the check-in that
follows an upload) by more than ``absent_after_s`` is counted failed at once, so the round
closes with the devices that are there instead of holding out to its deadline. Driven
through the real gateway, coordinator and sync policy (test_gateway.py's scripted devices),
and the appointments book on its own."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from shoal.device_absence import Appointments
from shoal.device_task import ComeBack, Task
from test_gateway import DEVICES, GATEWAY, Devices, ScriptedSampler, fedavg, sync

ABSENT = dataclasses.replace(GATEWAY, absent_after_s=10.0)  # check-ins every 100 s


def _two_rounds(settings):
    """Round 1: dev-0..2 all report; round 2 asks the same three."""
    run = Devices(sync(target=3, asked=3, deadline_s=600.0, min_fraction=0.6),
                  ScriptedSampler([[0, 1, 2], [0, 1, 2]]), steps=2, settings=settings)
    tasks = run.tasks(DEVICES[:3], at=1.0)
    for i, d in enumerate(DEVICES[:3]):
        run.upload(d, tasks[d], 1.0, 1, at=2.0 + i)
    assert len(run.commits) == 1
    return run


def test_a_device_gone_after_its_upload_is_dropped_from_the_next_round_at_once():
    run = _two_rounds(ABSENT)
    # dev-2 uploaded at t = 4 and is gone: it should have checked in by 4 + 1.5 x 100
    nxt = run.tasks(DEVICES[:2], at=5.0)
    run.upload("dev-0", nxt["dev-0"], 3.0, 1, at=6.0)
    run.upload("dev-1", nxt["dev-1"], 5.0, 1, at=7.0)
    run.tick(150.0)  # within its grace: the round still waits for it
    assert len(run.commits) == 1
    run.tick(4.0 + 150.0 + 10.0 + 0.1)  # past its appointment and the grace (swept every 2.5 s)
    run.tick(4.0 + 150.0 + 10.0 + 2.6)
    assert len(run.commits) == 2  # long before the deadline at 604
    state, record = run.commits[1]
    np.testing.assert_allclose(state.params, fedavg((1, 1)) + fedavg((3, 1), (5, 1)),
                               rtol=1e-6)
    assert (record.accepted, record.rejected) == (2, {"absent": 1})
    assert run.outcome_of("dev-2") == ["accepted", "rejected:absent"]
    # back after all: the round it missed is over for it
    late = run.check_in("dev-2", at=170.0)
    assert isinstance(late, ComeBack)


@pytest.mark.parametrize("late, dropped", [(9.0, False), (12.6, True)])
def test_a_waiting_device_is_dropped_only_past_its_come_back_time_and_the_grace(late, dropped):
    run = Devices(sync(target=3, asked=3, deadline_s=600.0, min_fraction=0.6),
                  ScriptedSampler([[0, 1, 3], [0, 1, 2]]), steps=2, settings=ABSENT)
    back = run.check_in("dev-2", at=1.0)  # not selected for round 1: an appointment
    assert isinstance(back, ComeBack) and back.reason == "not_selected"
    tasks = run.tasks(["dev-0", "dev-1", "dev-3"], at=1.0)
    for i, d in enumerate(tasks):
        run.upload(d, tasks[d], 1.0, 1, at=2.0 + i / 2)  # round 2 opens: dev-0, 1 and 2
    nxt = run.tasks(DEVICES[:2], at=4.0)
    run.upload("dev-0", nxt["dev-0"], 3.0, 1, at=5.0)
    run.upload("dev-1", nxt["dev-1"], 5.0, 1, at=6.0)
    run.tick(back.at + late - 2.5)
    run.tick(back.at + late)  # two sweeps at most 2.5 s apart
    assert len(run.commits) == (2 if dropped else 1)
    answer = run.check_in("dev-2", at=back.at + late + 0.1)
    if dropped:
        _, record = run.commits[1]
        assert (record.accepted, record.rejected) == (2, {"absent": 1})
        assert isinstance(answer, ComeBack)  # its round is over
    else:  # late, within the grace: it still takes part
        assert isinstance(answer, Task) and answer.round == 2
        run.upload("dev-2", answer, 7.0, 1, at=back.at + late + 0.2)
        _, record = run.commits[1]
        assert (record.accepted, record.rejected) == (3, {})


def test_with_absence_off_the_round_waits_for_its_deadline():
    run = _two_rounds(GATEWAY)  # absent_after_s = 0
    nxt = run.tasks(DEVICES[:2], at=5.0)
    run.upload("dev-0", nxt["dev-0"], 3.0, 1, at=6.0)
    run.upload("dev-1", nxt["dev-1"], 5.0, 1, at=7.0)
    run.tick(500.0)
    assert len(run.commits) == 1
    run.tick(605.0)  # the deadline (opened at 4, 600 s)
    _, record = run.commits[1]
    assert (record.accepted, record.closed_by, record.rejected) == \
        (2, "deadline", {"timed_out": 1})


def test_a_device_never_heard_from_is_not_judged():
    # round 1 opens at t = 0; dev-2 never calls, so it has no appointment to miss
    run = Devices(sync(target=3, asked=3, deadline_s=600.0, min_fraction=0.6),
                  ScriptedSampler([[0, 1, 2]]), steps=1, settings=ABSENT)
    tasks = run.tasks(DEVICES[:2], at=1.0)
    run.upload("dev-0", tasks["dev-0"], 1.0, 1, at=2.0)
    run.upload("dev-1", tasks["dev-1"], 1.0, 1, at=3.0)
    run.tick(400.0)
    assert run.commits == []  # waits for its deadline
    run.tick(600.0)
    assert run.commits[0][1].closed_by == "deadline"


def test_a_device_holding_a_task_is_bound_by_its_deadline_not_by_absence():
    run = Devices(sync(target=2, asked=2, deadline_s=600.0, min_fraction=0.5),
                  ScriptedSampler([[0, 1]]), steps=1, settings=ABSENT)
    tasks = run.tasks(DEVICES[:2], at=1.0)  # appointment: the deadline, 601
    run.upload("dev-0", tasks["dev-0"], 1.0, 1, at=2.0)
    run.tick(300.0)
    assert run.commits == []
    run.tick(601.0)
    assert run.commits[0][1].rejected == {"timed_out": 1}


def test_appointments_on_their_own():
    book = Appointments(10.0)
    assert book.enabled and book.sweep_every == 2.5
    book.expect("a", 100.0)
    book.expect("b", 50.0)
    book.expect("c", math.inf)  # a task without a deadline: never absent
    assert book.absent(109.0, ["a", "b", "c", "never-answered"]) == ["b"]
    assert book.absent(110.5, ["c", "a", "b"]) == ["a", "b"]  # in the order asked
    book.expect("b", 200.0)  # it called again: a new appointment
    assert book.absent(110.5, ["a", "b"]) == ["a"]
    assert book.due_sweep(0.0) and not book.due_sweep(2.4) and book.due_sweep(2.5)
    off = Appointments(0.0)
    off.expect("a", 0.0)
    assert not off.enabled and not off.due_sweep(1e9) and off.absent(1e9, ["a"]) == []
    for bad in (-1.0, math.nan, "10"):
        with pytest.raises(ValueError):
            Appointments(bad)  # type: ignore[arg-type]


def test_deploy_absent_after_s_reaches_the_gateway():
    from shoal.config import load_config
    from shoal.deploy import settings_from_config

    assert settings_from_config(load_config(None)).absent_after_s == 30.0
    cfg = load_config(None, {"deploy.absent_after_s": 0.0})
    assert settings_from_config(cfg).absent_after_s == 0.0
    from shoal.errors import ConfigError
    with pytest.raises(ConfigError, match="deploy.absent_after_s"):
        load_config(None, {"deploy.absent_after_s": -1.0})


def test_a_device_process_that_leaves_does_not_hold_the_later_rounds(tmp_path):
    """Real processes over TLS: `shoal serve` and three `shoal client`s, one of which
    leaves after its first task (`--max-tasks 1`). Rounds 2 and 3 still ask it (every
    round samples all three), and commit with the two that are there about
    `deploy.absent_after_s` after it missed its appointment -- not at the 120 s deadline."""
    import json
    import time

    from shoal.cli.launch import stop_processes
    from shoal.registry import SQLiteRegistry
    from shoal.store import ModelStore

    pytest.importorskip("grpc")
    from test_deploy import THREE, _serve_with_clients

    work = tmp_path / "work"
    work.mkdir()
    started = time.monotonic()
    server, clients, _, _ = _serve_with_clients(
        tmp_path, work, "rounds = 3\n" + THREE + "[deploy]\nover_selection = 1.0\n"
        "min_fraction = 0.6\ncheckin_interval_s = 0.3\ndeadline_s = 120.0\n"
        "absent_after_s = 2.0", client_args=lambda i: ["--max-tasks", "1"] if i == 2 else [])
    try:
        assert server.wait(timeout=90) == 0, (tmp_path / "serve1.log").read_text()[-3000:]
    finally:
        stop_processes(clients + [server])
    assert time.monotonic() - started < 90  # the deadlines alone would take 240 s
    assert clients[2].returncode == 0  # it left on its own after one task
    with ModelStore(work / "models", readonly=True) as store:
        assert [v.metrics["accepted"] for v in store.list()] == [3.0, 2.0, 2.0]
    with SQLiteRegistry(work / "registry.db") as registry:
        assert [o.outcome for o in registry.outcomes("device-0002")] == \
            ["accepted", "rejected:absent", "rejected:absent"]
        assert [o.outcome for o in registry.outcomes("device-0000")] == ["accepted"] * 3
    summary = json.loads((tmp_path / "serve1.log").read_text().strip().splitlines()[-1])
    assert summary["rounds"] == 3


def _raw_round(tmp_path, runtime: str, deadline_s: float = 20.0):
    """Four raw devices (``runtime``) against the real aggregator: all take the round's
    task; dev-a, b, c upload, dev-d beats once and falls silent holding its task. Returns
    the tasks, the round's record, and the seconds from the last beat to the commit."""
    import time

    from aggregator_harness import (DEVICES, get_task, md, running_aggregator, start_round,
                                    upload)
    from shoal.transport.proto import shoal_pb2 as pb
    from shoal.transport.server import AggregatorSettings

    settings = AggregatorSettings(absent_after_s=1.0, heartbeat_s=0.5, checkin_interval_s=0.3)
    with running_aggregator(tmp_path, settings, runtime=runtime) as (service, stub):
        thread, out = start_round(service, n_sampled=4, target=4, deadline_s=deadline_s,
                                  min_fraction=0.5)
        tasks = {d: get_task(stub, d) for d in DEVICES}
        for d in DEVICES[:3]:
            upload(stub, d, tasks[d], np.full(50, 0.1, np.float32))
        reply = stub.Heartbeat(pb.HeartbeatRequest(device_id="dev-d",
                                                   round=tasks["dev-d"].round),
                               metadata=md("dev-d"), timeout=5)
        assert reply.keep_going
        beat = time.monotonic()
        thread.join(timeout=30)
        waited = time.monotonic() - beat
        assert "error" not in out, out.get("error")
    return tasks, out["record"], waited


def test_a_device_that_stops_heartbeating_while_holding_its_task_is_dropped(tmp_path):
    """Real gRPC: the aggregator asks shoal-client/5 runtimes for heartbeats
    (Task.heartbeat_s = deploy.heartbeat_s); a device that falls silent holding its task is
    absent heartbeat_s + absent_after_s after its last beat (swept every 0.25 s), and the
    round commits with the three that reported -- not at its 20 s deadline."""
    tasks, record, waited = _raw_round(tmp_path, "shoal-client/5")
    assert {t.heartbeat_s for t in tasks.values()} == {0.5}
    assert (record.accepted, record.rejected, record.committed) == (3, {"absent": 1}, True)
    assert 1.4 < waited < 8.0


def test_an_older_runtime_is_not_asked_for_heartbeats_and_keeps_its_deadline(tmp_path):
    tasks, record, waited = _raw_round(tmp_path, "shoal-client/4", deadline_s=6.0)
    assert {t.heartbeat_s for t in tasks.values()} == {0.0}
    assert record.closed_by == "deadline" and record.rejected == {"timed_out": 1}
    assert waited > 3.0  # its deadline, not heartbeat_s + absent_after_s (1.5 s)


def test_heartbeats_beat_until_the_block_ends_and_survive_failed_calls():
    import threading
    import time

    from shoal.transport.heartbeat import Heartbeats

    calls: list[float] = []
    lock = threading.Lock()

    def beat() -> bool:
        with lock:
            calls.append(time.monotonic())
            if len(calls) == 2:
                raise RuntimeError("the network is down")  # logged, not fatal
        return len(calls) < 4

    with Heartbeats(beat, 0.05) as beats:
        time.sleep(0.4)
    n = len(calls)
    time.sleep(0.15)
    assert len(calls) == n and 4 <= n <= 9  # stopped with the block; ~7 due in 0.4 s
    assert beats.sent == n - 1 and beats.keep_going is False  # the aggregator said stop
    gaps = np.diff(calls)
    assert gaps.min() > 0.03
    with Heartbeats(beat, 0.0):  # not asked: no thread, no call
        time.sleep(0.1)
    assert len(calls) == n
