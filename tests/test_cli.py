"""The command line, run in process through main(argv)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from shoal.cli import main
from shoal.store import load_checkpoint


def test_help_is_useful(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "config S" in out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--rounds", "--clients", "--per-round", "--seed", "--json", "--set"):
        assert flag in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: shoal" in capsys.readouterr().out


def test_run_writes_a_complete_run_directory_and_json_summary(tmp_path, capsys):
    code = main(["run", "--rounds", "3", "--clients", "20", "--per-round", "5", "--seed", "1",
                 "--out", str(tmp_path), "--json", "--set", "output.name=\"t\"",
                 "--set", "data.partition=iid"])
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout is exactly one JSON object
    for key in ("final_accuracy", "mean_accuracy_last5", "rounds", "wall_seconds",
                "peak_rss_mb", "run_dir"):
        assert key in summary
    assert summary["rounds"] == 3 and summary["client_updates"] == 15
    assert summary["final_accuracy"] > 0.5  # IID FMNIST, 3 rounds of 5 clients
    run = tmp_path / "t"
    assert summary["run_dir"] == str(run)
    assert {p.name for p in run.iterdir()} >= {"config.toml", "metrics.jsonl", "metrics.csv",
                                               "summary.json", "model.npz", "curves.png"}
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2, 3]
    assert lines[-1]["eval_accuracy"] == summary["final_accuracy"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 4 and float(rows[3]["eval_accuracy"]) == summary["final_accuracy"]
    ckpt = load_checkpoint(run / "model.npz")
    assert ckpt.state.version == 3 and ckpt.spec.size == 199_210 and ckpt.seed == 1
    assert np.all(np.isfinite(ckpt.state.params))
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rounds = 3" in (run / "config.toml").read_text()


@pytest.mark.parametrize("argv, phrase", [
    (["run", "--rounds", "0"], "rounds = 0 is not allowed: it must be an integer >= 1"),
    (["run", "--set", "client.lr=-0.1"], "client.lr = -0.1 is not allowed"),
    (["run", "--set", "client.momentum=0.9"], "unknown config key 'client.momentum'"),
    (["run", "--per-round", "200"], "sampling.per_round = 200"),
    (["run", "missing.toml"], "missing.toml does not exist"),
    (["run", "--set", "privacy.target_quantile=1.0"],
     "privacy.target_quantile = 1.0 is not allowed: it must be a number > 0.0 and < 1.0"),
    (["client", "--server", "localhost:1", "--token", "t", "--index", "0", "--cert", "c.pem"],
     "--cert and --key go together"),
    (["client", "--server", "localhost:1", "--token", "t", "--index", "0", "--cert", "c.pem",
      "--key", "c.key"], "a client certificate needs TLS: give --ca too"),
    (["client", "--server", "localhost:1", "--token", "t", "--index", "0", "--set",
      "data.population=\"generated\""], "data.population = 'generated'"),
    (["serve", "--set", "data.population=\"generated\""], "data.population = 'generated'"),
    # every deployed launcher refuses a generated population before a process starts
    (["launch", "--clients", "20", "--set", "data.dataset=\"synthetic\"",
      "--set", "data.population=\"generated\""], "data.population = 'generated'"),
    (["launch", "--edges", "2", "--clients", "20", "--set", "data.dataset=\"synthetic\"",
      "--set", "data.population=\"generated\""], "data.population = 'generated'"),
    (["launch", "--gossip", "3", "--set", "data.dataset=\"synthetic\"",
      "--set", "data.population=\"generated\""], "data.population"),
])
def test_bad_configuration_exits_2_with_a_message_naming_the_key(argv, phrase, capsys):
    assert main(argv) == 2
    assert phrase in capsys.readouterr().err


def test_an_edge_device_process_refuses_a_generated_population(tmp_path):
    # `python -m shoal.cli.edges device` trains a client of a fixed partition: a generated
    # population (no client_indices) is a ConfigError naming the key, not an AttributeError
    from shoal.cli.edges import edge_main
    from shoal.errors import ConfigError

    cfg = tmp_path / "config.toml"
    cfg.write_text('[data]\ndataset = "synthetic"\npopulation = "generated"\nclients = 20\n')
    with pytest.raises(ConfigError, match="data.population = 'generated'") as info:
        edge_main(["device", str(cfg), "--index", "0", "--servers", "localhost:1",
                   "--token", str(tmp_path / "token"), "--ca", str(tmp_path / "ca.pem")])
    assert info.value.key == "data.population"


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    code = main(["run", "--set", f"data.path=\"{tmp_path}\"", "--rounds", "1", "-q"])
    assert code == 1
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "dataset-fashion-mnist" in err


def test_config_command_prints_resolved_toml(capsys):
    assert main(["config", "--rounds", "7"]) == 0
    out = capsys.readouterr().out
    assert "rounds = 7" in out and "[client]" in out


def test_runs_commit_to_a_model_store_and_models_command_manages_it(tmp_path, capsys):
    store = tmp_path / "store"
    base = ["run", "--set", "data.dataset=\"synthetic\"", "--clients", "20",
            "--set", "model.name=\"logreg\"", "--rounds", "1", "--out", str(tmp_path), "-q",
            "--json", "--set", f"output.store=\"{store}\""]
    for seed in ("0", "1"):
        assert main(base + ["--seed", seed]) == 0
        assert json.loads(capsys.readouterr().out)["model_version"] == int(seed) + 1
    assert main(["models", "--store", str(store), "list", "--json"]) == 0
    versions = json.loads(capsys.readouterr().out)
    assert [(v["id"], v["parent"], v["status"]) for v in versions] == \
        [(1, None, "candidate"), (2, 1, "candidate")]
    assert main(["models", "--store", str(store), "promote", "v1"]) == 0
    assert main(["models", "--store", str(store), "promote", "2"]) == 0
    assert main(["models", "--store", str(store), "rollback", "v1"]) == 0
    capsys.readouterr()
    assert main(["models", "--store", str(store), "show", "v2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "rolled_back" and shown["lineage"] == [2, 1]
    assert main(["models", "--store", str(store), "rollback", "v2"]) == 1  # refused
    assert "rolled back" in capsys.readouterr().err
    assert main(["models", "--store", str(store), "show", "vx"]) == 2


def test_certs_and_enroll_commands(tmp_path, capsys):
    import os
    import time

    from shoal.transport.auth import load_or_create_secret
    from shoal.transport.tokens import verify_token

    assert main(["certs", "--out", str(tmp_path / "pki"), "--hostname", "agg.local"]) == 0
    assert {p.name for p in (tmp_path / "pki").iterdir()} >= {"ca.pem", "server.pem",
                                                              "server.key"}
    assert main(["certs", "--out", str(tmp_path / "pki")]) == 2  # refuses to overwrite
    assert "overwrite" in capsys.readouterr().err
    # client certificates for mutual TLS, signed by the existing CA (not a new one)
    ca = (tmp_path / "pki" / "ca.pem").read_bytes()
    assert main(["certs", "--out", str(tmp_path / "pki"), "--client", "hospital-a",
                 "--client", "hospital-b"]) == 0
    assert (tmp_path / "pki" / "ca.pem").read_bytes() == ca
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    for name in ("hospital-a", "hospital-b"):
        cert = x509.load_pem_x509_certificate((tmp_path / "pki" / f"client-{name}.pem")
                                              .read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    # nothing is written when one of several client certificates exists already
    assert main(["certs", "--out", str(tmp_path / "pki"), "--client", "hospital-c",
                 "--client", "hospital-a"]) == 2
    assert "client-hospital-a.pem already exists; pass --overwrite" in capsys.readouterr().err
    assert not (tmp_path / "pki" / "client-hospital-c.pem").exists()
    assert main(["certs", "--out", str(tmp_path / "pki"), "--client", "hospital-c",
                 "--hostname", "agg.lan"]) == 2
    assert "--hostname names the server certificate of a new CA" in capsys.readouterr().err
    # a device refuses to start with a certificate that names another device
    assert main(["client", "--server", "localhost:1", "--token", "t", "--index", "0",
                 "--ca", str(tmp_path / "pki" / "ca.pem"), "--device-id", "hospital-b",
                 "--cert", str(tmp_path / "pki" / "client-hospital-a.pem"),
                 "--key", str(tmp_path / "pki" / "client-hospital-a.key")]) == 2
    assert "names hospital-a, but this device is 'hospital-b'" in capsys.readouterr().err
    secret = tmp_path / "secret"
    assert main(["enroll", "phone-1", "--secret", str(secret), "--out",
                 str(tmp_path / "tok")]) == 0
    assert oct(os.stat(tmp_path / "tok").st_mode & 0o777) == "0o600"
    token = (tmp_path / "tok").read_text().strip()
    claims = verify_token(load_or_create_secret(secret), token, now=time.time(),
                          expected_device="phone-1")
    assert claims.sub == "phone-1"
