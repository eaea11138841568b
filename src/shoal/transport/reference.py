"""The reference workload on a device: local training and evaluation for `shoal client`.

Separate from :mod:`shoal.transport.client` so the device runtime itself does not need
PyTorch: a device with its own model passes its own train function to ``DeviceClient``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shoal.errors import ProtocolError
from shoal.training import LocalTrainConfig
from shoal.transport.device_api import EvaluateFn, TrainFn, TrainResult

__all__ = ["fmnist_train_fn", "fmnist_evaluate_fn"]


def _settings_overrides(settings: Mapping[str, float]) -> dict[str, float | int]:
    """Server settings arrive as doubles; integer settings must be whole numbers."""
    out: dict[str, float | int] = {}
    for key, value in settings.items():
        if key in ("epochs", "batch_size"):
            if not float(value).is_integer():
                raise ProtocolError(f"setting {key!r} must be a whole number, got {value!r}",
                                    party="aggregator")
            out[key] = int(value)
        else:
            out[key] = float(value)
    return out


def _local_model(model_name: str, x: np.ndarray, y: np.ndarray, seed: int, num_classes: int
                 ) -> tuple[Any, Any, Any]:
    import torch

    from shoal.frameworks.torch import FlatModule
    from shoal.models import build_model

    model = FlatModule(build_model(model_name, int(np.prod(x.shape[1:])), num_classes, seed))
    return (model, torch.from_numpy(np.ascontiguousarray(x)),
            torch.from_numpy(np.ascontiguousarray(y)))


def fmnist_train_fn(model_name: str, x: np.ndarray, y: np.ndarray, local: LocalTrainConfig,
                    seed: int, client_index: int, *, num_classes: int = 10) -> TrainFn:
    """The reference workload's local training on this device's own examples.

    Trains with :func:`shoal.training.train_local` from the downloaded model, with the stream
    ``shoal.seeds.generator(seed, "train", round, client_index)`` — the one the simulator gives
    client ``client_index`` in that round — so a deployment trains exactly as the simulation
    would. A task's settings override ``local`` (:meth:`LocalTrainConfig.with_overrides`).

    Args:
        model_name: a :data:`shoal.models.MODELS` name (e.g. ``"mlp2nn"``).
        x, y: this device's examples (float32 features) and int64 labels.
        local: the local training settings.
        seed: the run seed; client_index: this device's client id in the run.

    The returned function raises ConfigError or ProtocolError for unknown or malformed
    settings and SpecError for a model of the wrong length.
    """
    from shoal import seeds
    from shoal.training import train_local

    model, xt, yt = _local_model(model_name, x, y, seed, num_classes)

    def train(params: np.ndarray, settings: Mapping[str, float], round: int) -> TrainResult:
        config = local.with_overrides(_settings_overrides(settings))
        res = train_local(model, params, xt, yt, config,
                          seeds.generator(seed, "train", round, client_index))
        return TrainResult(res.delta, res.num_examples, dict(res.metrics))

    return train


def fmnist_evaluate_fn(model_name: str, x: np.ndarray, y: np.ndarray, *, seed: int = 0,
                       num_classes: int = 10) -> EvaluateFn:
    """Evaluation of a downloaded model on this device's examples
    (:func:`shoal.training.evaluate`: mean cross-entropy and accuracy)."""
    from shoal.training import evaluate

    model, xt, yt = _local_model(model_name, x, y, seed, num_classes)

    def run(params: np.ndarray) -> tuple[int, dict[str, float]]:
        return int(yt.shape[0]), evaluate(model, params, xt, yt)

    return run
