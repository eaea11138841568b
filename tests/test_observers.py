"""The user-facing observers (progress bar, run directory, JSON logs, Prometheus) turn the
hooks they hear into what users read, and a run tells them everything."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shoal.cli import main
from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.experiment import Experiment
from shoal.observers import CarrierObserver, Observer, Observers
from shoal.params import ParamSpec
from shoal.records import RoundRecord
from shoal.store import Checkpoint, load_checkpoint
from shoal.strategy import ServerState
from shoal.telemetry import (JsonFormatter, LogObserver, ProgressBar, PrometheusObserver,
                             RunDirWriter)

SYNTH = {"data.dataset": "synthetic", "data.clients": 30, "model.name": "logreg",
         "sampling.per_round": 8, "client.batch_size": 10}

#: a short scripted run: the initial model, round 1 (one retry abandoned first), round 2
#: committed but not evaluated, round 3
INITIAL = RoundRecord(round=0, eval={"accuracy": 0.1, "loss": 2.3})
ABANDONED = RoundRecord(round=1, version=0, sampled=4, accepted=1,
                        rejected={"timed_out": 3}, closed_by="deadline")
ROUND1 = RoundRecord(round=1, version=1, sampled=4, accepted=3, examples=30,
                     rejected={"non_finite": 1}, train_loss=0.9, committed=True,
                     eval={"accuracy": 0.5, "loss": 1.25}, privacy={"epsilon": 1.234},
                     closed_by="all_reported")
ROUND2 = RoundRecord(round=2, version=2, sampled=4, accepted=4, examples=40,
                     rejected={"timed_out": 1, "stale": 2, "wrong_version": 1, "late": 1},
                     committed=True, closed_by="target_reached")
ROUND3 = RoundRecord(round=3, version=3, sampled=4, accepted=4, examples=40, committed=True,
                     eval={"accuracy": 0.8, "loss": 0.5}, closed_by="all_reported")


class Recorder(CarrierObserver):
    """Remembers every hook call as (name, args)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattribute__(self, name: str):
        if name.startswith("_") or name == "calls" or not hasattr(CarrierObserver, name):
            return object.__getattribute__(self, name)
        return lambda *args: self.calls.append((name, args))


class Broken(Observer):
    def version_committed(self, record) -> None:
        raise RuntimeError("the dashboard is down")

    def version_evaluated(self, record) -> None:
        raise RuntimeError("the dashboard is down")


def test_observers_fan_out_in_order_survive_a_broken_observer_and_skip_plain_ones(caplog):
    rec = Recorder()
    group = Observers([Broken(), rec, Observer()])
    with caplog.at_level(logging.ERROR, logger="shoal.observers"):
        group.version_committed(ROUND1)
    group.call_refused("revoked")  # Broken and the plain Observer have no carrier hooks
    group.bytes_moved("up", 10)
    assert rec.calls == [("version_committed", (ROUND1,)), ("call_refused", ("revoked",)),
                         ("bytes_moved", ("up", 10))]
    assert "observer Broken failed in version_committed" in caplog.text
    assert not Observers() and group


def test_progress_bar_shows_accuracy_epsilon_and_rejections_by_reason():
    out = io.StringIO()
    bar = ProgressBar(3, file=out)
    bar.version_evaluated(INITIAL)
    assert bar.bar.n == 0 and bar.text == "acc 0.1000  loss 2.300"
    bar.round_abandoned(ABANDONED, "deadline: 1 updates, fewer than the round's minimum")
    bar.version_evaluated(ROUND1)
    assert bar.bar.n == 1
    assert bar.text == "acc 0.5000  loss 1.250  eps 1.23  rejected timed_out 3, non_finite 1"
    bar.version_evaluated(ROUND2)  # not evaluated: the last accuracy stays
    assert bar.bar.n == 2
    assert bar.text == ("acc 0.5000  loss 1.250  eps 1.23  rejected timed_out 4, stale 2, "
                        "non_finite 1, other 2")
    bar.version_evaluated(ROUND3)
    bar.close()
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "3/3" in last and "acc 0.8000  loss 0.500  rejected timed_out 4" in last


def test_progress_bar_of_a_resumed_run_starts_at_its_version_and_quiet_draws_nothing():
    out = io.StringIO()
    bar = ProgressBar(10, start=7, file=out)
    assert bar.bar.n == 7
    bar.version_evaluated(RoundRecord(round=8, version=8, committed=True,
                                      eval={"accuracy": 0.7, "loss": 0.6}))
    assert bar.bar.n == 8
    bar.close()
    assert "8/10" in out.getvalue()
    silent = io.StringIO()
    quiet = ProgressBar(3, quiet=True, file=silent)
    quiet.version_evaluated(ROUND1)
    quiet.close()
    assert silent.getvalue() == ""


def test_run_directory_grows_with_the_run_and_finish_writes_the_rest(tmp_path):
    cfg = load_config(None, {**SYNTH, "rounds": 3, "output.dir": str(tmp_path),
                             "output.name": "r"})
    writer = RunDirWriter(cfg)
    run = tmp_path / "r"
    assert writer.path == run
    assert load_config(run / "config.toml").to_dict() == cfg.to_dict()
    assert (run / "metrics.jsonl").read_text() == ""
    for rec in (INITIAL, ROUND1, ROUND2, ROUND3):
        writer.version_evaluated(rec)
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2, 3]
    assert lines[0]["train_loss"] is None  # NaN is written as null
    assert lines[1]["eval_accuracy"] == 0.5 and lines[1]["privacy_epsilon"] == 1.234
    assert lines[2]["rejected"] == 5 and lines[2]["rejected_stale"] == 2
    assert "eval_accuracy" not in lines[2]
    assert not (run / "metrics.csv").exists()  # the table's columns are known at the end

    spec = ParamSpec.from_shapes({"w": (2, 3)})
    state = ServerState(np.arange(6, dtype=np.float32), version=3)
    summary = {"final_accuracy": 0.8, "final_loss": math.nan, "rounds": 3}
    writer.finish(Checkpoint(state=state, spec=spec, seed=cfg.seed), summary)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["round"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[2]["eval_accuracy"] == "" and rows[3]["eval_accuracy"] == "0.8"
    assert rows[2]["rejected_late"] == "1" and rows[1]["rejected_late"] == ""
    assert json.loads((run / "summary.json").read_text()) == {
        "final_accuracy": 0.8, "final_loss": None, "rounds": 3}
    ckpt = load_checkpoint(run / "model.npz")
    assert ckpt.state.version == 3 and ckpt.spec == spec
    np.testing.assert_array_equal(ckpt.state.params, state.params)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _json_log(level: int) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"shoal.test_observers.{level}")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return logger, stream


def test_log_observer_writes_one_parseable_json_line_per_event():
    logger, stream = _json_log(logging.INFO)
    obs = LogObserver(logger)
    obs.task_sent(1, 0, 4, 0.0)  # DEBUG: not at INFO
    obs.update_accepted(1, 3, 0, 1.0)  # DEBUG
    obs.update_rejected(1, "non_finite", 1, "the update has NaN or infinite values", 1.5)
    obs.clients_failed(1, 2, "timed_out", 2.0)
    obs.clients_failed(1, 1, "cancelled", 2.0)  # DEBUG: stragglers of a closed round
    obs.round_abandoned(ABANDONED, "deadline: 1 updates, fewer than the round's minimum")
    obs.version_committed(ROUND2)
    obs.version_evaluated(ROUND2)  # no evaluation: nothing to say
    obs.version_evaluated(ROUND3)
    obs.privacy_spent(1, {"epsilon": 1.234, "noise_std": 0.5})
    obs.secagg_dropouts(1, "share_keys", 2)
    lines = [json.loads(s) for s in stream.getvalue().splitlines()]
    assert [r["event"] for r in lines] == [
        "update_rejected", "clients_failed", "round_abandoned", "version_committed",
        "version_evaluated", "privacy_spent", "secagg_dropouts"]
    rejected, failed, abandoned, committed, evaluated, privacy, secagg = lines
    assert rejected["level"] == "info" and rejected["logger"] == logger.name
    assert (rejected["task"], rejected["reason"], rejected["count"]) == (1, "non_finite", 1)
    assert rejected["detail"] == "the update has NaN or infinite values"
    assert (failed["clients"], failed["reason"]) == (2, "timed_out")
    assert abandoned["level"] == "warning" and abandoned["rejected"] == {"timed_out": 3}
    assert abandoned["reason"].startswith("deadline")
    assert committed["version"] == 2 and committed["accepted"] == 4
    assert committed["rejected"]["stale"] == 2 and committed["train_loss"] is None
    assert evaluated["round"] == 3 and evaluated["eval_accuracy"] == 0.8
    assert privacy["privacy_epsilon"] == 1.234 and privacy["version"] == 1
    assert (secagg["stage"], secagg["count"], secagg["level"]) == ("share_keys", 2, "warning")

    debug_logger, debug_stream = _json_log(logging.DEBUG)
    LogObserver(debug_logger).task_sent(7, 2, 4, 0.5)
    (sent,) = [json.loads(s) for s in debug_stream.getvalue().splitlines()]
    assert (sent["event"], sent["task"], sent["version"], sent["clients"]) == \
        ("task_sent", 7, 2, 4)


def test_log_observer_names_each_device_its_task_round_and_version():
    logger, stream = _json_log(logging.DEBUG)
    obs = LogObserver(logger)
    obs.task_sent(3, 5, 2, 0.0)
    obs.device_step("dev-a", 3, "upload", 0.25)
    obs.device_step("dev-b", 3, "fold", 0.01, outcome="non_finite")
    obs.device_done("dev-a", 3, "accepted")
    obs.device_done("dev-b", 3, "late")
    lines = [json.loads(s) for s in stream.getvalue().splitlines()][1:]  # after task_sent
    assert [(r["event"], r["device"], r["level"]) for r in lines] == [
        ("device_step", "dev-a", "debug"), ("device_step", "dev-b", "info"),
        ("device_done", "dev-a", "debug"), ("device_done", "dev-b", "info")]
    assert all((r["task"], r["round"], r["version"]) == (3, 1, 5) for r in lines)
    assert (lines[0]["step"], lines[0]["seconds"], lines[0]["outcome"]) == ("upload", 0.25, "")
    assert (lines[1]["step"], lines[1]["outcome"]) == ("fold", "non_finite")
    assert lines[3]["outcome"] == "late"


def _samples(obs: PrometheusObserver) -> dict[tuple[str, frozenset], float]:
    text = obs.exposition().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_prometheus_observer_counts_coordinator_and_carrier_hooks():
    obs = PrometheusObserver()
    obs.task_sent(1, 0, 4, 0.0)
    obs.task_sent(2, 0, 3, 0.0)
    obs.update_accepted(1, 3, 0, 1.0)
    obs.update_accepted(2, 2, 3, 2.0)
    obs.update_rejected(2, "stale", 2, "too old", 2.0)
    obs.update_rejected(2, "non_finite", 1, "NaN", 2.0)
    obs.clients_failed(1, 1, "timed_out", 3.0)
    obs.version_committed(replace(ROUND1, seconds=3.0))
    obs.round_abandoned(replace(ABANDONED, seconds=40.0), "deadline")
    obs.version_committed(replace(ROUND2, seconds=0.5))
    obs.privacy_spent(2, {"epsilon": 1.5, "clip_norm": 1.0})
    obs.secagg_dropouts(2, "share_keys", 2)
    obs.call_refused("revoked")
    obs.call_refused("revoked")
    obs.checked_in("task")
    obs.checked_in("come_back")
    obs.bytes_moved("down", 1000)
    obs.bytes_moved("up", 250)
    obs.uploads_active(1)
    obs.uploads_active(1)
    obs.uploads_active(-1)
    s = _samples(obs)

    def v(name: str, **labels: str) -> float:
        return s[(name, frozenset(labels.items()))]

    assert v("shoal_rounds_total", outcome="committed") == 2
    assert v("shoal_rounds_total", outcome="abandoned") == 1
    assert v("shoal_updates_total", result="accepted", reason="") == 5
    assert v("shoal_updates_total", result="rejected", reason="stale") == 2
    assert v("shoal_updates_total", result="rejected", reason="non_finite") == 1
    assert v("shoal_client_failures_total", reason="timed_out") == 1
    assert v("shoal_tasks_total") == 2 and v("shoal_clients_asked_total") == 7
    assert v("shoal_update_staleness_count") == 5 and v("shoal_update_staleness_sum") == 6
    assert v("shoal_update_staleness_bucket", le="0.0") == 3
    assert v("shoal_update_staleness_bucket", le="4.0") == 5
    assert v("shoal_model_version") == 2 and v("shoal_privacy_epsilon") == 1.5
    assert v("shoal_secagg_dropouts_total", stage="share_keys") == 2
    assert v("shoal_refused_calls_total", reason="revoked") == 2
    assert v("shoal_checkins_total", answer="task") == 1
    assert v("shoal_checkins_total", answer="come_back") == 1
    assert v("shoal_bytes_total", direction="down") == 1000
    assert v("shoal_bytes_total", direction="up") == 250
    assert v("shoal_active_uploads") == 1
    assert v("shoal_round_seconds_count") == 3 and v("shoal_round_seconds_sum") == 43.5
    assert v("shoal_round_seconds_bucket", le="5.0") == 2
    assert obs.value("shoal_updates_total", result="rejected", reason="stale") == 2
    assert obs.value("shoal_updates_total", result="rejected", reason="never") == 0


def test_prometheus_observers_keep_their_own_registries():
    from prometheus_client import REGISTRY

    a, b = PrometheusObserver(), PrometheusObserver()
    a.call_refused("revoked")
    assert a.value("shoal_refused_calls_total", reason="revoked") == 1
    assert b.value("shoal_refused_calls_total", reason="revoked") == 0
    assert REGISTRY.get_sample_value("shoal_refused_calls_total", {"reason": "revoked"}) \
        is None


def test_prometheus_serves_metrics_over_http_and_a_taken_port_is_a_config_error():
    obs = PrometheusObserver()
    obs.checked_in("task")
    port = obs.serve_http(0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                      timeout=5).read().decode()
        assert 'shoal_checkins_total{answer="task"} 1.0' in text
        with pytest.raises(ConfigError) as info:
            PrometheusObserver().serve_http(port)
        assert info.value.key == "deploy.metrics_port" and str(port) in str(info.value)
    finally:
        obs.close()


class Versions(Observer):
    def __init__(self) -> None:
        self.committed: list[int] = []
        self.evaluated: list[tuple[int, bool]] = []

    def version_committed(self, record) -> None:
        self.committed.append(record.version)

    def version_evaluated(self, record) -> None:
        self.evaluated.append((record.round, bool(record.eval)))


def test_a_run_tells_every_observer_every_version_and_a_broken_one_changes_nothing(
        tmp_path):
    cfg = load_config(None, {**SYNTH, "rounds": 4, "eval.every": 3,
                             "output.dir": str(tmp_path), "output.name": "r"})
    versions, prom = Versions(), PrometheusObserver()
    writer = RunDirWriter(cfg)
    exp = Experiment(cfg)
    result = exp.run(observers=[Broken(), versions, prom, writer])
    assert versions.committed == [1, 2, 3, 4]
    # round 0, every 3rd and the last are evaluated
    assert versions.evaluated == [(0, True), (1, False), (2, False), (3, True), (4, True)]
    assert prom.value("shoal_rounds_total", outcome="committed") == 4
    assert prom.value("shoal_model_version") == 4
    assert prom.value("shoal_updates_total", result="accepted", reason="") == \
        sum(r.accepted for r in result.records) == 4 * 8
    assert prom.value("shoal_tasks_total") == 4
    lines = [json.loads(s) for s in (writer.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2, 3, 4]
    assert lines[-1]["eval_accuracy"] == result.records[-1].eval["accuracy"]
    plain = Experiment(cfg, exp.data).run()
    np.testing.assert_array_equal(result.state.params, plain.state.params)


@pytest.fixture
def restore_shoal_logging():
    """``--log-json`` points the ``shoal`` loggers at a file: put them back afterwards."""
    logger = logging.getLogger("shoal")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    for handler in logger.handlers:
        # the log file's handler (pytest's capture handlers are subclasses: leave them be)
        if type(handler) is logging.StreamHandler and handler not in saved[0]:
            handler.stream.close()
    logger.handlers[:], logger.level, logger.propagate = saved


def test_shoal_run_log_json_logs_every_committed_version(tmp_path, capsys,
                                                         restore_shoal_logging):
    log = tmp_path / "run.jsonl"
    assert main(["run", "--set", "data.dataset=\"synthetic\"", "--clients", "20",
                 "--set", "model.name=\"logreg\"", "--rounds", "3", "--out", str(tmp_path),
                 "--set", "output.name=\"r\"", "-q", "--log-json", str(log)]) == 0
    events = [json.loads(s) for s in log.read_text().splitlines()]
    assert [e["version"] for e in events if e["event"] == "version_committed"] == [1, 2, 3]
    assert [e["round"] for e in events if e["event"] == "version_evaluated"] == [0, 1, 2, 3]
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 4
