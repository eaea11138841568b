"""shoal: federated learning at very large scale.

One round engine, the event-driven sans-I/O :class:`Coordinator`, serves every mode and
carrier: a round policy (:class:`SyncPolicy` or FedBuff's :class:`BufferedPolicy`) decides when
to open, close and commit; an aggregation :class:`Pipeline` validates, clips, sums (plainly or
with secure aggregation) and adds noise; a :class:`Strategy` (the server optimizer) steps the
model to a new version. Carriers turn what happens to clients into events and carry out the
coordinator's commands: :func:`drive` runs it over any :class:`ClientPool` -- virtual clients
in this process for simulation (:class:`Experiment`), or devices behind the gRPC aggregator
(:func:`run_aggregator`; its gateway turns each device call into an event, and
:class:`DeviceClient` is the device's runtime). Both carriers select clients from a registry,
encode updates with the same codecs and record the same rounds. Updates travel and aggregate
as flat float32 vectors described by a :class:`ParamSpec`.

Names are imported lazily, so ``import shoal.config`` (and ``shoal --help``) does not pay for
importing PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "shoal.clock": ("Clock", "SimClock", "WallClock"),
    "shoal.config": ("Config", "load_config"),
    "shoal.coordinator": ("Coordinator",),
    "shoal.deploy": ("run_aggregator",),
    "shoal.events": ("ClientUpdate", "TrainTask", "UpdateBatch"),
    "shoal.experiment": ("Experiment", "RunResult"),
    "shoal.observers": ("Observer",),
    "shoal.pipeline": ("Pipeline", "PlainSum", "Validation"),
    "shoal.policy": ("BufferedPolicy", "SyncPolicy"),
    "shoal.records": ("RoundRecord",),
    "shoal.runner": ("ClientPool", "drive"),
    "shoal.sampling": ("PoissonSampler", "UniformSampler"),
    "shoal.store": ("ModelStore",),
    "shoal.transport.client": ("DeviceClient",),
    "shoal.errors": ("BudgetExhausted", "CodecError", "ConfigError", "DataError",
                     "PrivacyError", "ProtocolError", "ShoalError", "SpecError",
                     "UpdateRejected"),
    "shoal.params": ("ParamSpec", "flatten", "unflatten"),
    "shoal.strategy": ("FedAdagrad", "FedAdam", "FedAvg", "FedProx", "FedYogi", "ServerState",
                       "Strategy", "make_strategy"),
    "shoal.summation": ("WeightedMean",),
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
