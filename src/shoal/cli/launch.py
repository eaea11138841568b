"""``shoal launch``: an aggregator and one client process per client, TLS on loopback."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from shoal.cli.client import SECAGG_STAGES, parse_attributes
from shoal.cli.dashboard import Operations
from shoal.cli.launch_canary import add_canary_options, canary_overrides
from shoal.cli.options import add_run_options, overrides_from_args
from shoal.config import load_config
from shoal.cli.report import banner, report
from shoal.telemetry import ProgressBar
from shoal.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch", help="deploy on this machine: an aggregator and N client processes over "
                       "TLS on loopback",
        description="Start an aggregator and one client process per client of the config "
                    "(real processes, real sockets, TLS on), run to the end and report like "
                    "`shoal run`. With deploy.over_selection = 1 and deploy.min_fraction = 1 "
                    "the devices train exactly the clients and batches `shoal run` would.",
        epilog="examples:\n  shoal launch --clients 20 --rounds 10 --per-round 10 "
               "--set deploy.over_selection=1.0\n"
               "  shoal launch --clients 20 --dir run1 --canary 4 --canary-fraction 0.2 "
               "--keys keys   (a canary of model version 4 against production in "
               "run1/models)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.add_argument("--dir", help="state directory (default: a new temporary one)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only errors (and the summary with --json)")
    p.add_argument("--log-json", dest="log_json", metavar="FILE",
                   help="append the aggregator's structured log (JSON lines) to FILE")
    p.add_argument("--dashboard", metavar="HOST:PORT",
                   help="where to serve the web dashboard (default: dashboard.address, or "
                        "127.0.0.1 on any free port); the URL is printed")
    p.add_argument("--no-dashboard", dest="no_dashboard", action="store_true",
                   help="serve no dashboard")
    p.add_argument("--mtls", action="store_true",
                   help="mutual TLS: every client process presents its own client "
                        "certificate (common name = its device id), as silos would")
    p.add_argument("--attr", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="give the client processes an attribute, its values dealt round-"
                        "robin (device-0000 gets V1, device-0001 V2, ...), so that "
                        "sampling.selection = 'stratified' has strata to draw from: e.g. "
                        "--attr os=android,ios,linux; repeatable")
    p.add_argument("--die-after", dest="die_after", action="append", default=[],
                   metavar="STAGE:N",
                   help="fault injection (repeatable): the next N client processes, "
                        "from device-0000 on, kill themselves (SIGKILL) right after "
                        "STAGE of their first secure-aggregation round; STAGE is one of "
                        + ", ".join(SECAGG_STAGES))
    p.add_argument("--gossip", type=int, metavar="N",
                   help="peer-to-peer instead: N gossip peers and no aggregator, each a "
                        "process with mutual TLS and its neighbours' addresses (the [gossip] "
                        "config; docs/gossip.md)")
    p.add_argument("--edges", type=int, metavar="E",
                   help="hierarchical: E edge aggregator processes between the devices and "
                        "the global aggregator, TLS between every tier (docs/hierarchy.md)")
    p.add_argument("--ingest", type=int, metavar="N",
                   help="the aggregator cluster: N ingest processes and a committer sharing "
                        "the registry and the round state through Redis (needs --redis; "
                        "docs/scaling.md)")
    p.add_argument("--redis", nargs="?", const="start", metavar="URL",
                   help="with --ingest: the Redis to use (redis://HOST:PORT/0); alone, start "
                        "a redis-server on a free loopback port for the run")
    add_canary_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    modes = [f"--{m}" for m in ("gossip", "edges", "ingest") if getattr(args, m) is not None]
    if args.keys and modes:
        raise ConfigError(f"--keys signs the aggregator's models; {modes[0]} does not sign "
                          f"yet (docs/lifecycle.md)", key="keys")
    if args.gossip is not None:
        from shoal.cli.gossip import launch_peers

        return launch_peers(args)
    if args.edges is not None:
        from shoal.cli.edges import launch_edges

        return launch_edges(args)
    if args.ingest is not None:
        from shoal.cli.cluster import launch_cluster

        return launch_cluster(args)
    import datetime as dt
    import os
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    from shoal.config import to_toml
    from shoal.deploy import AggregatorPaths, check_deployable, run_aggregator
    from shoal.store.atomic import replace_atomically
    from shoal.transport.auth import load_or_create_secret
    from shoal.transport.tokens import issue_token
    from shoal.transport.certs import make_client_cert, make_local_pki

    # the canary flags override [canary] (given without --canary they are only checked)
    cfg = load_config(args.config, overrides_from_args(args) | canary_overrides(args))
    if args.canary is not None and not args.dir:
        raise ConfigError("--canary needs --dir: the state directory whose model store holds "
                          "production and the candidate", key="dir")
    deaths = _parse_die_after(args.die_after, cfg["data"]["clients"])
    attrs = _deal_attributes(args.attr, cfg["data"]["clients"])
    check_deployable(cfg, tls=True, mutual_tls=args.mtls)  # before writing certs and tokens
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="shoal-launch-"))
    work.mkdir(parents=True, exist_ok=True)
    n = cfg["data"]["clients"]
    cfg_path = work / "config.toml"
    cfg_path.write_text(to_toml(cfg))
    pki = make_local_pki(work / "certs", days=2, now=dt.datetime.now(dt.timezone.utc),
                         overwrite=True)
    secret = load_or_create_secret(work / "secret")
    tokens = work / "tokens"
    tokens.mkdir(exist_ok=True)
    for i in range(n):
        replace_atomically(tokens / f"device-{i:04d}", issue_token(
            secret, f"device-{i:04d}", now=time.time(),
            ttl_seconds=2 * 86400).encode(), mode=0o600)
    client_certs = [make_client_cert(work / "certs", name=f"device-{i:04d}",
                                     ca_cert=pki.ca_cert, ca_key=pki.ca_key, days=2,
                                     now=dt.datetime.now(dt.timezone.utc), overwrite=True)
                    for i in range(n)] if args.mtls else []
    paths = AggregatorPaths(secret=work / "secret", registry=work / "registry.db",
                            store=work / "models", tls_dir=work / "certs",
                            port_file=work / "port",
                            client_ca=pki.ca_cert if args.mtls else None,
                            revoked=work / "revoked.json",
                            keys=Path(args.keys) if args.keys else None)
    security = "mutual TLS" if args.mtls else "TLS"
    banner(cfg, args, f" launch ({n} client processes, {security} on loopback, state in "
                      f"{work})")
    procs: list[subprocess.Popen] = []
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    extra: list[str] = []
    if args.canary is not None:
        from shoal.cli.launch_canary import client_args, operator_keys

        keys = operator_keys(args, work)
        extra = client_args(cfg, keys)
    elif args.keys:  # training signed end to end: every device verifies what it trains on
        extra = ["--trusted-key", str(Path(args.keys) / "operator.pub")]

    def start_clients(port: int) -> None:
        for i in range(n):
            cmd = [sys.executable, "-m", "shoal.cli", "client", str(cfg_path), "--server",
                   f"localhost:{port}", "--token", str(tokens / f"device-{i:04d}"),
                   "--ca", str(pki.ca_cert), "--index", str(i)]
            if client_certs:
                cmd += ["--cert", str(client_certs[i].cert), "--key", str(client_certs[i].key)]
            if i < len(deaths):
                cmd += ["--die-after", deaths[i]]
            for pair in attrs[i]:
                cmd += ["--attr", pair]
            cmd += extra
            with open(logs / f"device-{i:04d}.log", "w") as log_file:
                procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                              env=env))

    if args.log_json:
        from shoal.telemetry import configure_json_logging

        configure_json_logging(open(args.log_json, "a", buffering=1))
    if args.canary is not None:
        from shoal.cli.launch_canary import run_canary_phase

        try:
            summary = run_canary_phase(cfg, args, paths, keys, start_clients)
        finally:
            stop_processes(procs)
        summary |= {"client_processes": n, "work_dir": str(work)}
        if args.json:
            print(json.dumps(summary))
        elif not args.quiet:
            print(f"canary of v{summary['canary']['candidate']}: {summary['decision']} -- "
                  f"{summary['reason']}\naudit log: {summary['audit']}")
        return 0
    progress = ProgressBar(cfg.rounds, quiet=args.quiet)
    asked = args.dashboard or cfg["dashboard"]["address"]
    with Operations(cfg, work, paths.registry, quiet=args.quiet,
                    log_events=bool(args.log_json), optional=not asked,
                    address="" if args.no_dashboard else asked or "127.0.0.1:0") as ops:
        try:
            exp, result = run_aggregator(cfg, paths, on_round=progress.version_evaluated,
                                         on_ready=start_clients, observers=ops.observers,
                                         on_store=ops.on_store)
        finally:
            progress.close()
            stop_processes(procs)
    return report(cfg, args, exp, result, {"client_processes": n, "work_dir": str(work)})


def stop_processes(procs: Sequence) -> None:
    """Terminate the device processes (SIGTERM: each prints its counters and exits), killing
    any still running after 10 s."""
    import subprocess

    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def _deal_attributes(specs: Sequence[str], clients: int) -> list[list[str]]:
    """``["os=android,ios"]`` -> each client's ``KEY=VALUE`` pairs, values round-robin:
    ``[["os=android"], ["os=ios"], ["os=android"], ...]`` (checked like ``shoal client``
    checks them, before anything is written)."""
    dealt: list[list[str]] = [[] for _ in range(clients)]
    for spec in specs:
        name, eq, values = spec.partition("=")
        if not eq or not values:
            raise ConfigError(f"--attr {spec!r}: expected KEY=V1,V2,..., e.g. "
                              f"os=android,ios", key="attr")
        choices = values.split(",")
        for i, pairs in enumerate(dealt):
            pairs.append(f"{name}={choices[i % len(choices)]}")
    for pairs in dealt:
        parse_attributes(pairs)  # the same refusals as the client processes would make
    return dealt


def _parse_die_after(specs: Sequence[str], clients: int) -> list[str]:
    """``["share_keys:2", "masked_input:1"]`` -> the stage for client 0, 1, 2, ..."""
    out: list[str] = []
    for spec in specs:
        stage, _, count = spec.partition(":")
        if stage not in SECAGG_STAGES or not count.isdigit():
            raise ConfigError(f"--die-after {spec!r}: expected STAGE:N with STAGE one of "
                              f"{', '.join(SECAGG_STAGES)}", key="die_after")
        out += [stage] * int(count)
    if len(out) > clients:
        raise ConfigError(f"--die-after asks {len(out)} client processes to die; there are "
                          f"{clients}", key="die_after")
    return out
