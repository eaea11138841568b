"""The public API: ``shoal.__all__`` is curated, every name in it resolves, and importing the
package stays cheap (names load lazily, so ``shoal --help`` does not pay for PyTorch)."""

from __future__ import annotations

import subprocess
import sys

import shoal

PUBLIC = [
    # the engine
    "Coordinator", "SyncPolicy", "BufferedPolicy", "Pipeline", "PlainSum", "Validation",
    "Observer", "Clock", "SimClock", "WallClock", "ClientPool", "drive",
    "ClientUpdate", "TrainTask", "UpdateBatch", "RoundRecord",
    # strategies (server optimizers) and who trains
    "Strategy", "ServerState", "FedAvg", "FedProx", "FedAdam", "FedYogi", "FedAdagrad",
    "make_strategy", "WeightedMean", "UniformSampler", "PoissonSampler",
    # a run: simulation and deployment
    "Config", "load_config", "Experiment", "RunResult", "run_aggregator", "DeviceClient",
    "ModelStore",
    # models as flat vectors, local training
    "ParamSpec", "flatten", "unflatten", "LocalTrainConfig", "train_local", "evaluate",
    # errors
    "ShoalError", "ConfigError", "DataError", "SpecError", "CodecError", "ProtocolError",
    "PrivacyError", "BudgetExhausted", "UpdateRejected",
]


def test_all_is_exactly_the_curated_api():
    assert sorted(shoal.__all__) == sorted(PUBLIC)
    assert len(set(PUBLIC)) == len(PUBLIC)


def test_every_public_name_resolves_to_what_it_says():
    for name in shoal.__all__:
        value = getattr(shoal, name)
        assert getattr(value, "__name__", name) == name, name
    assert set(shoal.__all__) <= set(dir(shoal))
    from shoal.experiment import Experiment
    from shoal.transport.client import DeviceClient

    assert shoal.Experiment is Experiment and shoal.DeviceClient is DeviceClient
    assert issubclass(shoal.UpdateRejected, shoal.ShoalError)


def test_an_unknown_name_is_an_attribute_error():
    try:
        shoal.GrpcClientPool  # noqa: B018  (removed in core v2)
    except AttributeError as exc:
        assert "GrpcClientPool" in str(exc)
    else:
        raise AssertionError("shoal.GrpcClientPool resolved")


def test_importing_shoal_and_its_config_does_not_import_torch_or_grpc():
    code = ("import sys, shoal, shoal.config; "
            "print(sorted(m for m in ('torch', 'grpc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
