"""``shoal config``: print the resolved configuration as TOML, or the option reference."""

from __future__ import annotations

import argparse
import sys

from shoal.cli.options import add_run_options, config_from_args
from shoal.config import config_markdown, to_toml


def add_parser(sub) -> None:
    p = sub.add_parser(
        "config", help="print the resolved configuration as TOML",
        description="Print the configuration a run would use (defaults, a file, and "
                    "overrides merged and validated) as TOML, or the option reference.")
    add_run_options(p)
    p.add_argument("--markdown", action="store_true",
                   help="print the option reference (docs/configuration.md) instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(config_markdown())
        return 0
    sys.stdout.write(to_toml(config_from_args(args)))
    return 0
