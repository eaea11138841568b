"""shoal: federated learning at very large scale.

One round engine (:class:`Coordinator`) drives clients through a :class:`ClientPool`: virtual
clients in this process for simulation (:class:`~shoal.sim.pool.InProcessPool`), and later
devices over gRPC, Ray actors or edge aggregators. Updates travel and aggregate as flat
float32 vectors described by a :class:`ParamSpec`.

Names are imported lazily, so ``import shoal.config`` (and ``shoal --help``) does not pay for
importing PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "shoal.config": ("Config", "load_config"),
    "shoal.coordinator": ("ClientPool", "ClientUpdate", "Coordinator", "RoundRecord",
                          "TrainTask", "UniformSampler", "UpdateBatch"),
    "shoal.errors": ("BudgetExhausted", "CodecError", "ConfigError", "DataError",
                     "PrivacyError", "ProtocolError", "ShoalError", "SpecError",
                     "UpdateRejected"),
    "shoal.params": ("ParamSpec", "flatten", "unflatten"),
    "shoal.strategy": ("ServerState", "Strategy", "WeightedMean", "make_strategy"),
    "shoal.training": ("LocalTrainConfig", "evaluate", "train_local"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'shoal' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
