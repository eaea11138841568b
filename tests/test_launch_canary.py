"""`shoal launch --canary` end to end: real device processes on TLS loopback, signed models,
federated evaluation on each device's held-out split, the canary rule acting on the model
store. A candidate trained on corrupted labels is rolled back and no device outside the
canary ever installed it -- read from the devices' own counters, which each process prints
when it stops -- then a candidate trained further on the true labels is promoted. Every step
is in the audit log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("grpc")

from shoal.build import load_data  # noqa: E402
from shoal.config import load_config  # noqa: E402
from shoal.lifecycle.audit import read_audit  # noqa: E402
from shoal.lifecycle.canary import in_canary  # noqa: E402
from shoal.scenarios.canary import train_pair  # noqa: E402
from shoal.store.models import ModelStore  # noqa: E402

N = 8
OVERRIDES = {"data.dataset": "synthetic", "data.synthetic_iid": True, "data.clients": N,
             "model.name": "logreg",
             "sampling.per_round": N, "rounds": 6, "deploy.checkin_interval_s": 0.3}
DEVICES = [f"device-{i:04d}" for i in range(N)]


def launch(work, candidate: int, *extra: str) -> dict:
    sets = [a for k, v in OVERRIDES.items()
            for a in ("--set", f"{k}={json.dumps(v)}")]
    proc = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "launch", *sets, "--dir", str(work),
         "--canary", str(candidate), "--canary-fraction", "0.6", "--canary-cohort", "3",
         "--min-clients", "3", "--max-evaluations", "3", "--evaluation-timeout", "40",
         "--json", "-q", *extra],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def installed(work) -> dict[str, set[int]]:
    """Every served version each device process installed, from its own final counters."""
    out = {}
    for d in DEVICES:
        text = (work / "logs" / f"{d}.log").read_text()
        stats = [json.loads(m) for m in re.findall(r"^(\{\"device\".*\})$", text, re.M)]
        assert stats, f"{d} printed no counters:\n{text[-2000:]}"
        out[d] = set(stats[-1]["served_versions"])
    return out


@pytest.mark.slow
def test_shoal_launch_canary_rolls_back_a_bad_candidate_and_promotes_a_good_one(tmp_path):
    cfg = load_config(None, OVERRIDES)
    data = load_data(cfg)
    work = tmp_path / "work"
    with ModelStore(work / "models") as store:
        prod, bad, _, accuracy = train_pair(cfg, data, store, corrupt=True,
                                            candidate_rounds=20)
    assert accuracy[bad] < accuracy[prod] - 0.3  # really a worse model
    inside = {d for d, m in zip(DEVICES, in_canary(DEVICES, 0.6, f"canary-v{bad}")) if m}
    assert 3 <= len(inside) <= N - 3  # both arms can reach the minimum sample

    summary = launch(work, bad)
    assert summary["decision"] == "rollback", summary
    assert summary["reason"].startswith("worse"), summary  # the test, not the time limit
    assert summary["production_now"] == prod
    assert set(summary["canary_devices"]) == inside
    held = installed(work)
    assert not any(bad in held[d] for d in set(DEVICES) - inside)  # the devices' own word
    assert any(bad in held[d] for d in inside)
    assert all(prod in held[d] for d in set(DEVICES) - inside)  # served production
    with ModelStore(work / "models", readonly=True) as store:
        assert store.get(bad).status == "rolled_back" and store.production().id == prod

    with ModelStore(work / "models") as store:
        _, good, _, _ = train_pair(cfg, data, store, corrupt=False, candidate_rounds=6,
                                   production=prod)
    summary = launch(work, good, "--margin", "0.1")
    assert summary["decision"] == "promote", summary
    assert summary["reason"].startswith("not worse"), summary
    with ModelStore(work / "models", readonly=True) as store:
        assert store.production().id == good

    actions = [(e["action"], e.get("candidate")) for e in read_audit(work / "audit.jsonl")]
    assert actions[0] == ("canary_start", bad) and ("canary_rollback", bad) in actions
    assert ("canary_start", good) in actions and actions[-1] == ("canary_promote", good)
    assert sum(a == "canary_evaluated" for a, _ in actions) >= 4  # both arms, both canaries


def test_a_canary_launch_refuses_what_it_cannot_run_before_starting_devices(tmp_path, capsys):
    from shoal.cli import main

    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["launch", *sets, "--canary", "2", "-q"]) == 2
    assert "--canary needs --dir" in capsys.readouterr().err
    work = tmp_path / "work"
    cfg = load_config(None, OVERRIDES)
    with ModelStore(work / "models") as store:
        prod, cand, _, _ = train_pair(cfg, load_data(cfg), store, corrupt=False,
                                      candidate_rounds=1)
        store.reject(cand, now=5.0, reason="test")
    assert main(["launch", *sets, "--dir", str(work), "--canary", str(cand), "-q"]) == 2
    assert f"version {cand} is not a candidate" in capsys.readouterr().err
    assert not (work / "logs" / "device-0000.log").exists()  # no device was started
    with ModelStore(work / "models", readonly=True) as store:
        assert store.production().id == prod


def test_the_canary_flags_override_the_canary_section_key_by_key(tmp_path):
    """[canary] in the config file sets the rollout; each flag given overrides its one key,
    and a flag not given leaves the file's value (not argparse's default)."""
    from shoal.cli import build_parser
    from shoal.cli.launch_canary import canary_overrides, client_args

    toml = tmp_path / "c.toml"
    toml.write_text("[canary]\nfraction = 0.3\nalpha = 0.01\ncap = 4.0\nholdout = 0.25\n"
                    "segment_by = \"os\"\n")
    args = build_parser().parse_args(["launch", str(toml), "--canary", "2", "--alpha", "0.1",
                                      "--max-evaluations", "7", "--loss-cap", "5"])
    assert canary_overrides(args) == {"canary.alpha": 0.1, "canary.max_rounds": 7,
                                      "canary.cap": 5.0}
    cfg = load_config(args.config, canary_overrides(args))
    c = cfg["canary"]
    assert (c["fraction"], c["alpha"], c["cap"], c["max_rounds"]) == (0.3, 0.1, 5.0, 7)
    assert (c["holdout"], c["segment_by"], c["cohort"], c["trim"]) == (0.25, "os", 30, 0.1)
    assert client_args(cfg, tmp_path)[-2:] == ["--holdout", "0.25"]  # what devices start with
    assert canary_overrides(build_parser().parse_args(["launch"])) == {}


@pytest.mark.parametrize("flag, value, key", [
    ("--alpha", "0.7", "canary.alpha"), ("--canary-fraction", "1.0", "canary.fraction"),
    ("--trim", "0.5", "canary.trim"), ("--min-clients", "1", "canary.min_clients"),
    ("--holdout", "0", "canary.holdout")])
def test_a_canary_flag_out_of_range_is_refused_naming_its_key(tmp_path, capsys, flag, value,
                                                              key):
    from shoal.cli import main

    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    work = tmp_path / "work"
    assert main(["launch", *sets, "--dir", str(work), "--canary", "2", flag, value,
                 "-q"]) == 2
    assert key in capsys.readouterr().err
    assert not work.exists()  # refused before anything was written


@pytest.mark.slow
def test_shoal_launch_with_keys_trains_fully_signed(tmp_path):
    """`shoal launch --keys DIR` (training, ~25 s): the device processes verify every
    training download with DIR/operator.pub and none is refused, and every committed version
    carries the operator's signatures of its model and plan as this store's version --
    checked with the public key `shoal keys` wrote, over the bytes the store holds (the
    oracle), not with anything the aggregator says."""
    from shoal.lifecycle.keys import load_trusted_key
    from shoal.lifecycle.signing import SignedArtifact, model_bytes, plan_bytes, verify_artifact
    from shoal.lifecycle.store_signing import STORE_ID_FILE

    keys, work = tmp_path / "keys", tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = [sys.executable, "-m", "shoal.cli"]
    assert subprocess.run([*run, "keys", "--out", str(keys)], capture_output=True,
                          env=env).returncode == 0
    overrides = {**OVERRIDES, "data.clients": 4, "sampling.per_round": 4, "rounds": 2}
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    proc = subprocess.run([*run, "launch", *sets, "--dir", str(work), "--keys", str(keys),
                           "--json", "-q", "--no-dashboard"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["rounds"] == 2
    for d in DEVICES[:4]:
        text = (work / "logs" / f"{d}.log").read_text()
        stats = json.loads(re.findall(r"^(\{\"device\".*\})$", text, re.M)[-1])
        assert stats["uploads_accepted"] >= 1 and stats["downloads"] >= 1, stats
        assert stats["signature_rejections"] == 0 and stats["tasks_abandoned"] == 0, stats
    trusted = load_trusted_key(keys / "operator.pub")
    with ModelStore(work / "models", readonly=True) as store:
        served = f"served:{(store.dir / STORE_ID_FILE).read_text().strip()}"
        versions = store.list()
        assert len(versions) == 2
        for v in versions:
            model = SignedArtifact.from_json(v.signatures["model"])
            plan = SignedArtifact.from_json(v.signatures["plan"])
            params = store.load(v.id).state.params
            assert verify_artifact(trusted, "model", model_bytes(params), model,
                                   namespace=served) == v.id
            assert verify_artifact(trusted, "plan", plan_bytes(v.plan), plan,
                                   namespace=served) == v.id


@pytest.mark.parametrize("mode", [["--edges", "2"], ["--gossip", "3"], ["--ingest", "2"]])
def test_launch_modes_that_do_not_sign_refuse_keys(tmp_path, capsys, mode):
    """--keys promises signed models: the launch modes that cannot keep it refuse it before
    anything is written, instead of running unsigned."""
    from shoal.cli import main

    assert main(["launch", *mode, "--keys", str(tmp_path / "keys"), "--dir",
                 str(tmp_path / "work"), "--no-dashboard"]) == 2
    assert "does not sign yet" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
