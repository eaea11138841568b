"""Real deployments on this machine: separate processes, TLS sockets on loopback.

* `shoal launch` trains exactly what `shoal run` trains (same clients, batches and streams).
* Killing the aggregator with SIGKILL mid-run loses nothing committed: a restarted aggregator
  resumes from its model store and the devices reconnect by themselves.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("grpc")

from shoal.cli import main  # noqa: E402
from shoal.cli.launch import stop_processes  # noqa: E402
from shoal.store import ModelStore  # noqa: E402

SMALL = ["--set", "data.dataset=\"synthetic\"", "--clients", "3", "--per-round", "3",
         "--set", "model.name=\"logreg\"", "--set", "deploy.over_selection=1.0",
         "--set", "deploy.min_fraction=1.0", "--set", "deploy.checkin_interval_s=0.3"]


@pytest.mark.parametrize("mtls", [False, True])
def test_launch_matches_the_simulation_exactly(tmp_path, capsys, mtls):
    """Client processes over TLS, or over mutual TLS (each presents its own certificate,
    whose common name the aggregator binds to its token), train what `shoal run` trains."""
    assert main(["launch", *SMALL, "--rounds", "2", "--out", str(tmp_path / "runs"),
                 "--dir", str(tmp_path / "work"), "--json", "-q",
                 *(["--mtls"] if mtls else [])]) == 0
    launched = json.loads(capsys.readouterr().out)
    assert main(["run", *SMALL, "--rounds", "2", "--out", str(tmp_path / "runs"),
                 "--json", "-q"]) == 0
    simulated = json.loads(capsys.readouterr().out)
    assert launched["client_processes"] == 3 and launched["client_updates"] == 6
    # with --mtls every process had its own certificate (the aggregator refuses calls without)
    assert (tmp_path / "work" / "certs" / "client-device-0002.pem").exists() == mtls
    assert launched["final_accuracy"] == pytest.approx(simulated["final_accuracy"], abs=1e-3)
    assert launched["final_loss"] == pytest.approx(simulated["final_loss"], rel=1e-3)
    assert launched["bytes_up_per_round"] > 0 and launched["bytes_down_per_round"] > 0
    with ModelStore(tmp_path / "work" / "models", readonly=True) as store:
        assert [v.round for v in store.list()] == [1, 2]  # every round committed


@pytest.mark.parametrize("case, phrase", [
    ("no_certs", "mutual TLS (--client-ca) needs the server's certificate directory"),
    ("missing", "client CA file"),
    ("not_a_ca", "is not a CA certificate"),
    ("not_pem", "is not a PEM certificate"),
])
def test_serve_refuses_a_bad_client_ca_before_writing_anything(tmp_path, capsys, case,
                                                                 phrase):
    import datetime as dt

    from shoal.transport.certs import make_local_pki

    pki = make_local_pki(tmp_path / "pki", days=1, now=dt.datetime.now(dt.timezone.utc))
    client_ca = {"no_certs": pki.ca_cert, "missing": tmp_path / "nope.pem",
                 "not_a_ca": pki.server_cert, "not_pem": pki.server_key}[case]
    certs = [] if case == "no_certs" else ["--certs", str(tmp_path / "pki")]
    work = tmp_path / "work"
    assert main(["serve", *SMALL, "--dir", str(work), *certs, "--client-ca", str(client_ca),
                 "-q"]) == 2
    assert phrase in capsys.readouterr().err
    assert not (work / "secret").exists() and not (work / "registry.db").exists()
    assert not (work / "models").exists()


@pytest.mark.parametrize("settings, phrase", [
    # the default over-selection invites more devices than the accountant would count
    (["--set", "privacy.placement=\"central\"", "--set", "deploy.over_selection=1.3"],
     "central DP in a deployment needs cohorts the accountant describes"),
    (["--set", "privacy.placement=\"central\"", "--set", "sampling.selection=\"fairness\""],
     "sampling.selection must be 'uniform'"),
    (["--set", "privacy.placement=\"central\"", "--set", "sampling.method=\"poisson\""],
     "sampling.method must be 'uniform'"),
    (["--set", "privacy.placement=\"central\"", "--set", "deploy.target=2"],
     "deploy.target must be 3"),
    (["--set", "privacy.placement=\"central\"", "--set", "deploy.wait_devices=2"],
     "deploy.wait_devices must be 3"),
])
def test_serve_refuses_settings_it_would_silently_misapply(tmp_path, capsys, settings,
                                                            phrase):
    work = tmp_path / "work"
    assert main(["serve", *SMALL, *settings, "--dir", str(work), "-q"]) == 2
    assert phrase in capsys.readouterr().err
    assert not (work / "secret").exists() and not (work / "registry.db").exists()


def test_launch_refuses_before_writing_its_certificates_and_tokens(tmp_path, capsys):
    work = tmp_path / "work"
    assert main(["launch", *SMALL, "--set", "privacy.placement=\"central\"",
                 "--set", "deploy.over_selection=1.3", "--dir", str(work), "-q"]) == 2
    assert "deploy.over_selection must be 1.0" in capsys.readouterr().err
    assert not work.exists()


def _spawn(args, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "shoal.cli", *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def _wait(pred, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _serve_with_clients(tmp_path: Path, work: Path, config: str, *, clients: int = 3,
                        client_args=lambda i: []
                        ) -> tuple[subprocess.Popen, list[subprocess.Popen], str, list[str]]:
    """`shoal serve` of ``config`` (TOML text) with its state in ``work``, TLS from a new PKI
    in ``tmp_path``; once it serves, one `shoal client` process per device (``device-000i``,
    its log ``client{i}.log``, ``client_args(i)`` added). Returns ``(server, client
    processes, port, serve arguments)``; the caller stops them (``stop_processes``)."""
    from shoal.transport.auth import load_or_create_secret
    from shoal.transport.certs import make_local_pki
    from shoal.transport.tokens import issue_token

    pki = make_local_pki(tmp_path / "certs", days=1, now=dt.datetime.now(dt.timezone.utc))
    secret = load_or_create_secret(work / "secret")
    cfg = tmp_path / "c.toml"
    cfg.write_text(config + f'\n[output]\ndir = "{tmp_path / "runs"}"\n')
    serve_args = ["serve", str(cfg), "--dir", str(work), "--certs", str(tmp_path / "certs"),
                  "-q", "--json"]
    server = _spawn(serve_args, tmp_path / "serve1.log")
    procs: list[subprocess.Popen] = []
    try:
        _wait((work / "port").exists, 60, "the aggregator's port")
        port = (work / "port").read_text().strip()
        for i in range(clients):
            tok = tmp_path / f"tok{i}"
            tok.write_text(issue_token(secret, f"device-{i:04d}", now=time.time(),
                                       ttl_seconds=3600))
            procs.append(_spawn(["client", str(cfg), "--server", f"localhost:{port}",
                                 "--token", str(tok), "--ca", str(pki.ca_cert),
                                 "--index", str(i), *client_args(i)],
                                tmp_path / f"client{i}.log"))
    except BaseException:
        stop_processes(procs + [server])
        raise
    return server, procs, port, serve_args


#: three devices, every one in every round (the deployments these tests start)
THREE = ('[data]\ndataset = "synthetic"\nclients = 3\n[model]\nname = "logreg"\n'
         '[sampling]\nper_round = 3\n')


def test_aggregator_survives_sigkill_and_resumes(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    server, clients, port, serve_args = _serve_with_clients(
        tmp_path, work, "rounds = 6\n" + THREE + "[deploy]\nover_selection = 1.0\n"
        "min_fraction = 1.0\ncheckin_interval_s = 0.3\ndeadline_s = 30.0")
    port_file = work / "port"
    try:
        store_dir = work / "models"

        def committed() -> int:
            if not (store_dir / "models" / "index.json").exists():
                return 0
            with ModelStore(store_dir, readonly=True) as store:
                return len(store.list())

        _wait(lambda: committed() >= 2, 120, "two committed rounds")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        before = committed()
        assert 2 <= before < 6
        port_file.unlink()
        # restart on the same port so the running devices find it again
        restart = serve_args[:4] + ["--set", f"deploy.port={port}"] + serve_args[4:]
        server = _spawn(restart, tmp_path / "serve2.log")
        assert server.wait(timeout=180) == 0, (tmp_path / "serve2.log").read_text()
        summary = json.loads((tmp_path / "serve2.log").read_text().strip().splitlines()[-1])
        assert summary["rounds"] == 6
        with ModelStore(store_dir, readonly=True) as store:
            rounds = [v.round for v in store.list()]
            assert rounds == list(range(1, 7))  # nothing committed was lost or redone
            lineage = [v.id for v in store.lineage(store.list()[-1].id)]
            assert lineage == list(range(6, 0, -1))
    finally:
        stop_processes(clients + [server])  # SIGTERM, then SIGKILL after 10 s
    stats = [json.loads(Path(tmp_path / f"client{i}.log").read_text().strip().splitlines()[-1])
             for i in range(3)]
    # every round needs all three devices (min_fraction = 1), so each device delivered an
    # update in every round, including those after the restart: they came back by themselves
    # (devices that were mid-call saw the outage and retried with backoff; one that was
    # told to come back later may have slept through it)
    assert all(s["uploads_accepted"] >= 6 for s in stats)  # +1 if a killed round redone
    assert any(s["reconnects"] >= 1 for s in stats)


def test_launch_with_secure_aggregation_survives_clients_killed_mid_round(tmp_path):
    """`shoal launch` with SecAgg on: device-0000 is SIGKILLed right after ShareKeys (its
    pairwise masks must be reconstructed from its neighbours' shares), device-0001 right
    after sending its masked input (its self-mask is removed with the survivors' shares).
    Round 1 must still commit exactly the weighted mean of the included devices' clipped
    updates, which this test recomputes from their data independently of the protocol."""
    from shoal.config import load_config
    from shoal.frameworks.torch import FlatModule
    from shoal.models import build_model
    from shoal.build import load_data
    from shoal.training import LocalTrainConfig
    from shoal.transport.reference import fmnist_train_fn

    work, log = tmp_path / "work", tmp_path / "aggregator.jsonl"
    overrides = {"data.dataset": "synthetic", "data.clients": 6, "model.name": "logreg",
                 "sampling.per_round": 6, "deploy.target": 5, "deploy.over_selection": 1.2,
                 "deploy.min_fraction": 0.6, "deploy.checkin_interval_s": 0.3,
                 "deploy.deadline_s": 30.0, "secure_aggregation.enabled": True,
                 "secure_aggregation.roster_wait_s": 3.0,
                 "secure_aggregation.stage_timeout_s": 3.0, "rounds": 2}
    sets = [a for k, v in overrides.items()
            for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}")]
    proc = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "launch", *sets, "--dir", str(work), "--out",
         str(tmp_path / "runs"), "--json", "-q", "--log-json", str(log),
         "--die-after", "share_keys:1", "--die-after", "masked_input:1"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["rounds"] == 2
    for i in (0, 1):  # the two really died by SIGKILL, mid-round
        assert "killing myself in round 1" in (work / "logs" / f"device-{i:04d}.log").read_text()
    closed = [json.loads(line) for line in log.read_text().splitlines()
              if '"secure_round_closed"' in line]
    first = next(e for e in closed if e["round"] == 1 and e["commit"])
    included = first["included"]
    assert "device-0000" not in included and "device-0001" in included
    assert first["roster"] == 6 and len(included) >= 3

    cfg = load_config(None, overrides)
    data = load_data(cfg)
    x, y = data.train.x, data.train.y
    initial = FlatModule(build_model("logreg", int(np.prod(x.shape[1:])),
                                     data.train.num_classes, cfg.seed)).get()
    local = LocalTrainConfig(epochs=cfg["client"]["epochs"],
                             batch_size=cfg["client"]["batch_size"], lr=cfg["client"]["lr"])
    s = cfg["secure_aggregation"]

    def update(i: int):
        idx = data.client_indices[i]
        res = fmnist_train_fn("logreg", x[idx], y[idx], local, cfg.seed, i,
                              num_classes=data.train.num_classes)(initial, {}, 1)
        return np.clip(res.delta, -s["clip"], s["clip"]), min(res.num_examples, s["max_weight"])

    def mean(devices):
        rows = [update(int(d.split("-")[1])) for d in devices]
        w = np.array([r[1] for r in rows], float)
        return (w @ np.stack([r[0] for r in rows])) / w.sum()

    with ModelStore(work / "models", readonly=True) as store:
        v1 = next(v for v in store.list() if v.round == 1)
        got = store.load(v1.id).state.params - initial
    step = 2 * s["clip"] / (2 ** s["value_bits"] - 1)
    np.testing.assert_allclose(got, mean(included), atol=2 * step + 1e-5, rtol=0)
    # the check can tell: with the killed device's update the mean is clearly different
    assert np.abs(got - mean(included + ["device-0000"])).max() > 1e-3


def _maps_torch(pid: int) -> bool:
    """Whether the process has PyTorch's library mapped."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_the_model_process_keeps_pytorch_out_and_commits_the_same_run(tmp_path):
    # deploy.model_process: the serving process maps no PyTorch, a child of it does; the run
    # (model, central evaluation) is the one the single process gives
    config = ("rounds = 2\n" + THREE + "[deploy]\nover_selection = 1.0\nmin_fraction = 1.0\n"
              "checkin_interval_s = 0.3\ndeadline_s = 30.0\n")
    summaries = {}
    for split in (False, True):
        root = tmp_path / str(split)
        work = root / "work"
        work.mkdir(parents=True)
        server, clients, _, _ = _serve_with_clients(
            root, work, config + f"model_process = {str(split).lower()}\n")
        try:
            children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text()
            assert _maps_torch(server.pid) is not split
            assert any(_maps_torch(int(c)) for c in children.split()) is split
            assert server.wait(timeout=120) == 0, (root / "serve1.log").read_text()
        finally:
            stop_processes(clients + [server])
        summaries[split] = json.loads((root / "serve1.log").read_text().strip()
                                      .splitlines()[-1])
    for key in ("rounds", "final_accuracy", "final_loss", "client_updates"):
        assert summaries[True][key] == summaries[False][key], key
