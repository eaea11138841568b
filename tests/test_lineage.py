"""Lineage of model versions: parent, rounds, config hash, training plan, metrics; diff and
history with reasons; ``shoal models list|show|diff|history``."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from shoal.cli import main
from shoal.errors import ConfigError
from shoal.params import ParamSpec
from shoal.store import Checkpoint, ModelStore
from shoal.store.lineage import canonical_json, diff_versions
from shoal.store.model_versions import UnknownVersion
from shoal.strategy import ServerState

CONFIG = {"seed": 0, "rounds": 3, "model": {"name": "mlp2nn"},
          "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
          "strategy": {"name": "fedavg"}, "compression": {"upload": ""},
          "privacy": {"placement": "none"}, "output": {"store": "x"}}


def ckpt(version: int, params, config=None) -> Checkpoint:
    meta = {} if config is None else {"config": config}
    return Checkpoint(state=ServerState(params=np.asarray(params, np.float32),
                                        version=version),
                      spec=ParamSpec.from_shapes({"w": (len(params),)}), seed=0, meta=meta)


def test_a_version_records_parent_rounds_config_hash_plan_and_metrics(tmp_path):
    with ModelStore(tmp_path) as store:
        v1 = store.commit(ckpt(3, [1, 2, 3], CONFIG), round=3, rounds=(1, 3),
                          metrics={"accuracy": 0.7}, now=1.0)
        changed = json.loads(json.dumps(CONFIG)) | {"client": CONFIG["client"] | {"lr": 0.1}}
        v2 = store.commit(ckpt(5, [1, 2, 4], changed), round=5, rounds=(4, 5), parent=1,
                          metrics={"accuracy": 0.8}, now=2.0)
    reader = ModelStore(tmp_path, readonly=True)
    got1, got2 = reader.get(1), reader.get(2)
    assert (got1.parent, got1.rounds, got2.parent, got2.rounds) == (None, (1, 3), 1, (4, 5))
    # the hash is SHA-256 of the sorted, compact JSON of the whole config (independent oracle)
    expected = hashlib.sha256(json.dumps(CONFIG, sort_keys=True, separators=(",", ":"))
                              .encode()).hexdigest()
    assert got1.config_hash == expected == v1.config_hash
    assert got2.config_hash != expected
    # the plan is what a device trains with; the output section is not part of it
    assert dict(got1.plan) == {k: CONFIG[k] for k in ("model", "client", "strategy",
                                                      "compression", "privacy")}
    assert got2.plan["client"]["lr"] == 0.1 and dict(got2.metrics) == {"accuracy": 0.8}
    assert v2.to_dict()["rounds"] == [4, 5]


def test_old_indexes_without_lineage_still_read(tmp_path):
    with ModelStore(tmp_path) as store:
        store.commit(ckpt(2, [1, 2]), round=2, metrics={}, now=1.0)
    path = tmp_path / "models" / "index.json"
    doc = json.loads(path.read_text())
    for entry in doc["versions"]:
        for key in ("rounds", "config_hash", "plan"):
            del entry[key]
    path.write_text(json.dumps(doc))
    v = ModelStore(tmp_path, readonly=True).get(1)
    assert (v.rounds, v.config_hash, v.plan) == ((2, 2), None, None)


def test_bad_rounds_are_refused_and_change_nothing(tmp_path):
    with ModelStore(tmp_path) as store:
        for bad in ((3, 2), (1, 4), (1,), (-1, 3), "1-3"):
            with pytest.raises(ConfigError):
                store.commit(ckpt(3, [1.0]), round=3, rounds=bad, metrics={}, now=1.0)
        assert store.list() == [] and sorted(p.name for p in store.dir.iterdir()) == [
            ".lock", "index.json"]


def test_diff_reports_metrics_plan_params_and_common_ancestor(tmp_path):
    with ModelStore(tmp_path) as store:
        store.commit(ckpt(1, [0, 0, 0], CONFIG), round=1, metrics={"accuracy": 0.5},
                     now=1.0)
        store.commit(ckpt(2, [3, 0, 4], CONFIG), round=2, parent=1,
                     metrics={"accuracy": 0.75, "loss": 1.0}, now=2.0)
        other = json.loads(json.dumps(CONFIG))
        other["client"]["epochs"] = 5
        store.commit(ckpt(2, [3, 0, 0], other), round=2, parent=1,
                     metrics={"accuracy": 0.625}, now=3.0)
        d = diff_versions(store, 2, 3)
        assert d["metrics"] == {"accuracy": [0.75, 0.625, -0.125], "loss": [1.0, None, None]}
        assert d["plan"] == {"client.epochs": [1, 5]} and d["same_config"] is False
        assert d["params"] == {"l2": 4.0, "max_abs": 4.0, "cosine": pytest.approx(0.6)}
        assert d["common_ancestor"] == 1
        assert diff_versions(store, 1, 2)["same_config"] is True
        with pytest.raises(UnknownVersion):
            diff_versions(store, 1, 9)


def test_canonical_json_refuses_nan():
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    assert canonical_json({"b": 1, "a": [1.5]}) == b'{"a":[1.5],"b":1}'


def test_history_keeps_the_reason_of_every_move(tmp_path):
    with ModelStore(tmp_path) as store:
        for i in (1, 2):
            store.commit(ckpt(i, [float(i)]), round=i, metrics={}, now=float(i))
        store.promote(1, now=10.0, reason="first")
        store.promote(2, now=11.0, reason="canary: loss 0.41 < 0.52, p=0.001")
        store.rollback(1, now=12.0)
        with pytest.raises(ConfigError):
            store.promote(2, now=13.0, reason=7)  # type: ignore[arg-type]
        assert [(e.action, e.version, e.reason) for e in store.history()] == [
            ("promote", 1, "first"), ("promote", 2, "canary: loss 0.41 < 0.52, p=0.001"),
            ("rollback", 1, "")]


def test_models_cli_list_show_diff_history(tmp_path, capsys):
    with ModelStore(tmp_path) as store:
        store.commit(ckpt(1, [0, 0], CONFIG), round=1, metrics={"accuracy": 0.5}, now=1.0)
        store.commit(ckpt(4, [1, 0], CONFIG), round=4, rounds=(2, 4), parent=1,
                     metrics={"accuracy": 0.6}, now=2.0)
    root = str(tmp_path)
    assert main(["models", "--store", root, "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "rounds 2-4" in lines[1] and "parent v1" in lines[1]
    assert lines[1].split("config ")[1].startswith(
        hashlib.sha256(canonical_json(CONFIG)).hexdigest()[:12])
    assert main(["models", "--store", root, "show", "v2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["rounds"] == [2, 4] and shown["lineage"] == [2, 1]
    assert shown["plan"]["model"] == {"name": "mlp2nn"}
    assert main(["models", "--store", root, "diff", "v1", "v2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"]["l2"] == 1.0 and d["metrics"]["accuracy"][2] == pytest.approx(0.1)
    assert main(["models", "--store", root, "promote", "v2", "--reason", "by hand"]) == 0
    assert main(["models", "--store", root, "rollback", "v1", "--reason", "bad"]) == 0
    capsys.readouterr()
    assert main(["models", "--store", root, "history", "--json"]) == 0
    assert [(e["action"], e["reason"]) for e in json.loads(capsys.readouterr().out)] == [
        ("promote", "by hand"), ("rollback", "bad")]
    assert main(["models", "--store", root, "diff", "v1"]) == 2  # needs two versions
    assert main(["models", "--store", root, "show", "v1", "v2"]) == 2
