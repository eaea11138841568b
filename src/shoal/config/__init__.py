"""Run configuration: one TOML file, read into typed, frozen sections that also write the docs.

Every key is a field of a frozen dataclass, one per TOML table (training and simulation in
:mod:`shoal.config.sections`, secure aggregation, privacy, robustness and attacks in
:mod:`shoal.config.protection`, deployment, operations and topology in
:mod:`shoal.config.operations`; the top-level keys and the tables themselves are
:class:`Config`), declared with its type, default, allowed range and a one-line doc.
Loading rejects unknown keys (suggesting the closest existing one) and out-of-range values
with a message naming the key and the bound.
``shoal config`` and ``docs/configuration.md`` are generated from the same fields (a test keeps
the page in sync), so they list exactly the options that exist.

A :class:`Config` reads both ways: typed attributes (``cfg.round.buffer_size``, ``cfg.seed``)
and the nested mapping of the TOML file (``cfg["round"]["buffer_size"]``,
``cfg.get("round.buffer_size")``).

With no file, the defaults are the reference workload "config S": Fashion-MNIST,
100 clients, Dirichlet(0.5) partition with seed 0, 10 clients per round, 30 rounds, the 2NN,
1 local epoch, batch 32, SGD lr 0.05, FedAvg.
"""

from __future__ import annotations

from shoal.config.render import config_markdown, to_toml
from shoal.config.root import SCHEMA, Config, load_config, parse_config
from shoal.config.schema import Option, Section
from shoal.config.operations import DeployConfig, OutputConfig
from shoal.config.protection import PrivacyConfig, SecureAggregationConfig
from shoal.config.sections import (
    ClientConfig,
    CompressionConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RoundConfig,
    SamplingConfig,
    SimConfig,
    StrategyConfig,
)

__all__ = [
    "Config", "load_config", "parse_config", "to_toml", "config_markdown", "SCHEMA", "Option",
    "Section", "DataConfig", "ModelConfig", "ClientConfig", "StrategyConfig", "SamplingConfig",
    "RoundConfig", "CompressionConfig", "SecureAggregationConfig", "PrivacyConfig",
    "EvalConfig", "SimConfig", "DeployConfig", "OutputConfig",
]
