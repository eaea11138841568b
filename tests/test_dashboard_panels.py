"""The dashboard's canary and edges panels, without a browser.

* canary: a real :class:`~shoal.lifecycle.canary.Canary` on a real model store writes its
  audit log; the panel -- fed live by the log's listener, or replayed from the file as it
  grows -- shows each evaluation round's arms, the rule's statistic and verdict, and the
  decision the canary made;
* edges: ``shoal run`` with edge aggregators (one failing) writes ``edges.jsonl``; the panel's
  per-edge figures add up to what the global server recorded in ``metrics.jsonl`` round by
  round, and the failed edge's devices are all moved to live edges;
* ``shoal run --dashboard`` refuses an address off loopback before running.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shoal.cli import main
from shoal.config import load_config, to_toml
from shoal.dashboard.replay import RunDirFollower
from shoal.dashboard.state import RunInfo, RunState
from shoal.evaluation import EvalTally
from shoal.events import EvalReports
from shoal.lifecycle.audit import AuditLog, read_audit
from shoal.lifecycle.canary import Canary, CanaryRule
from shoal.params import ParamSpec
from shoal.store import Checkpoint, ModelStore
from shoal.strategy import ServerState

SMALL = ["--set", 'data.dataset="synthetic"', "--set", 'model.name="logreg"']


def _result(version: int, ids, losses, accuracy, task_id: int):
    tally = EvalTally(task_id, version, "canary", np.asarray(ids))
    tally.fold(EvalReports(np.asarray(ids), np.ones(len(ids), np.int64),
                           {"loss": np.asarray(losses, float),
                            "accuracy": np.asarray(accuracy, float)}))
    return tally.close("complete")


def run_canary(work: Path, listener=None):
    """A canary of a worse candidate v2 against production v1: 5 clients per arm and round,
    the rule needing 10; returns (the canary, each round's verdict, each round's per-arm
    losses)."""
    store = ModelStore(work / "models")
    for i in (1, 2):
        ck = Checkpoint(ServerState(np.full(3, i, np.float32), version=i),
                        ParamSpec.from_shapes({"w": (3,)}), seed=0)
        store.commit(ck, round=i, metrics={}, now=float(i), parent=i - 1 or None,
                     status="production" if i == 1 else "candidate")
    audit = AuditLog(work / "audit.jsonl", listener=listener)
    canary = Canary(store, 2, 0.2, now=100.0, rule=CanaryRule(min_clients=10, max_rounds=4),
                    audit=audit)
    rng = np.random.default_rng(3)
    verdicts, losses = [], []
    for k in range(4):
        cand, prod = rng.normal(1.4, 0.1, 5), rng.normal(1.0, 0.1, 5)
        canary.record(_result(2, range(5 * k, 5 * k + 5), cand, np.full(5, 0.5), 2 * k + 1))
        canary.record(_result(1, range(100 + 5 * k, 105 + 5 * k), prod, np.full(5, 0.8),
                              2 * k + 2))
        losses.append((cand.mean(), prod.mean()))
        verdicts.append(canary.decide(101.0 + k))
        if canary.decided:
            break
    store.close()
    return canary, verdicts, losses


def test_the_canary_panel_shows_each_evaluation_and_the_decision_live(tmp_path):
    state = RunState(RunInfo(name="work", mode="deployment"))
    canary, verdicts, losses = run_canary(tmp_path / "work", listener=state.add_audit)
    snap = state.snapshot()
    c = snap["canary"]
    assert [v.decision for v in verdicts] == ["wait", "rollback"]  # 5 then 10 clients per arm
    assert (c["candidate"], c["production"], c["fraction"]) == (2, 1, 0.2)
    assert c["salt"] == "canary-v2" and c["rule"]["min_clients"] == 10
    assert c["decision"] == "rolled back" and c["reason"] == verdicts[-1].reason
    assert c["reason"].startswith("worse")
    assert [e["verdict"] for e in c["evaluations"]] == ["wait", "rollback"]
    for e, v, (cand, prod) in zip(c["evaluations"], verdicts, losses):
        assert e["candidate"]["clients"] == e["production"]["clients"] == 5
        assert e["candidate"]["metrics"]["loss"] == pytest.approx(cand)
        assert e["production"]["metrics"]["loss"] == pytest.approx(prod)
        assert e["candidate"]["metrics"]["accuracy"] == pytest.approx(0.5)
        assert (e["n_candidate"], e["n_production"]) == (v.n_candidate, v.n_production)
    assert c["evaluations"][0]["z"] is None  # no statistic below the minimum sample
    assert c["evaluations"][1]["z"] == pytest.approx(verdicts[1].z)
    assert c["evaluations"][1]["p_worse"] == pytest.approx(verdicts[1].p_worse)
    # the log table: every entry, in order, and only the new ones when asked
    actions = [e["action"] for e in snap["audit"]]
    assert actions == [e["action"] for e in canary.audit.entries]
    assert actions == ["canary_start", *["canary_evaluated"] * 2, "canary_wait",
                       *["canary_evaluated"] * 2, "canary_rollback"]
    later = state.snapshot(audit_since=5)
    assert [e["action"] for e in later["audit"]] == actions[5:]
    assert later["audit_first"] == 5 and later["audit_next"] == len(actions)
    with ModelStore(tmp_path / "work" / "models", readonly=True) as store:
        assert store.get(2).status == "rolled_back"  # what the panel says happened


def test_a_move_the_store_refused_leaves_the_canary_pending_on_the_page(tmp_path):
    from shoal.store.model_versions import PointerMoved

    state = RunState(RunInfo(name="work", mode="deployment"))
    store = ModelStore(tmp_path / "models")
    for i in (1, 2, 3):
        ck = Checkpoint(ServerState(np.full(3, i, np.float32), version=i),
                        ParamSpec.from_shapes({"w": (3,)}), seed=0)
        store.commit(ck, round=i, metrics={}, now=float(i), parent=1 if i > 1 else None,
                     status="production" if i == 1 else "candidate")
    canary = Canary(store, 2, 0.2, now=10.0, rule=CanaryRule(min_clients=10),
                    audit=AuditLog(listener=state.add_audit))
    rng = np.random.default_rng(0)
    canary.record(_result(1, range(100, 110), rng.normal(1.0, 0.1, 10), np.ones(10), 1))
    canary.record(_result(2, range(10), rng.normal(0.5, 0.1, 10), np.ones(10), 2))
    store.promote(3, now=11.0, reason="by hand")  # an operator moved production meanwhile
    with pytest.raises(PointerMoved):
        canary.decide(12.0)
    store.close()
    c = state.canary()
    assert c["decision"] == "pending" and c["decided"] is None  # the store did not move
    assert c["evaluations"][-1]["verdict"] == "promote_refused"
    assert c["reason"].startswith("not worse") and "the store refused: PointerMoved" in \
        c["reason"]


def test_the_canary_panel_replays_and_follows_the_audit_file(tmp_path):
    live = RunState(RunInfo(name="work", mode="deployment"))
    work = tmp_path / "work"
    run_canary(work, listener=live.add_audit)
    # a `shoal launch --dir work` state directory: config.toml, the store, audit.jsonl
    (work / "config.toml").write_text(to_toml(load_config(None, {})))
    follower = RunDirFollower(work)
    assert follower.state.snapshot()["canary"] == live.snapshot()["canary"]
    assert (follower.state.status, follower.state.detail) == ("finished",
                                                              "canary of v2: rolled back")
    # an entry appended later (a second canary starting) and a torn line are followed
    with open(work / "audit.jsonl", "a") as f:
        f.write('{"at": 200.0, "action": "canary_start", "candidate": 3, "production": 1, '
                '"fraction": 0.1, "salt": "canary-v3", "rule": {}}\n{"at": 20')
    follower.poll()
    snap = follower.state.snapshot()
    assert snap["canary"]["candidate"] == 3 and snap["canary"]["decision"] == "pending"
    assert snap["status"] == "running"  # a canary whose end is not in the log yet
    assert snap["canary"]["evaluations"] == []
    assert len(snap["audit"]) == len(read_audit(work / "audit.jsonl"))
    # another file named apart
    elsewhere = RunDirFollower(work, audit=tmp_path / "none.jsonl")
    assert elsewhere.state.snapshot()["canary"] is None


def test_the_edges_panel_adds_up_to_what_the_global_server_recorded(tmp_path):
    out = tmp_path / "runs"
    assert main(["run", *SMALL, "--clients", "30", "--per-round", "12", "--rounds", "3",
                 "--set", "hierarchy.edges=3", "--set", 'hierarchy.failures="edge-1@2"',
                 "--out", str(out), "-q", "--json"]) == 0
    (run,) = out.iterdir()
    reports = [json.loads(x) for x in (run / "edges.jsonl").read_text().splitlines()]
    rows = {r["round"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text()
                                       .splitlines())}
    for rnd in (1, 2, 3):
        mine = [r for r in reports if r["round"] == rnd]
        up = [r for r in mine if r["outcome"] == "uploaded"]
        assert sum(r["asked"] for r in mine) == rows[rnd]["sampled"]
        assert sum(r["accepted"] for r in up) == rows[rnd]["accepted"]
        assert sum(r["upload_bytes"] for r in up) == rows[rnd]["bytes_up"]
        assert sum(r["device_bytes"] for r in up) == rows[rnd]["privacy_edge_ingress_bytes"]
    (failed,) = [r for r in reports if r["outcome"] == "failed"]
    assert (failed["edge"], failed["round"], failed["accepted"]) == ("edge-1", 2, 0)
    assert set(failed["moved_to"]) <= {"edge-0", "edge-2"} and sum(failed["moved_to"].values())
    assert not [r for r in reports if r["edge"] == "edge-1" and r["round"] == 3]

    snap = RunDirFollower(run).state.snapshot()
    shown = {e["edge"]: e for e in snap["edges"]["edges"]}
    assert list(shown) == ["edge-0", "edge-1", "edge-2"]
    for name, e in shown.items():
        mine = [r for r in reports if r["edge"] == name]
        assert e["uploads"] == sum(r["outcome"] == "uploaded" for r in mine)
        assert e["upload_bytes"] == sum(r["upload_bytes"] for r in mine)
        assert e["device_bytes"] == sum(r["device_bytes"] for r in mine)
        assert e["assigned"] == mine[-1]["assigned"]
        assert e["moved_in"] == failed["moved_to"].get(name, 0)
    assert shown["edge-1"]["failed_round"] == 2 and shown["edge-1"]["assigned"] == 0
    assert shown["edge-1"]["moved_out"] == sum(failed["moved_to"].values())
    assert snap["edges"]["failures"] == [{"edge": "edge-1", "round": 2,
                                          "moved": sum(failed["moved_to"].values()),
                                          "moved_to": failed["moved_to"]}]
    # each round's row: the uploads that reached the global server, the edges that failed
    assert [(r["round"], r.get("edge_uploads"), r.get("edge_failed")) for r in snap["rows"]] \
        == [(0, None, None), (1, 3, 0), (2, 2, 1), (3, 2, 0)]


def test_a_run_without_edges_writes_no_edge_file_and_shows_no_panel(tmp_path):
    out = tmp_path / "runs"
    assert main(["run", *SMALL, "--clients", "10", "--per-round", "5", "--rounds", "1",
                 "--out", str(out), "-q", "--json"]) == 0
    (run,) = out.iterdir()
    assert not (run / "edges.jsonl").exists()
    snap = RunDirFollower(run).state.snapshot()
    assert snap["edges"] is None and snap["canary"] is None


def test_shoal_run_refuses_a_dashboard_off_loopback_before_writing_anything(tmp_path,
                                                                           capsys):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    out = tmp_path / "runs"
    assert main(["run", *SMALL, "--clients", "10", "--per-round", "5", "--rounds", "1",
                 "--out", str(out), "-q", "--dashboard", "0.0.0.0:0"]) != 0
    assert "dashboard.address" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_deployed_edges_report_their_devices_and_a_killed_edge_live(tmp_path):
    """``shoal launch --edges 2`` with edge-1's process killed in round 2: while it runs, the
    global's dashboard shows each edge's devices and uploads from the edges' own reports, and
    edge-1 failed in round 2 with its devices moved where the ring moves them -- where the
    surviving edges then find them (their round-3 reports)."""
    pytest.importorskip("grpc")
    pytest.importorskip("starlette")
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from shoal.hierarchy.ring import Ring

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work, clients = tmp_path / "work", 4
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "launch", "--edges", "2", "--clients",
         str(clients), "--rounds", "4", "--per-round", str(clients),
         "--set", "deploy.over_selection=1.0", "--set", "deploy.min_fraction=0.5",
         "--set", "deploy.deadline_s=6.0", "--set", "deploy.checkin_interval_s=0.5",
         "--set", 'hierarchy.failures="edge-1@2"', "--json", "-q", "--dir", str(work),
         "--out", str(tmp_path / "runs"), "--dashboard", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    seen = None
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                snap = json.loads(urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/state", timeout=2).read())
                if snap["edges"] and snap["edges"]["failures"]:
                    seen = snap
            except OSError:
                pass
            time.sleep(0.2)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert seen is not None, "the dashboard never showed the failed edge"
    # the devices' placement, worked out independently of the launch
    ring = Ring(["edge-0", "edge-1"])
    ring.assign_all([str(c) for c in range(clients)])
    first = {e: len(ring.devices_of(e)) for e in ring.edges}
    (failure,) = seen["edges"]["failures"]
    assert (failure["edge"], failure["round"]) == ("edge-1", 2)
    assert failure["moved"] == first["edge-1"] and failure["moved_to"]
    shown = {e["edge"]: e for e in seen["edges"]["edges"]}
    assert failure["moved_to"] == {"edge-0": first["edge-1"]}  # the only edge left
    assert shown["edge-0"]["moved_in"] == first["edge-1"]
    assert shown["edge-1"]["failed_round"] == 2
    # the edges' own reports: round 1 every device through its first edge, then the moved
    # devices at the edge the dashboard said they went to
    reports = {n: [json.loads(x) for x in (work / n / "edges.jsonl").read_text().splitlines()]
               for n in ("edge-0", "edge-1")}
    assert {n: r[0]["assigned"] for n, r in reports.items()} == first
    assert sum(r[0]["accepted"] for r in reports.values()) == clients
    assert {r["round"] for r in reports["edge-1"]} == {1}  # (a retried round 1 twice)
    assert shown["edge-1"]["uploads"] == len(reports["edge-1"])
    later = [r for r in reports["edge-0"] if r["round"] >= 3]  # (a device fails over after
    assert max(r["assigned"] for r in later) == clients  # its retries: by round 3 or 4)
    assert max(r["accepted"] for r in later) == clients
