"""The root of a run's configuration: :class:`Config`, its cross-section checks, and loading.

A config is built from the defaults, then a TOML file, then dotted overrides (``--set``); each
step is validated, and the checks that involve several sections run whenever a
:class:`Config` is made, whichever way.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shoal.config.schema import Option, Section, option, options_of, section, sections_of
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
from shoal.config.protection import (
    AttackConfig,
    PrivacyConfig,
    RobustConfig,
    SecureAggregationConfig,
)
from shoal.config.operations import (
    CanaryConfig,
    DashboardConfig,
    DeployConfig,
    GossipConfig,
    HierarchyConfig,
    OutputConfig,
    TracingConfig,
)
from shoal.errors import ConfigError

__all__ = ["SCHEMA", "Config", "parse_config", "load_config"]


def _table(cls: type[Section]) -> Any:
    return dataclasses.field(default_factory=cls)


@section("")
class Config(Section):
    """A validated run configuration: the top-level keys, then one typed section per table.

    Read it as typed attributes (``cfg.client.lr``, ``cfg.seed``) or as the nested mapping
    of the TOML file (``cfg["client"]["lr"]``, ``cfg.get("client.lr")``). It is frozen:
    :meth:`with_overrides` and :func:`dataclasses.replace` return a new, re-validated config.

    Raises:
        ConfigError: on construction, a value breaks its bound or the sections do not fit
            together (e.g. ``sampling.per_round`` above ``data.clients``).
    """

    seed: int = option(0, "run seed: model initialisation, client sampling and local batch "
                       "order all derive from it", min=0)
    rounds: int = option(30, "number of federated rounds", min=1, max=1_000_000)
    data: DataConfig = _table(DataConfig)
    model: ModelConfig = _table(ModelConfig)
    client: ClientConfig = _table(ClientConfig)
    strategy: StrategyConfig = _table(StrategyConfig)
    sampling: SamplingConfig = _table(SamplingConfig)
    round: RoundConfig = _table(RoundConfig)
    compression: CompressionConfig = _table(CompressionConfig)
    secure_aggregation: SecureAggregationConfig = _table(SecureAggregationConfig)
    privacy: PrivacyConfig = _table(PrivacyConfig)
    eval: EvalConfig = _table(EvalConfig)
    sim: SimConfig = _table(SimConfig)
    deploy: DeployConfig = _table(DeployConfig)
    output: OutputConfig = _table(OutputConfig)
    dashboard: DashboardConfig = _table(DashboardConfig)
    tracing: TracingConfig = _table(TracingConfig)
    canary: CanaryConfig = _table(CanaryConfig)
    robust: RobustConfig = _table(RobustConfig)
    attack: AttackConfig = _table(AttackConfig)
    gossip: GossipConfig = _table(GossipConfig)
    hierarchy: HierarchyConfig = _table(HierarchyConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_consistency(self)


#: section -> key -> :class:`Option`, the top level as section "" (a view of the dataclasses)
SCHEMA: dict[str, dict[str, Option]] = {
    "": dict(options_of(Config)),
    **{name: dict(options_of(cls)) for name, cls in sections_of(Config).items()},
}


def _check_consistency(cfg: Config) -> None:
    clients = cfg.data.clients
    if cfg.sampling.method == "uniform" and cfg.sampling.per_round > clients:
        raise ConfigError(f"sampling.per_round = {cfg.sampling.per_round} is not allowed: "
                          f"it must be <= data.clients ({clients})", key="sampling.per_round")
    if cfg.model.name == "cnn" and cfg.data.dataset != "fashion-mnist":
        raise ConfigError("model.name = 'cnn' needs 28x28 images: use it with "
                          "data.dataset = 'fashion-mnist'", key="model.name")
    p = cfg.privacy
    if p.placement != "none" and cfg.sampling.method == "uniform" and p.accountant == "pld":
        raise ConfigError("privacy.accountant = 'pld' cannot account for fixed-size "
                          "(sampling.method = 'uniform') sampling; use sampling.method = "
                          "'poisson' or privacy.accountant = 'rdp'", key="privacy.accountant")
    if p.adaptive_clipping and p.placement != "central":
        raise ConfigError("privacy.adaptive_clipping needs privacy.placement = 'central'",
                          key="privacy.adaptive_clipping")
    if cfg.secure_aggregation.enabled:
        if p.placement == "local":
            raise ConfigError("secure_aggregation.enabled cannot be combined with "
                              "privacy.placement = 'local': use 'central' (clip before the "
                              "secure sum, noise after it)", key="secure_aggregation.enabled")
        if cfg.compression.upload.strip() not in ("", "none"):
            raise ConfigError("secure_aggregation.enabled cannot be combined with "
                              "compression.upload: masked vectors are uniformly random and "
                              "do not compress; set secure_aggregation.value_bits instead",
                              key="compression.upload")
    from shoal.codec import Chain  # the codec package is heavier than the config

    Chain.parse(cfg.compression.upload, key="compression.upload")


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Validate a nested mapping (as read from TOML) and fill in defaults.

    Raises:
        ConfigError: an unknown section or key (with the closest existing one), a wrong
            type, a value out of range, or an inconsistent combination; the message names
            the key and what is allowed.
    """
    return Config.from_mapping(raw)


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
                ) -> Config:
    """Read a TOML config (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: the file is missing, is not valid TOML, or fails validation.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    return Config.from_mapping(raw, overrides)
