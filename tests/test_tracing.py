"""OpenTelemetry traces of a run: one trace, every task under its round, every round under the
run, the counts the run directory records; exported to a file, to a collector over OTLP/HTTP
(a real HTTP server on loopback decoding the protobuf), and from a real deployment."""

from __future__ import annotations

import gzip
import http.server
import json
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk")

from shoal.cli import main  # noqa: E402
from shoal.config import load_config  # noqa: E402
from shoal.dashboard.control import ModelControl  # noqa: E402
from shoal.experiment import Experiment  # noqa: E402
from shoal.records import RoundRecord  # noqa: E402
from shoal.telemetry import RunDirWriter  # noqa: E402
from shoal.telemetry.tracing import TracingObserver, tracing_from_config  # noqa: E402

SYNTH = {"data.dataset": "synthetic", "data.clients": 30, "model.name": "logreg",
         "sampling.per_round": 8, "client.batch_size": 10, "rounds": 3}


def _spans(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tree(spans: list[dict]) -> tuple[dict, dict[str, list[dict]]]:
    by_id = {s["context"]["span_id"]: s for s in spans}
    children: dict[str, list[dict]] = defaultdict(list)
    for s in spans:
        if s["parent_id"] is not None:
            assert s["parent_id"] in by_id, f"{s['name']} has a parent that was not exported"
            children[s["parent_id"]].append(s)
    (root,) = [s for s in spans if s["parent_id"] is None]
    return root, children


def test_a_simulated_run_exports_tasks_under_rounds_under_the_run(tmp_path):
    cfg = load_config(None, {**SYNTH, "tracing.exporter": "file"})
    tracer = tracing_from_config(cfg, tmp_path, run={"name": "sim", "policy": "sync"})
    writer = RunDirWriter(cfg, tmp_path / "run")
    Experiment(cfg).run(observers=[writer, tracer])
    tracer.close()
    spans = _spans(tmp_path / "traces.jsonl")
    assert len({s["context"]["trace_id"] for s in spans}) == 1
    root, children = _tree(spans)
    assert root["name"] == "run" and root["attributes"]["name"] == "sim"
    rounds = children[root["context"]["span_id"]]
    assert [r["name"] for r in rounds] == ["round"] * cfg.rounds
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()][1:]
    for span, line in zip(sorted(rounds, key=lambda r: r["attributes"]["round"]), lines):
        assert span["attributes"]["round"] == line["round"]
        assert span["attributes"]["accepted"] == line["accepted"]
        assert span["attributes"]["bytes.up"] == line["bytes_up"]
        tasks = children[span["context"]["span_id"]]
        assert tasks and all(t["name"] == "task" for t in tasks)
        assert sum(t["attributes"]["clients"] for t in tasks) == line["sampled"]
        accepted = sum(e["attributes"]["clients"] for t in tasks for e in t["events"]
                       if e["name"] == "accepted")
        assert accepted == line["accepted"]
        for t in tasks:  # each task lies within its round
            assert span["start_time"] <= t["start_time"] <= t["end_time"] <= span["end_time"]
    evaluated = [e for e in root["events"] if e["name"] == "evaluated"]
    assert [e["attributes"]["model.version"] for e in evaluated] == [0, 1, 2, 3]


def test_abandoned_cohorts_and_refusals_are_marked(tmp_path):
    cfg = load_config(None, {**SYNTH, "tracing.exporter": "file"})
    tracer = tracing_from_config(cfg, tmp_path)
    tracer.task_sent(1, 0, 4, 0.0)
    tracer.update_rejected(1, "non_finite", 1, "NaN at 3", 1.0)
    tracer.update_accepted(1, 1, 0, 1.0)
    tracer.round_abandoned(RoundRecord(round=1, accepted=1, attempt=0,
                                       rejected={"timed_out": 3}), "deadline")
    tracer.task_sent(2, 0, 4, 2.0)
    tracer.update_accepted(2, 4, 0, 3.0)
    tracer.version_committed(RoundRecord(round=1, version=1, sampled=4, accepted=4,
                                         attempt=1, committed=True,
                                         privacy={"epsilon": 0.5,
                                                  "secagg_dropped_at_share_keys": 2.0}))
    tracer.close()
    root, children = _tree(_spans(tmp_path / "traces.jsonl"))
    (round_span,) = children[root["context"]["span_id"]]
    assert round_span["attributes"]["attempts"] == 2
    assert round_span["attributes"]["privacy.epsilon"] == 0.5
    events = {e["name"]: e["attributes"] for e in round_span["events"]}
    assert events["abandoned"]["reason"] == "deadline"
    assert events["secagg.dropouts"] == {"stage": "share_keys", "clients": 2}
    first, second = sorted(children[round_span["context"]["span_id"]],
                           key=lambda t: t["attributes"]["task.id"])
    assert first["status"]["status_code"] == "ERROR"
    assert first["status"]["description"] == "abandoned: deadline"
    assert [e["attributes"]["reason"] for e in first["events"] if e["name"] == "rejected"] \
        == ["non_finite"]
    assert second["status"]["status_code"] == "UNSET"


def test_a_rollback_from_the_dashboard_is_a_span(tmp_path):
    import numpy as np

    from shoal.params import ParamSpec
    from shoal.store import Checkpoint, ModelStore
    from shoal.strategy import ServerState

    def _ckpt(i: int) -> Checkpoint:
        return Checkpoint(ServerState(np.full(6, i, np.float32), version=i),
                          ParamSpec.from_shapes({"w": (2, 3)}), seed=0)

    cfg = load_config(None, {"tracing.exporter": "file"})
    tracer = tracing_from_config(cfg, tmp_path)
    with ModelStore(tmp_path / "store") as store:
        for i in (1, 2):
            store.commit(_ckpt(i), round=i, metrics={}, parent=i - 1 or None, now=float(i))
        control = ModelControl(store, span=tracer.span)
        control.act("promote", 2)
        with pytest.raises(Exception, match="current production"):
            control.act("rollback", 2)
    tracer.close()
    spans = {(s["name"], s["status"]["status_code"]) for s in _spans(tmp_path /
                                                                     "traces.jsonl")}
    assert ("store.promote", "UNSET") in spans and ("store.rollback", "ERROR") in spans


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        _Collector.received.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_spans_reach_a_collector_over_otlp_http(tmp_path):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Collector.received.clear()
    try:
        cfg = load_config(None, {**SYNTH, "rounds": 2, "tracing.exporter": "otlp",
                                 "tracing.service_name": "agg-7",
                                 "tracing.endpoint": f"http://127.0.0.1:"
                                                     f"{server.server_address[1]}/v1/traces"})
        tracer = tracing_from_config(cfg, tmp_path)
        Experiment(cfg).run(observers=[tracer])
        tracer.close()
    finally:
        server.shutdown()
    names, services = [], set()
    for body in _Collector.received:
        req = ExportTraceServiceRequest.FromString(body)
        for rs in req.resource_spans:
            services |= {a.value.string_value for a in rs.resource.attributes
                         if a.key == "service.name"}
            names += [s.name for ss in rs.scope_spans for s in ss.spans]
    assert services == {"agg-7"}
    assert sorted(names) == ["round", "round", "run", "task", "task"]


@pytest.mark.slow
def test_a_deployment_traces_its_rounds_with_the_carriers_traffic(tmp_path):
    pytest.importorskip("grpc")
    work = tmp_path / "work"
    assert main(["launch", "--set", 'data.dataset="synthetic"', "--set", 'model.name="logreg"',
                 "--clients", "3", "--per-round", "3", "--rounds", "2",
                 "--set", "deploy.over_selection=1.0", "--set", "deploy.min_fraction=1.0",
                 "--set", "deploy.checkin_interval_s=0.3", "--set", 'tracing.exporter="file"',
                 "--no-dashboard", "--dir", str(work), "--out", str(tmp_path / "runs"),
                 "-q", "--json"]) == 0
    root, children = _tree(_spans(work / "traces.jsonl"))
    rounds = sorted(children[root["context"]["span_id"]], key=lambda r: r["attributes"]["round"])
    assert [r["attributes"]["round"] for r in rounds] == [1, 2]
    for r in rounds:
        a = r["attributes"]
        assert a["accepted"] == 3 and a["carrier.checkins.task"] >= 3
        assert a["carrier.bytes.up"] > 0 and a["carrier.bytes.down"] > 0
        (task,) = children[r["context"]["span_id"]]
        assert task["attributes"]["clients"] == 3
        assert sum(e["attributes"]["clients"] for e in task["events"]
                   if e["name"] == "accepted") == 3
        # every device's path under its task: one span per device, its steps in order
        devices = [d for d in children[task["context"]["span_id"]] if d["name"] == "device"]
        assert sorted(d["attributes"]["device.id"] for d in devices) == \
            sorted({d["attributes"]["device.id"] for d in devices}) and len(devices) == 3
        for d in devices:
            assert d["attributes"]["outcome"] == "committed"
            assert [e["attributes"]["model.version"] for e in d["events"]
                    if e["name"] == "commit"] == [r["attributes"]["model.version"]]
            steps = sorted(children[d["context"]["span_id"]], key=lambda s: s["start_time"])
            assert [s["name"] for s in steps] == ["checkin", "download", "train", "upload",
                                                  "validate", "fold"]
            assert all(s["status"]["status_code"] == "UNSET" for s in steps)


def test_structured_logs_name_the_round_and_version_of_every_event():
    import io
    import logging

    from shoal.telemetry import JsonFormatter, LogObserver

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("shoal.test_tracing.logs")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    cfg = load_config(None, SYNTH)
    Experiment(cfg).run(observers=[LogObserver(logger)])
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    sent = [e for e in events if e["event"] == "task_sent"]
    committed = [e for e in events if e["event"] == "version_committed"]
    # each round's task carries the round it trains for, and the version it starts from
    assert [(e["round"], e["version"]) for e in sent] == [(1, 0), (2, 1), (3, 2)]
    assert [(e["round"], e["version"]) for e in committed] == [(1, 1), (2, 2), (3, 3)]
    assert all("round" in e for e in events if e["event"] == "update_accepted")


def _in_memory_tracer():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    return exporter, TracingObserver(exporter, run={"name": "deployed"}, batch=False)


def _by_name(spans, name):
    return [s for s in spans if s.name == name]


def step(tracer, device, task, name, seconds, outcome=""):
    """A step that took ``seconds`` of real time, reported as the carrier does: at its end."""
    time.sleep(seconds)
    tracer.device_step(device, task, name, seconds, outcome)


def test_each_devices_path_is_a_span_under_its_task_and_round():
    exporter, tracer = _in_memory_tracer()
    tracer.task_sent(1, 0, 3, 0.0)
    for device in ("a", "b", "c"):
        step(tracer, device, 1, "checkin", 0.001)
        step(tracer, device, 1, "download", 0.002)
    for device in ("a", "b"):
        step(tracer, device, 1, "upload", 0.001)
        step(tracer, device, 1, "validate", 0.0005)
        step(tracer, device, 1, "fold", 0.0001)
        tracer.device_done(device, 1, "accepted")
        tracer.update_accepted(1, 1, 0, 1.0)
    step(tracer, "c", 1, "upload", 0.001)
    step(tracer, "c", 1, "validate", 0.0005, outcome="non_finite")
    tracer.update_rejected(1, "non_finite", 1, "NaN in update", 1.0)
    tracer.device_done("c", 1, "timed_out")
    tracer.clients_failed(1, 1, "timed_out", 2.0)
    tracer.version_committed(RoundRecord(round=1, version=1, sampled=3, accepted=2))
    tracer.close()
    spans = exporter.get_finished_spans()
    (rnd,) = _by_name(spans, "round")
    (task,) = _by_name(spans, "task")
    assert task.parent.span_id == rnd.context.span_id
    devices = {s.attributes["device.id"]: s for s in _by_name(spans, "device")}
    assert sorted(devices) == ["a", "b", "c"]
    for device, span in devices.items():
        assert span.parent.span_id == task.context.span_id
        assert span.context.trace_id == rnd.context.trace_id
        steps = sorted((s for s in spans if s.parent is not None
                        and s.parent.span_id == span.context.span_id),
                       key=lambda s: s.start_time)
        names = [s.name for s in steps]
        assert names[:4] == ["checkin", "download", "train", "upload"]
        for before, after in zip(steps, steps[1:]):  # a path, one step after the other
            assert before.end_time <= after.start_time + 1_000_000
        assert span.start_time <= steps[0].start_time
        assert steps[-1].end_time <= span.end_time
    for device in ("a", "b"):
        assert [s.name for s in spans if s.parent is not None
                and s.parent.span_id == devices[device].context.span_id][-2:] == [
                    "validate", "fold"]
        assert devices[device].attributes["outcome"] == "committed"
        assert [e.attributes["model.version"] for e in devices[device].events
                if e.name == "commit"] == [1]
        assert devices[device].end_time >= rnd.end_time - 1_000_000
    c = devices["c"]
    assert c.attributes["outcome"] == "timed_out" and not c.status.is_ok
    (bad,) = [s for s in spans if s.name == "validate"
              and s.parent.span_id == c.context.span_id]
    assert bad.attributes["outcome"] == "non_finite" and not bad.status.is_ok


def test_an_abandoned_round_ends_its_accepted_devices_in_error():
    exporter, tracer = _in_memory_tracer()
    tracer.task_sent(1, 0, 1, 0.0)
    step(tracer, "a", 1, "checkin", 0.0)
    tracer.device_done("a", 1, "accepted")
    tracer.round_abandoned(RoundRecord(round=1, version=0, sampled=1, accepted=1),
                           "below_min_clients")
    tracer.close()
    (device,) = _by_name(exporter.get_finished_spans(), "device")
    assert device.status.description == "abandoned: below_min_clients"
