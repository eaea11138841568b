"""``shoal launch --edges E``: a global aggregator, E edge aggregator processes and the
devices, TLS on loopback between every tier (docs/hierarchy.md).

The global aggregator runs in this process (:func:`~shoal.deploy.run_aggregator`, with the
E edges as its devices: every edge every round). Each edge is a process
(``python -m shoal.cli.edges``, :func:`edge_main`): an aggregator for its devices
(:func:`~shoal.hierarchy.deployed.run_edge`) and one device of the global; it starts its own
device processes (``shoal client``), which the ring (``hierarchy.load_factor``,
``hierarchy.vnodes``) assigned to it. The edge's rounds follow ``deploy.deadline_s`` and
``deploy.min_fraction``; ``hierarchy.edge_rounds`` > 1 is HierFAVG.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from shoal.errors import ConfigError

__all__ = ["launch_edges", "edge_main"]


def _check(cfg, edges: int) -> None:
    """Refuse what deployed edges cannot run yet (before anything is written)."""
    if not 1 <= edges <= cfg["data"]["clients"]:
        raise ConfigError(f"--edges must be in 1..data.clients ({cfg['data']['clients']}), "
                          f"got {edges}", key="edges")
    if cfg["privacy"]["placement"] != "none":
        raise ConfigError("deployed edges do not carry differential privacy yet (the global "
                          "would clip an edge's whole group as one client); use it in "
                          "simulation (shoal run --set hierarchy.edges=...)",
                          key="privacy.placement")
    if cfg["round"]["policy"] != "sync":
        raise ConfigError("deployed edges run synchronous rounds for now", key="round.policy")


def launch_edges(args: argparse.Namespace) -> int:
    """The ``shoal launch --edges E`` command (see the module docstring)."""
    from shoal.cli.options import config_from_args
    from shoal.cli.report import banner, report
    from shoal.config import to_toml
    from shoal.deploy import AggregatorPaths, check_deployable, run_aggregator
    from shoal.hierarchy.ring import Ring
    from shoal.store.atomic import replace_atomically
    from shoal.telemetry import ProgressBar
    from shoal.transport.auth import load_or_create_secret
    from shoal.transport.certs import make_local_pki
    from shoal.transport.tokens import issue_token

    cfg = config_from_args(args)
    edges = int(args.edges)
    _check(cfg, edges)
    # the global's devices are the edges, each asked every round
    gcfg = cfg.with_overrides({"data.clients": edges, "sampling.per_round": edges,
                               "sampling.method": "uniform", "deploy.target": 0,
                               "deploy.over_selection": 1.0, "deploy.wait_devices": edges,
                               "secure_aggregation.enabled": False})
    check_deployable(gcfg, tls=True)
    check_deployable(cfg, tls=True)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="shoal-edges-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "config.toml"
    cfg_path.write_text(to_toml(cfg))
    pki = make_local_pki(work / "certs", days=2, now=dt.datetime.now(dt.timezone.utc),
                         overwrite=True)
    secret = load_or_create_secret(work / "secret")
    names = [f"edge-{i}" for i in range(edges)]
    h = cfg["hierarchy"]
    ring = Ring(names, vnodes=h["vnodes"], load_factor=h["load_factor"])
    ring.assign_all([str(c) for c in range(cfg["data"]["clients"])])
    (work / "tokens").mkdir(exist_ok=True)
    for name in names:
        replace_atomically(work / "tokens" / name, issue_token(
            secret, name, now=time.time(), ttl_seconds=2 * 86400).encode(), mode=0o600)
    paths = AggregatorPaths(secret=work / "secret", registry=work / "registry.db",
                            store=work / "models", tls_dir=work / "certs",
                            port_file=work / "port")
    banner(cfg, args, f" launch ({edges} edge processes, {cfg['data']['clients']} client "
                      f"processes, TLS between every tier, state in {work})")
    procs: list[subprocess.Popen] = []
    (work / "logs").mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def start_edges(port: int) -> None:
        for name in names:
            mine = ",".join(ring.devices_of(name)) or "-"
            cmd = [sys.executable, "-m", "shoal.cli.edges", str(cfg_path), "--name", name,
                   "--devices", mine, "--upstream", f"localhost:{port}",
                   "--token", str(work / "tokens" / name), "--certs", str(work / "certs"),
                   "--dir", str(work / name)]
            with open(work / "logs" / f"{name}.log", "w") as log_file:
                procs.append(subprocess.Popen(cmd, stdout=log_file,
                                              stderr=subprocess.STDOUT, env=env))

    progress = ProgressBar(cfg.rounds, quiet=args.quiet)
    try:
        exp, result = run_aggregator(gcfg, paths, on_ready=start_edges,
                                     on_round=progress.version_evaluated)
    finally:
        progress.close()
        _stop(procs)
    return report(gcfg, args, exp, result, {"edge_processes": edges,
                                            "client_processes": cfg["data"]["clients"],
                                            "work_dir": str(work)})


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def edge_main(argv: Sequence[str] | None = None) -> int:
    """One edge process: serve its devices (started here) and answer the global's tasks
    until SIGTERM."""
    ap = argparse.ArgumentParser(prog="python -m shoal.cli.edges",
                                 description="one edge aggregator of `shoal launch --edges`")
    ap.add_argument("config")
    ap.add_argument("--name", required=True)
    ap.add_argument("--devices", required=True, help="client indices, comma-separated")
    ap.add_argument("--upstream", required=True, help="the global aggregator HOST:PORT")
    ap.add_argument("--token", required=True, help="file with this edge's token")
    ap.add_argument("--certs", required=True, help="directory with ca.pem, server.pem, "
                                                   "server.key")
    ap.add_argument("--dir", required=True, help="this edge's state directory")
    args = ap.parse_args(argv)

    import numpy as np

    from shoal.build import load_data, secagg_from_config
    from shoal.config import load_config
    from shoal.deploy import settings_from_config
    from shoal.frameworks.torch import spec_of
    from shoal.hierarchy.deployed import Upstream, edge_policy, run_edge
    from shoal.hierarchy.edge import Edge
    from shoal.models import build_model
    from shoal.store.atomic import replace_atomically
    from shoal.transport.auth import Keyring, load_or_create_secret
    from shoal.transport.tokens import issue_token

    cfg = load_config(args.config)
    indices = [] if args.devices == "-" else [int(c) for c in args.devices.split(",")]
    work, certs = Path(args.dir), Path(args.certs)
    work.mkdir(parents=True, exist_ok=True)
    (work / "tokens").mkdir(exist_ok=True)
    secret = load_or_create_secret(work / "secret")
    devices = [f"device-{c:04d}" for c in indices]
    for name in devices:
        replace_atomically(work / "tokens" / name, issue_token(
            secret, name, now=time.time(), ttl_seconds=2 * 86400).encode(), mode=0o600)
    data = load_data(cfg)
    spec = spec_of(build_model(cfg["model"]["name"], int(np.prod(data.train.x.shape[1:])),
                               data.train.num_classes, cfg.seed))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    procs: list[subprocess.Popen] = []

    def start_devices(port: int) -> None:
        for c, name in zip(indices, devices):
            cmd = [sys.executable, "-m", "shoal.cli", "client", args.config, "--server",
                   f"localhost:{port}", "--token", str(work / "tokens" / name),
                   "--ca", str(certs / "ca.pem"), "--index", str(c)]
            with open(work / f"{name}.log", "w") as log_file:
                procs.append(subprocess.Popen(cmd, stdout=log_file,
                                              stderr=subprocess.STDOUT))

    d = cfg["deploy"]
    edge = Edge(args.name, cfg.seed, cfg["hierarchy"]["edge_rounds"],
                policy=edge_policy(d["deadline_s"], d["min_fraction"]))
    upstream = Upstream(args.upstream, Path(args.token).read_text().strip(),
                        (certs / "ca.pem").read_bytes())
    try:
        stats = run_edge(edge, devices, upstream, settings=settings_from_config(cfg),
                         keyring=Keyring.single(secret), dim=spec.size,
                         fingerprint=spec.fingerprint,
                         registry_path=str(work / "registry.db"),
                         tls=((certs / "server.pem").read_bytes(),
                              (certs / "server.key").read_bytes()),
                         stop=stop, secure=secagg_from_config(cfg),
                         wait_timeout_s=d["wait_timeout_s"], on_ready=start_devices)
    finally:
        _stop(procs)
    print(json.dumps({"edge": args.name, **stats.__dict__}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(edge_main())
