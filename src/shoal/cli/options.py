"""The config options every training command shares: a TOML file, flags and ``--set``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shoal.config import Config, load_config
from shoal.errors import ConfigError

if TYPE_CHECKING:
    from shoal.data import FederatedData


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The config file argument, the shortcut flags and ``--set``."""
    p.add_argument("config", nargs="?", help="TOML config file (default: config S)")
    p.add_argument("--rounds", type=int, help="number of rounds (config key: rounds)")
    p.add_argument("--clients", type=int, help="number of clients (data.clients)")
    p.add_argument("--per-round", type=int, dest="per_round",
                   help="clients sampled per round (sampling.per_round)")
    p.add_argument("--seed", type=int, help="run seed (seed)")
    p.add_argument("--out", help="parent directory of run directories (output.dir)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key, e.g. --set client.lr=0.1 (repeatable)")


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as TOML scalars (``0.1``, ``true``, ``"x"``),
    bare words as strings."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out[key.strip()] = value
    return out


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` pairs plus the shortcut flags, as dotted config keys."""
    overrides = parse_set(args.set or [])
    for flag, key in (("rounds", "rounds"), ("clients", "data.clients"),
                      ("per_round", "sampling.per_round"), ("seed", "seed"),
                      ("out", "output.dir")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return overrides


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config: defaults, then the file, then the overrides."""
    return load_config(args.config, overrides_from_args(args))


def partition_of(cfg: Config, command: str) -> FederatedData:
    """The config's data split into clients, for a reference device process (``command``,
    named in the error) that trains one client of it.

    Raises:
        ConfigError: ``data.population = "generated"``: its clients are made on demand in
            simulation, there is no fixed partition to train a client of.
    """
    from shoal.build import load_data
    from shoal.data import FederatedData

    data = load_data(cfg)
    if not isinstance(data, FederatedData):
        raise ConfigError(f"{command} trains a client of the config's partition; "
                          "data.population = 'generated' (clients made on demand) is for "
                          "simulation only", key="data.population")
    return data
