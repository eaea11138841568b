"""``shoal launch --ingest 2 --redis``: a redis-server, two ingest processes, the committer
and six device processes on loopback (TLS); its first version is the one ``shoal run``
computes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("grpc")
pytest.importorskip("redis")


@pytest.mark.slow
def test_shoal_launch_ingest_commits_the_simulated_model(tmp_path, capsys) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs Debian's "
                    "package: apt-get install redis-server)")
    from shoal.cli import main
    from shoal.config import load_config
    from shoal.experiment import Experiment
    from shoal.store import ModelStore

    clients, rounds = 6, 2
    work = tmp_path / "cluster"
    code = main(["launch", "--ingest", "2", "--redis", "--clients", str(clients), "--rounds",
                 str(rounds), "--per-round", str(clients), "--set",
                 "deploy.over_selection=1.0", "--set", "deploy.min_fraction=1.0", "--set",
                 "deploy.checkin_interval_s=1.0", "--json", "-q", "--no-dashboard",
                 "--dir", str(work), "--out", str(tmp_path / "runs")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rounds"] == rounds and summary["client_updates"] == clients * rounds
    assert summary["ingest_processes"] == 2
    store = ModelStore(work / "models")
    first = store.load(store.list()[0].id).state.params
    store.close()
    # round 1: the same uploads as `shoal run` (devices train exactly its clients), the same
    # model up to float32 rounding of the partial means; later rounds' local SGD amplifies
    # such rounding (as with deployed edges), so they are compared by accuracy
    single = [Experiment(load_config(None, {"rounds": r, "data.clients": clients,
                                            "sampling.per_round": clients})).run()
              for r in (1, rounds)]
    assert np.abs(first - single[0].state.params).max() <= 1e-6
    assert abs(summary["final_accuracy"] - single[1].records[-1].eval["accuracy"]) <= 0.01
    partials = [json.loads((work / "logs" / f"ingest-{i}.log").read_text().strip()
                           .splitlines()[-1])["partials"] for i in range(2)]
    assert partials == [rounds, rounds]  # both nodes folded devices every round
