"""``shoal launch --edges E``: a global aggregator, E edge aggregator processes and the
devices, TLS on loopback between every tier (docs/hierarchy.md).

The global aggregator runs in this process (:func:`~shoal.deploy.run_aggregator`, with the
E edges as its devices: every edge every round). Each edge is a process
(``python -m shoal.cli.edges edge``): an aggregator for its devices
(:func:`~shoal.hierarchy.deployed.run_edge`) and one device of the global. Each device is a
process (``python -m shoal.cli.edges device``) that trains its client of the partition as
``shoal client`` does and calls the edge the ring (``hierarchy.load_factor``,
``hierarchy.vnodes``) gave it; when that edge stops answering it moves to the edge the ring
moves it to (:func:`~shoal.hierarchy.deployed.follow_edges`), and never trains there a global
round it trained at the edge it left
(:class:`~shoal.hierarchy.deployed.OncePerParentRound`: that edge may only be slow, and its
upload still arrive). Device tokens are signed by one
edge-tier secret, so any edge admits any device. The edges' rounds follow
``deploy.deadline_s`` and ``deploy.min_fraction``; ``hierarchy.edge_rounds`` > 1 is
HierFAVG; ``hierarchy.failures`` (``EDGE@ROUND``) kills an edge process (SIGKILL) once it has
its group's aggregate of that round, before its upload.
"""

from __future__ import annotations

import argparse
import copy
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
from typing import TYPE_CHECKING

from shoal.errors import ConfigError

if TYPE_CHECKING:
    from shoal.config import Config
    from shoal.transport.device_api import ClientStats

__all__ = ["launch_edges", "edge_main"]


def _check(cfg: Config, edges: int) -> None:
    """Refuse what deployed edges cannot run yet (before anything is written)."""
    from shoal.hierarchy.tiers import check_edge_downloads

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
    if cfg["hierarchy"]["edge_policy"] != "sync":
        raise ConfigError("deployed edges run synchronous edge rounds for now",
                          key="hierarchy.edge_policy")
    if cfg["hierarchy"]["regions"]:
        raise ConfigError("deployed edges have no region tier yet (use it in simulation)",
                          key="hierarchy.regions")
    check_edge_downloads(cfg)


def launch_edges(args: argparse.Namespace) -> int:
    """The ``shoal launch --edges E`` command (see the module docstring)."""
    from shoal.cli.dashboard import Operations
    from shoal.cli.launch import stop_processes  # SIGTERM, then SIGKILL after 10 s
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
    edge_secret = load_or_create_secret(work / "edge-secret")
    names = [f"edge-{i}" for i in range(edges)]
    clients = cfg["data"]["clients"]
    h = cfg["hierarchy"]
    ring = Ring(names, vnodes=h["vnodes"], load_factor=h["load_factor"])
    ring.assign_all([str(c) for c in range(clients)])
    tokens = work / "tokens"
    tokens.mkdir(exist_ok=True)
    for name, key in [*((n, secret) for n in names),
                      *((f"device-{c:04d}", edge_secret) for c in range(clients))]:
        replace_atomically(tokens / name, issue_token(
            key, name, now=time.time(), ttl_seconds=2 * 86400).encode(), mode=0o600)
    paths = AggregatorPaths(secret=work / "secret", registry=work / "registry.db",
                            store=work / "models", tls_dir=work / "certs",
                            port_file=work / "port")
    banner(cfg, args, f" launch ({edges} edge processes, {clients} client processes, TLS "
                      f"between every tier, state in {work})")
    procs: list[subprocess.Popen] = []
    edge_procs: dict[str, subprocess.Popen] = {}
    (work / "logs").mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def spawn(cmd: list[str], log: str) -> subprocess.Popen:
        with open(work / "logs" / log, "w") as log_file:
            procs.append(subprocess.Popen([sys.executable, "-m", "shoal.cli.edges", *cmd],
                                          stdout=log_file, stderr=subprocess.STDOUT,
                                          env=env))
        return procs[-1]

    def start(port: int) -> None:
        for name in names:
            edge_procs[name] = spawn(
                ["edge", str(cfg_path), "--name", name,
                 "--devices", ",".join(ring.devices_of(name)) or "-",
                 "--upstream", f"localhost:{port}", "--token", str(tokens / name),
                 "--secret", str(work / "edge-secret"), "--certs", str(work / "certs"),
                 "--dir", str(work / name)], f"{name}.log")
        ports = {name: _read_port(work / name / "port", procs) for name in names}
        for c in range(clients):
            order = ring.successors(str(c))
            spawn(["device", str(cfg_path), "--index", str(c),
                   "--servers", ",".join(f"localhost:{ports[e]}" for e in order),
                   "--token", str(tokens / f"device-{c:04d}"),
                   "--ca", str(work / "certs" / "ca.pem")], f"device-{c:04d}.log")

    progress = ProgressBar(cfg.rounds, quiet=args.quiet)
    asked = args.dashboard or cfg["dashboard"]["address"]
    with Operations(gcfg, work, paths.registry, quiet=args.quiet, optional=not asked,
                    address="" if args.no_dashboard else asked or "127.0.0.1:0") as ops:
        follower = None
        if ops.dashboard is not None:  # the edges page: each edge's reports, dead edges
            from shoal.dashboard.replay import EdgeProcesses

            follower = EdgeProcesses(ops.dashboard.state, {n: work / n for n in names},
                                     copy.deepcopy(ring),  # the devices' ring, its own copy
                                     lambda n: edge_procs[n].poll() if n in edge_procs
                                     else None)
            follower.start()
        try:  # the global's dashboard: its devices are the edges
            exp, result = run_aggregator(gcfg, paths, on_ready=start,
                                         on_round=progress.version_evaluated,
                                         observers=ops.observers, on_store=ops.on_store)
        finally:
            progress.close()
            if follower is not None:
                follower.stop()  # before the processes: their ends are no failures
                follower.poll()
            stop_processes(procs)
    return report(gcfg, args, exp, result, {"edge_processes": edges,
                                            "client_processes": clients,
                                            "work_dir": str(work)})


def _read_port(path: Path, procs: Sequence[subprocess.Popen], timeout_s: float = 120.0
               ) -> int:
    """The port an edge process wrote, waiting for it.

    Raises:
        ConfigError: an edge process exited or wrote nothing in time.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip().isdigit():
            return int(path.read_text())
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    raise ConfigError(f"an edge process did not start serving (no port in {path}); see the "
                      f"logs next to it", key="edges")


def _write_port(path: Path, port: int) -> None:
    """Where a process's server listens, for :func:`_read_port` in the launcher."""
    path.write_text(f"{port}\n")


def edge_main(argv: Sequence[str] | None = None) -> int:
    """``python -m shoal.cli.edges edge|device ...``: one edge or one device process of
    :func:`launch_edges` (until SIGTERM)."""
    ap = argparse.ArgumentParser(prog="python -m shoal.cli.edges",
                                 description="a process of `shoal launch --edges`")
    sub = ap.add_subparsers(dest="role", required=True)
    e = sub.add_parser("edge", help="one edge aggregator")
    e.add_argument("config")
    e.add_argument("--name", required=True)
    e.add_argument("--devices", required=True, help="client indices, comma-separated")
    e.add_argument("--upstream", required=True, help="the global aggregator HOST:PORT")
    e.add_argument("--token", required=True, help="file with this edge's token")
    e.add_argument("--secret", required=True, help="the edge tier's device-token secret")
    e.add_argument("--certs", required=True, help="directory with ca.pem, server.pem, "
                                                  "server.key")
    e.add_argument("--dir", required=True, help="this edge's state directory (its port "
                                                "is written to port)")
    d = sub.add_parser("device", help="one device, following its edges")
    d.add_argument("config")
    d.add_argument("--index", type=int, required=True)
    d.add_argument("--servers", required=True, help="its edges HOST:PORT in failover order")
    d.add_argument("--token", required=True)
    d.add_argument("--ca", required=True)
    args = ap.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stats = _edge(args, stop) if args.role == "edge" else _device(args, stop)
    print(json.dumps({"role": args.role, **(stats.__dict__ if stats else {})}),
          file=sys.stderr)
    return 0


def _edge(args: argparse.Namespace, stop: threading.Event) -> ClientStats:
    import numpy as np

    from shoal.build import load_data, secagg_from_config
    from shoal.config import load_config
    from shoal.dashboard.edges import EdgeLog
    from shoal.deploy import settings_from_config
    from shoal.frameworks.torch import spec_of
    from shoal.hierarchy.deployed import Upstream, edge_policy, run_edge
    from shoal.hierarchy.edge import Edge
    from shoal.hierarchy.tiers import parse_failures
    from shoal.models import build_model
    from shoal.transport.auth import Keyring, load_or_create_secret

    cfg = load_config(args.config)
    indices = [] if args.devices == "-" else [int(c) for c in args.devices.split(",")]
    work, certs = Path(args.dir), Path(args.certs)
    work.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg)
    spec = spec_of(build_model(cfg["model"]["name"], int(np.prod(data.train.x.shape[1:])),
                               data.train.num_classes, cfg.seed))
    dying = {r for r, names in parse_failures(cfg["hierarchy"]["failures"]).items()
             if args.name in names}

    def die(round_: int) -> None:  # fault injection: the upload never leaves
        if round_ in dying:
            print(f"{args.name}: hierarchy.failures: killing myself in round {round_}",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    dc = cfg["deploy"]
    edge = Edge(args.name, cfg.seed, cfg["hierarchy"]["edge_rounds"],
                policy=edge_policy(dc["deadline_s"], dc["min_fraction"]))
    upstream = Upstream(args.upstream, Path(args.token).read_text().strip(),
                        (certs / "ca.pem").read_bytes())
    return run_edge(edge, [f"device-{c:04d}" for c in indices], upstream,
                    settings=settings_from_config(cfg),
                    keyring=Keyring.single(load_or_create_secret(Path(args.secret))),
                    dim=spec.size, fingerprint=spec.fingerprint,
                    registry_path=str(work / "registry.db"),
                    tls=((certs / "server.pem").read_bytes(),
                         (certs / "server.key").read_bytes()),
                    stop=stop, secure=secagg_from_config(cfg),
                    wait_timeout_s=dc["wait_timeout_s"],
                    on_ready=lambda port: _write_port(work / "port", port),
                    after_answer=die if dying else None,
                    on_report=EdgeLog(work).edge_reported)


def _device(args: argparse.Namespace, stop: threading.Event) -> ClientStats | None:
    from shoal.build import load_partition
    from shoal.config import load_config
    from shoal.hierarchy.deployed import OncePerParentRound, follow_edges
    from shoal.training import LocalTrainConfig
    from shoal.transport.client import DeviceClient
    from shoal.transport.reference import fmnist_train_fn

    cfg = load_config(args.config)
    data = load_partition(cfg, "a device process of shoal launch --edges")
    c = args.index
    idx = data.client_indices[c]
    local = LocalTrainConfig(epochs=cfg["client"]["epochs"],
                             batch_size=cfg["client"]["batch_size"], lr=cfg["client"]["lr"])
    train = OncePerParentRound(fmnist_train_fn(
        cfg["model"]["name"], data.train.x[idx], data.train.y[idx], local, cfg.seed, c,
        num_classes=data.train.num_classes), cfg["hierarchy"]["edge_rounds"])
    token = Path(args.token).read_text().strip()
    ca = Path(args.ca).read_bytes()
    name = f"device-{c:04d}"
    return follow_edges(args.servers.split(","), lambda target: DeviceClient(
        target, token, name, root_certificates=ca, train=train, examples=len(idx),
        attributes={"index": str(c)}, max_retries=3, max_backoff_s=1.0), stop, train)


if __name__ == "__main__":
    raise SystemExit(edge_main())
