"""The config options every training command shares: a TOML file, flags and ``--set``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from shoal.config import Config, load_config
from shoal.errors import ConfigError


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
