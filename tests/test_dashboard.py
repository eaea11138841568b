"""The dashboard without a browser: what it shows equals what the run wrote, its HTTP API on a
real uvicorn server on loopback (safe by default: Host check, operator token, same-origin JSON
only, no secrets in read-only views), the run directory followed while it grows, and the
self-contained HTML report."""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from shoal.cli import main  # noqa: E402
from shoal.config import load_config  # noqa: E402
from shoal.dashboard.app import STATIC  # noqa: E402
from shoal.dashboard.control import load_or_create_token  # noqa: E402
from shoal.dashboard.replay import RunDirFollower  # noqa: E402
from shoal.dashboard.server import Dashboard  # noqa: E402
from shoal.dashboard.state import DashboardObserver, RunInfo, RunState  # noqa: E402
from shoal.dashboard.report import render_report  # noqa: E402
from shoal.errors import ConfigError, DataError  # noqa: E402
from shoal.experiment import Experiment  # noqa: E402
from shoal.params import ParamSpec  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.store import Checkpoint, ModelStore  # noqa: E402
from shoal.strategy import ServerState  # noqa: E402
from shoal.telemetry import RunDirWriter  # noqa: E402

SYNTH = {"data.dataset": "synthetic", "data.clients": 30, "model.name": "logreg",
         "sampling.per_round": 8, "client.batch_size": 10, "rounds": 4}


def _ckpt(i: int) -> Checkpoint:
    return Checkpoint(state=ServerState(params=np.arange(6, dtype=np.float32) * i, version=i),
                      spec=ParamSpec.from_shapes({"w": (2, 3)}), seed=0)


@pytest.fixture()
def store(tmp_path):
    s = ModelStore(tmp_path / "store")
    for i in (1, 2, 3):
        s.commit(_ckpt(i), round=i, metrics={"accuracy": i / 10}, parent=i - 1 or None,
                 now=1000.0 + i)
    s.promote(3, now=1010.0)
    yield s
    s.close()


@pytest.fixture()
def served(tmp_path, store):
    """A dashboard on a free loopback port with a store, a registry and an operator token."""
    reg = SQLiteRegistry(tmp_path / "registry.db")
    reg.enroll("phone-1", now=1000.0, attributes={"os": "android"})
    reg.enroll("phone-2", now=1000.0, attributes={"os": "ios"})
    reg.record_outcome("phone-1", 1, "accepted", now=1001.0)
    reg.close()
    token = load_or_create_token(tmp_path / "token")
    cfg = load_config(None, SYNTH)
    dash = Dashboard(RunState(RunInfo.of(cfg, "test", "deployment")), token,
                     registry_path=tmp_path / "registry.db", push_interval_s=0.05)
    dash.attach_store(store)
    url = dash.start("127.0.0.1", 0)
    yield dash, url, token
    dash.stop()


def _call(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None
          ) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _post(url: str, token: str | None, **extra: str) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **extra}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    status, _, body = _call(url, "POST", headers, b"{}")
    return status, json.loads(body)


def _production_on_disk(root: Path) -> int | None:
    # read the index as an operator would, not through the dashboard's store object
    return json.loads((root / "models" / "index.json").read_text())["production"]


# -- what it shows -------------------------------------------------------------------------


def test_a_live_run_shows_exactly_what_the_run_directory_records(tmp_path):
    cfg = load_config(None, {**SYNTH, "output.dir": str(tmp_path)})
    state = RunState(RunInfo.of(cfg, "live", "deployment"))
    writer = RunDirWriter(cfg, tmp_path / "run")
    result = Experiment(cfg).run(observers=[writer, DashboardObserver(state)])
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()]
    shown = [{k: v for k, v in row.items() if k in lines[i]}
             for i, row in enumerate(state.rows())]
    assert shown == lines and len(lines) == cfg.rounds + 1
    # the commit phase: from a version's commit to the next task, for every round but the last
    assert [r["round"] for r in state.rows() if "phase_commit_s" in r] == [1, 2, 3]
    assert all(r["phase_commit_s"] >= 0 for r in state.rows()[1:-1])
    snap = state.snapshot()
    assert snap["version"] == cfg.rounds == result.state.version
    assert snap["totals"]["asked"] == sum(r.sampled for r in result.records)
    assert snap["totals"]["accepted"] == sum(r.accepted for r in result.records)
    assert snap["totals"]["committed"] == cfg.rounds
    # a page that has the first two rows asks for the rest only
    assert [r["round"] for r in state.snapshot(since=2)["rows"]] == [2, 3, 4]
    assert state.snapshot(since=2)["next"] == 5


def test_the_state_keeps_a_bounded_history(tmp_path):
    state = RunState(RunInfo(name="x", mode="replay"), history=10)
    for i in range(25):
        state.add_row({"round": i, "version": i, "eval_accuracy": float("nan")})
    snap = state.snapshot()
    assert [r["round"] for r in snap["rows"]] == list(range(15, 25))
    assert snap["first"] == 15 and snap["next"] == 25 and state.dropped_rows == 15
    assert snap["rows"][0]["eval_accuracy"] is None  # JSON has no NaN
    assert state.snapshot(since=22)["rows"][0]["round"] == 22


def test_a_run_directory_is_followed_as_it_grows(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, SYNTH)
    writer = RunDirWriter(cfg, run)
    follower = RunDirFollower(run)
    assert follower.state.snapshot()["rows"] == [] and follower.state.status == "starting"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"round": 0, "version": 0, "eval_accuracy": 0.1}\n{"round": 1, "vers')
    assert follower.poll() == 1  # the half-written line waits for its end
    with open(run / "metrics.jsonl", "a") as f:
        f.write('ion": 1, "eval_accuracy": 0.5}\n')
    assert follower.poll() == 1
    assert [r["eval_accuracy"] for r in follower.state.rows()] == [0.1, 0.5]
    assert follower.state.status == "running"
    (run / "summary.json").write_text('{"num_params": 610, "stopped": ""}')
    follower.poll()
    assert follower.state.status == "finished"
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:3 is not a JSON object"):
        follower.poll()
    assert writer.path == run


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(DataError, match="not a run directory"):
        RunDirFollower(tmp_path)
    assert main(["dashboard", str(tmp_path), "--address", "127.0.0.1:0"]) == 1


# -- the API, safe by default ----------------------------------------------------------------


def test_pages_and_reads_carry_strict_security_headers(served):
    dash, url, _ = served
    status, headers, body = _call(url)
    assert status == 200 and b'id="page-overview"' in body
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    for path in ("api/state", "static/app.js", "static/vendor/uPlot.iife.min.js"):
        assert _call(url + path)[0] == 200, path


def test_another_host_name_is_refused(served):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host."""
    _, url, _ = served
    status, _, body = _call(url + "api/state", headers={"Host": "evil.example:80"})
    assert status == 421 and b"does not serve Host" in body


def test_rollback_needs_the_operator_token_and_a_same_origin_json_request(served, tmp_path):
    dash, url, token = served
    rollback = url + "api/versions/2/rollback"
    assert _post(rollback, None)[0] == 401
    assert _post(rollback, "x" * 43)[0] == 401
    origin = url.rstrip("/")
    status, body = _post(rollback, token, Origin="http://evil.example")
    assert status == 403 and "cross-site" in body["error"]
    assert _post(rollback, token, **{"Sec-Fetch-Site": "cross-site"})[0] == 403
    status, _, _ = _call(rollback, "POST", {"Authorization": f"Bearer {token}",
                                            "Content-Type": "text/plain"}, b"{}")
    assert status == 403  # a form or a no-preflight fetch cannot send JSON
    assert _production_on_disk(tmp_path / "store") == 3  # nothing moved
    status, body = _post(rollback, token, Origin=origin)
    assert status == 200 and body["production"] == 2
    assert _production_on_disk(tmp_path / "store") == 2
    statuses = {v["id"]: v["status"] for v in body["versions"]}
    assert statuses == {1: "candidate", 2: "production", 3: "rolled_back"}
    # what the store refuses changes nothing and says why
    status, body = _post(url + "api/versions/3/promote", token)
    assert status == 409 and "rolled back" in body["error"]
    status, body = _post(url + "api/versions/9/promote", token)
    assert status == 409 and "no model version 9" in body["error"]
    assert _post(url + "api/versions/1/delete", token)[0] == 400
    assert _production_on_disk(tmp_path / "store") == 2
    status, _, listing = _call(url + "api/versions")
    assert json.loads(listing)["history"][-1] == {"at": pytest.approx(
        json.loads(listing)["history"][-1]["at"]), "action": "rollback", "version": 2,
        "previous": 3}


def test_read_only_views_expose_no_token_or_secret(served, tmp_path):
    dash, url, token = served
    dash.observer.checked_in("task")
    dash.observer.update_rejected(1, "bad_token", 1, f"token {token} refused", 0.0)
    everything = b"".join(_call(url + p)[2] for p in
                          ("", "api/state", "api/devices", "api/versions"))
    assert token.encode() not in everything
    devices = json.loads(_call(url + "api/devices")[2])
    assert devices["total"] == 2
    assert devices["devices"][0]["attributes"] == {"os": "android"}
    assert devices["devices"][0]["outcomes"] == [{"round": 1, "outcome": "accepted"}]
    assert set(devices["devices"][0]) == {"id", "attributes", "windows", "enrolled_at",
                                          "last_seen", "participation", "online", "outcomes"}


def test_bad_queries_are_refused_with_the_parameter_named(served):
    _, url, _ = served
    status, _, body = _call(url + "api/devices?limit=100000")
    assert status == 400 and b"limit" in body
    assert _call(url + "api/state?since=-1")[0] == 400


def test_the_event_stream_pushes_new_rounds(served):
    dash, url, _ = served
    with urllib.request.urlopen(url + "api/events?since=0", timeout=10) as stream:
        first = _next_event(stream)
        assert first["rows"] == [] and first["status"] == "starting"
        dash.state.add_row({"round": 0, "version": 0, "eval_accuracy": 0.25})
        event = _next_event(stream)
        assert event["rows"] == [{"round": 0, "version": 0, "eval_accuracy": 0.25}]
        assert event["next"] == 1


def _next_event(stream) -> dict:
    data = None
    for raw in stream:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and data is not None:
            return data
    raise AssertionError("the stream ended")


def test_the_dashboard_listens_on_loopback_only_by_default():
    dash = Dashboard(RunState(RunInfo(name="x", mode="replay")), "t" * 40)
    with pytest.raises(ConfigError, match="loopback"):
        dash.start("0.0.0.0", 0)
    with pytest.raises(ConfigError, match="not loopback"):
        load_config(None, {"dashboard.address": "0.0.0.0:8080"})
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config(None, {"dashboard.address": "8080"})
    assert load_config(None, {"dashboard.address": "0.0.0.0:8080",
                              "dashboard.allow_remote": True}).dashboard.host_port == \
        ("0.0.0.0", 8080)


def test_the_operator_token_file_is_private_and_long(tmp_path):
    path = tmp_path / "token"
    token = load_or_create_token(path)
    assert len(token) >= 43 and os.stat(path).st_mode & 0o777 == 0o600
    assert load_or_create_token(path) == token  # kept across restarts
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_or_create_token(path)
    short = tmp_path / "short"
    short.write_text("abc\n")
    os.chmod(short, 0o600)
    with pytest.raises(ConfigError, match="shorter than 32"):
        load_or_create_token(short)


# -- the report --------------------------------------------------------------------------------


def test_the_report_is_one_self_contained_file(tmp_path):
    out = tmp_path / "runs"
    assert main(["run", "--set", 'data.dataset="synthetic"', "--clients", "20", "--per-round",
                 "5", "--set", 'model.name="logreg"', "--rounds", "3", "--out", str(out),
                 "-q", "--json"]) == 0
    (run,) = out.iterdir()
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    # nothing to fetch: no external or server-relative reference at all
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "/static/" not in page and "http://" not in page.replace(
        "http://www.w3.org", "")
    data = re.search(r'<script type="application/json" id="shoal-data">(.*?)</script>',
                     page, re.S).group(1)
    rows = json.loads(data)["rows"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == lines
    summary = json.loads((run / "summary.json").read_text())
    assert f"final test accuracy     {summary['final_accuracy']:.4f}" in page
    assert render_report(run) != page  # without a summary, no summary section
    assert 'id="summary"' not in render_report(run)


def test_the_vendored_chart_library_is_the_recorded_release():
    readme = (STATIC / "vendor" / "README.md").read_text()
    assert "| 1.6.32 | MIT" in readme
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        digest = hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest()
        assert digest in readme, name
    assert "MIT License" in (STATIC / "vendor" / "uPlot.LICENSE").read_text()
