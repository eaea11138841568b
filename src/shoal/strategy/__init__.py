"""Aggregation strategies: pure server-side rules, state in and state out.

A :class:`Strategy` (a server optimizer) turns a :class:`ServerState` and one mean delta -- what
the aggregation pipeline made of a round's or a server step's updates -- into the next state;
the coordinator owns the round loop. Build one by name with
:func:`make_strategy` (what a config file does) or directly from its class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from shoal.errors import ConfigError
from shoal.strategy.fedavg import FedAvg, FedProx, Strategy
from shoal.strategy.state import ServerState
from shoal.strategy.fedopt import FedAdagrad, FedAdam, FedYogi

__all__ = [
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "ServerState",
    "STRATEGIES",
    "Strategy",
    "make_strategy",
]

#: Registry name -> strategy class, for configuration files and the CLI.
STRATEGIES: Mapping[str, type] = MappingProxyType(
    {cls.name: cls for cls in (FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad)}
)


def make_strategy(name: str, **kwargs: float) -> Strategy:
    """Build the strategy registered as ``name`` with hyper-parameters ``kwargs``.

    Example: ``make_strategy("fedadam", server_lr=0.01, tau=1e-3)``.

    Raises:
        ConfigError: ``name`` is not one of :data:`STRATEGIES` (the message lists them), a
            keyword is not a parameter of that strategy or a required one is missing (the
            message lists the accepted ones), or a value is out of range.
    """
    cls = STRATEGIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(
            f"unknown strategy {name!r}; allowed: {', '.join(sorted(STRATEGIES))}",
            key="strategy.name",
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    accepted = ", ".join(fields)
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ConfigError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; accepted: {accepted}",
            key=f"strategy.{unknown[0]}",
        )
    required = [
        f.name
        for f in fields.values()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [key for key in required if key not in kwargs]
    if missing:
        raise ConfigError(
            f"{name}: missing required parameter(s) {', '.join(missing)}; accepted: {accepted}",
            key=f"strategy.{missing[0]}",
        )
    strategy: Strategy = cls(**kwargs)
    return strategy
