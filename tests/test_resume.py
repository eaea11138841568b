"""A run resumed from its checkpoint continues exactly as if it had never stopped."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shoal.cli import main
from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.experiment import Experiment
from shoal.store import load_checkpoint, save_checkpoint

SYNTH = {"data.dataset": "synthetic", "data.clients": 30, "model.name": "logreg",
         "sampling.per_round": 8, "client.batch_size": 10}


@pytest.mark.parametrize("extra", [{}, {"strategy.name": "fedadam", "strategy.server_lr": 0.05},
                                   {"privacy.placement": "central", "sampling.method": "poisson",
                                    "sampling.q": 0.3, "privacy.adaptive_clipping": True,
                                    "privacy.count_noise_std": 2.0}])
def test_resumed_run_equals_uninterrupted_run(tmp_path, extra):
    straight = Experiment(load_config(None, {**SYNTH, **extra, "rounds": 6})).run()
    first = Experiment(load_config(None, {**SYNTH, **extra, "rounds": 3}))
    half = first.run()
    save_checkpoint(tmp_path / "m.npz", first.checkpoint(half.state))
    second = Experiment(load_config(None, {**SYNTH, **extra, "rounds": 6}))
    state = second.restore(load_checkpoint(tmp_path / "m.npz"))
    rest = second.run(state=state)
    np.testing.assert_array_equal(rest.state.params, straight.state.params)
    assert [r.round for r in rest.records] == [4, 5, 6]
    for a, b in zip(rest.records, straight.records[4:]):
        assert a.eval == b.eval and a.privacy == b.privacy  # epsilon keeps counting


def test_resume_refuses_a_different_seed_or_model(tmp_path):
    exp = Experiment(load_config(None, {**SYNTH, "rounds": 1}))
    save_checkpoint(tmp_path / "m.npz", exp.checkpoint(exp.run().state))
    ckpt = load_checkpoint(tmp_path / "m.npz")
    with pytest.raises(ConfigError, match="seed"):
        Experiment(load_config(None, {**SYNTH, "seed": 1})).restore(ckpt)
    with pytest.raises(ConfigError, match="model"):
        Experiment(load_config(None, {**SYNTH, "model.name": "mlp2nn"})).restore(ckpt)


def test_cli_resume_extends_a_finished_run(tmp_path, capsys):
    args = ["run", "--set", "data.dataset=\"synthetic\"", "--clients", "30",
            "--set", "model.name=\"logreg\"", "--per-round", "8", "--out", str(tmp_path),
            "--json", "-q"]
    assert main(args + ["--rounds", "2", "--set", "output.name=\"a\""]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "a" / "model.npz"), "--rounds", "4",
                 "--set", "output.name=\"b\"", "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rounds"] == 4
    assert main(args + ["--rounds", "4", "--set", "output.name=\"c\""]) == 0
    straight = json.loads(capsys.readouterr().out)
    assert summary["final_accuracy"] == straight["final_accuracy"]
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "b" / "model.npz").state.params,
                                  load_checkpoint(tmp_path / "c" / "model.npz").state.params)
