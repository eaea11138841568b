"""``shoal serve``: the gRPC aggregator that devices pull tasks from."""

from __future__ import annotations

import argparse
import sys

from shoal.cli.dashboard import Operations
from shoal.cli.options import add_run_options, config_from_args
from shoal.cli.report import banner, report
from shoal.telemetry import ProgressBar


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the aggregator: serve devices over gRPC",
        description="Run the round engine with real devices: a gRPC aggregator (TLS with "
                    "--certs) that devices pull tasks from. Every committed round is written "
                    "to DIR/models, and a restarted aggregator resumes from it.",
        epilog="examples:\n  shoal certs --out certs && shoal enroll device-000 --secret "
               "work/secret --out t0\n  shoal serve my.toml --dir work --certs certs",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.add_argument("--dir", default="aggregator",
                   help="state directory: secret, registry.db, models/, port")
    p.add_argument("--certs", help="directory with server.pem and server.key")
    p.add_argument("--client-ca", dest="client_ca", metavar="PEM",
                   help="mutual TLS (cross-silo): accept only devices with a client "
                        "certificate signed by this CA whose common name is the "
                        "device id (shoal certs --client NAME); needs --certs")
    p.add_argument("--secret", help="token secret file (default DIR/secret)")
    p.add_argument("--keys", metavar="DIR",
                   help="the operator's keys (`shoal keys --out DIR`): sign every training "
                        "download and committed version with DIR/operator.key (devices "
                        "verify with `shoal client --trusted-key DIR/operator.pub`)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--log-json", dest="log_json", metavar="FILE",
                   help="append structured logs (one JSON object per line) to FILE")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only errors (and the summary with --json)")
    p.add_argument("--dashboard", metavar="HOST:PORT",
                   help="serve the web dashboard there, e.g. 127.0.0.1:8080 (config key "
                        "dashboard.address; docs/dashboard.md)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shoal.deploy import AggregatorPaths, run_aggregator

    cfg = config_from_args(args)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    paths = AggregatorPaths(secret=Path(args.secret) if args.secret else work / "secret",
                            registry=work / "registry.db", store=work / "models",
                            tls_dir=Path(args.certs) if args.certs else None,
                            port_file=work / "port",
                            client_ca=Path(args.client_ca) if args.client_ca else None,
                            revoked=work / "revoked.json",
                            keys=Path(args.keys) if args.keys else None)
    if args.log_json:
        from shoal.telemetry import configure_json_logging

        configure_json_logging(open(args.log_json, "a", buffering=1))
    banner(cfg, args, " aggregator")
    progress = ProgressBar(cfg.rounds, quiet=args.quiet)

    security = ("mutual TLS" if paths.client_ca else "TLS" if paths.tls_dir
                else "no TLS, loopback only")

    def ready(port: int) -> None:
        if not args.quiet:
            print(f"aggregator listening on {cfg['deploy']['host']}:{port} ({security}); "
                  f"waiting for devices", file=sys.stderr)

    with Operations(cfg, work, paths.registry, quiet=args.quiet,
                    log_events=bool(args.log_json),
                    address=args.dashboard or cfg["dashboard"]["address"]) as ops:
        try:
            exp, result = run_aggregator(cfg, paths, on_round=progress.version_evaluated,
                                         on_ready=ready, observers=ops.observers,
                                         on_store=ops.on_store)
        finally:
            progress.close()
    return report(cfg, args, exp, result)
