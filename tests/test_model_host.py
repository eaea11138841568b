"""ModelHost: the aggregator's model, data and PyTorch in a process of their own.

The oracle is the in-process Experiment the simulator builds from the same config: the
same parameter layout, the same initial parameters and the same central evaluation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from shoal.config import load_config
from shoal.errors import ConfigError, DataError, ShoalError, SpecError
from shoal.experiment import Experiment
from shoal.model_host import ModelHost


@pytest.fixture(scope="module")
def host():
    with ModelHost(load_config(None), threads=1) as h:
        yield h


def test_the_hosted_model_is_the_one_the_simulator_builds(host):
    local = Experiment(load_config(None))
    assert host.spec == local.spec and host.spec.size == 199_210
    np.testing.assert_array_equal(host.initial_params, local.initial_params)
    params = local.initial_params + np.float32(0.01)
    assert host.evaluate(params) == local.evaluate(params)


def test_a_bad_vector_is_refused_and_the_host_still_answers(host):
    with pytest.raises(SpecError):
        host.evaluate(np.zeros(10, np.float32))
    assert set(host.evaluate(host.initial_params)) >= {"accuracy", "loss"}


def test_the_childs_set_up_errors_are_raised_here_with_their_fields(tmp_path):
    with pytest.raises(DataError) as info:
        ModelHost(load_config(None, {"data.path": str(tmp_path / "nowhere")}))
    assert "nowhere" in str(info.value) and "nowhere" in str(info.value.path)


def test_an_error_that_is_not_shoals_comes_back_named_and_the_host_answers_on(host):
    with pytest.raises(ShoalError, match="the model process failed: ValueError"):
        host.evaluate(np.array(["x"] * host.spec.size))
    assert set(host.evaluate(host.initial_params)) >= {"accuracy", "loss"}


def test_the_layout_alone_needs_no_data_and_the_child_exits(tmp_path, host):
    # what a cluster's ingest node asks: Fashion-MNIST's shapes are known without its files
    layout = ModelHost(load_config(None, {"data.path": str(tmp_path / "nowhere")}),
                       evaluates=False)
    assert layout.spec == host.spec
    np.testing.assert_array_equal(layout.initial_params, host.initial_params)
    assert layout.exitcode == 0


def test_a_closed_host_says_so():
    h = ModelHost(load_config(None))
    h.close()
    h.close()  # idempotent
    with pytest.raises(ShoalError, match="gone"):
        h.evaluate(h.initial_params)


def test_an_experiment_with_a_hosted_model_needs_a_carrier(host):
    with pytest.raises(ConfigError, match="carrier"):
        Experiment(load_config(None), model=host)


def test_importing_the_aggregator_does_not_import_pytorch():
    # PyTorch is loaded where the model is built: in the serving process only without
    # deploy.model_process (test_deploy checks both at run time)
    code = ("import sys, shoal.deploy, shoal.cli.serve; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
