"""The ``shoal`` command.

``main(argv)`` returns an exit code instead of exiting, so tests run the CLI in process.
Exit codes: 0 success, 2 a usage or configuration error (the message says what to change),
1 any other shoal error.

One module per subcommand, each with ``add_parser(subparsers)`` and ``run(args)``; the
options the training commands share are in ``options.py``, what they print and write in
``report.py``. Heavy imports (torch, grpc, the simulator, the deployment) stay inside the
``run`` functions, so ``shoal --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shoal.cli import (certs, client, config, dashboard, gossip, html_report, keys, launch,
                       models, privacy, run, serve, tokens, traces)
from shoal.errors import BudgetExhausted, ConfigError, DataError, ShoalError

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
shoal: federated learning at very large scale.

Train one model from the private data of many clients without moving the data. `shoal run`
simulates a federated training run in this process (virtual clients over a shared dataset);
with no config file it runs the reference workload "config S": Fashion-MNIST split among 100
clients by a Dirichlet(0.5) label skew, 10 clients per round, 30 rounds of FedAvg on a
784-200-200-10 MLP. `shoal launch` runs the same round engine as a real deployment on this
machine (a gRPC aggregator and one process per device, TLS on loopback); `shoal serve` and
`shoal client` run the two sides separately. `shoal gossip` trains with no server at all:
peers that average with their neighbours (simulated, or deployed with `shoal launch --gossip`).
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``shoal`` parser with every subcommand, in the order ``shoal --help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="shoal", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `shoal COMMAND --help` for a command's options. Docs: docs/ in the "
               "source tree; every config option: docs/configuration.md.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser in (run.add_parser, traces.add_parser, privacy.add_parser, serve.add_parser,
                       client.add_parser, launch.add_parser, models.add_parser,
                       tokens.add_revoke_parser, certs.add_parser, keys.add_parser,
                       tokens.add_enroll_parser,
                       config.add_parser, dashboard.add_parser, html_report.add_parser,
                       gossip.add_parser):
        add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shoal`` command line; returns the process exit code."""
    import logging

    # dp-accounting logs a warning for every RDP order it skips; it is not actionable.
    logging.getLogger("absl").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"shoal: configuration error: {exc}", file=sys.stderr)
        return 2
    except BudgetExhausted as exc:
        print(f"shoal: privacy budget: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"shoal: data error: {exc}", file=sys.stderr)
        return 1
    except ShoalError as exc:
        print(f"shoal: error: {exc}", file=sys.stderr)
        return 1
