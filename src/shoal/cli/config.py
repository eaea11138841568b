"""``shoal config``: print the resolved configuration as commented TOML, or the reference.

Both are generated from the typed sections in :mod:`shoal.config`, so they cannot drift from
what loading accepts.
"""

from __future__ import annotations

import argparse
import sys

from shoal.cli.options import add_run_options, config_from_args
from shoal.config import config_markdown, to_toml


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config", help="print the resolved configuration as TOML",
        description="Print the configuration a run would use (defaults, a file, and "
                    "overrides merged and validated) as TOML, each key under a comment "
                    "giving its meaning and allowed values, or the option reference.")
    add_run_options(p)
    p.add_argument("--markdown", action="store_true",
                   help="print the option reference (docs/configuration.md) instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(config_markdown())
        return 0
    sys.stdout.write(to_toml(config_from_args(args), docs=True))
    return 0
