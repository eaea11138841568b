"""``shoal launch --ingest N --redis [URL]``: the aggregator cluster on one machine -- a
committer, N ingest processes and the devices, TLS on loopback, the device registry and the
round state in Redis (docs/scaling.md, "Aggregator cluster").

The committer runs in this process (:func:`run_committer`: the run's coordinator over a
:class:`~shoal.cluster.committer.ClusterCarrier`, committing every version to the model
store). Each ingest node is a process (``python -m shoal.cli.cluster ingest``,
:func:`~shoal.cluster.ingest.run_ingest`). Each device is a process (``python -m
shoal.cli.edges device``, as under ``--edges``) that trains its client of the partition and
calls the ingest nodes in its own order (device ``c`` starts at node ``c mod N``), moving to
the next when one stops answering. Device tokens are signed by one secret every ingest node
holds. ``--redis`` alone starts a ``redis-server`` on a free loopback port in the state
directory (and stops it at the end); ``--redis URL`` uses a running one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from shoal.config import Config
from shoal.errors import ConfigError

__all__ = ["check_cluster", "ingest_main", "launch_cluster", "run_committer", "start_redis"]


def check_cluster(cfg: Config) -> None:
    """Refuse what the cluster cannot run yet (before anything is written).

    Raises:
        ConfigError: a registry other than Redis, differential privacy, secure aggregation
            or buffered rounds.
    """
    if cfg["deploy"]["registry"] != "redis":
        raise ConfigError("the aggregator cluster shares its device registry through Redis: "
                          "set deploy.registry = 'redis'", key="deploy.registry")
    if cfg["privacy"]["placement"] != "none":
        raise ConfigError("the aggregator cluster does not carry differential privacy yet "
                          "(partial aggregates carry no clipping promise)",
                          key="privacy.placement")
    if cfg["secure_aggregation"]["enabled"]:
        raise ConfigError("the aggregator cluster does not run secure aggregation yet (a "
                          "SecAgg+ round would need every device of a cohort at one node)",
                          key="secure_aggregation.enabled")
    if cfg["round"]["policy"] != "sync":
        raise ConfigError("the aggregator cluster runs synchronous rounds for now",
                          key="round.policy")


def run_committer(cfg: Config, store_path: Path, *,
                  on_round: Callable[[Any], None] | None = None,
                  observers: Iterable[Any] = ()) -> tuple[Any, Any]:
    """The committer: wait for ``deploy.wait_devices`` devices in the Redis registry, then
    run ``cfg`` over the ingest nodes' partial aggregates, committing each version to the
    model store at ``store_path`` (resuming from its latest).

    Returns:
        ``(experiment, result)``.

    Raises:
        ConfigError: what :func:`check_cluster` refuses, or too few devices in time.
        RegistryUnavailable: Redis went away (every committed version is intact).
    """
    from shoal.build import selector_from_config
    from shoal.cluster.committer import ClusterCarrier
    from shoal.cluster.rounds import RoundBoard
    from shoal.deploy import central_model, registry_from_config, run_committing, \
        wait_for_devices
    from shoal.experiment import Experiment
    from shoal.sampling import RegistrySampler, UniformSampler
    from shoal.store import ModelStore

    check_cluster(cfg)
    d, s = cfg["deploy"], cfg["sampling"]
    registry = registry_from_config(cfg)
    board = RoundBoard(d["redis_url"], prefix=d["redis_prefix"])
    store = ModelStore(store_path)
    host = None
    try:
        host, spec, data = central_model(cfg)  # deploy.model_process: in its own process
        devices = wait_for_devices(registry, d["wait_devices"] or cfg["data"]["clients"],
                                   d["wait_timeout_s"])
        carrier = ClusterCarrier(board, devices, spec.size)
        sampler = (UniformSampler(s["per_round"]) if s["selection"] == "uniform"
                   else RegistrySampler(selector_from_config(cfg), s["per_round"],
                                        carrier.devices, lambda: registry))
        exp = Experiment(cfg, data, pool=carrier, sampler=sampler, model=host)
        return exp, run_committing(exp, store, threading.Lock(), on_round,
                                   observers=observers)
    finally:
        if host is not None:
            host.close()
        store.close()
        board.close()
        registry.close()


def start_redis(directory: Path, timeout_s: float = 10.0) -> tuple[str, subprocess.Popen]:
    """A ``redis-server`` on a free loopback port, its append-only file in ``directory``;
    ``(url, process)``.

    Raises:
        ConfigError: ``redis-server`` is not installed, or did not answer in time.
    """
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError("--redis without a URL starts redis-server, which is not installed "
                          "(apt-get install redis-server), or give --redis redis://HOST:PORT/0",
                          key="redis")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--dir",
                             str(directory), "--save", "", "--appendonly", "yes",
                             "--protected-mode", "yes", "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if client.ping():
                    return url, proc
            except redis.RedisError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise ConfigError(f"redis-server did not start on port {port}", key="redis")
            time.sleep(0.05)
    finally:
        client.close()


def launch_cluster(args: argparse.Namespace) -> int:
    """The ``shoal launch --ingest N --redis [URL]`` command (see the module docstring)."""
    from shoal.cli.edges import _read_port
    from shoal.cli.launch import stop_processes
    from shoal.cli.options import config_from_args
    from shoal.cli.report import banner, report
    from shoal.config import to_toml
    from shoal.deploy import check_deployable
    from shoal.store.atomic import replace_atomically
    from shoal.telemetry import ProgressBar
    from shoal.transport.auth import load_or_create_secret
    from shoal.transport.certs import make_local_pki
    from shoal.transport.tokens import issue_token

    nodes = int(args.ingest)
    if args.redis is None:
        raise ConfigError("--ingest needs --redis (a URL, or nothing to start a "
                          "redis-server here): the nodes share their state through it",
                          key="redis")
    if nodes < 1:
        raise ConfigError(f"--ingest must be >= 1, got {nodes}", key="ingest")
    cfg = config_from_args(args).with_overrides({"deploy.registry": "redis"})
    check_cluster(cfg)  # before anything is written or started
    check_deployable(cfg, tls=True)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="shoal-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    redis_proc = None
    url = args.redis
    if url == "start":
        url, redis_proc = start_redis(work / "redis")
    try:
        cfg = cfg.with_overrides({"deploy.redis_url": url})
        cfg_path = work / "config.toml"
        cfg_path.write_text(to_toml(cfg))
        make_local_pki(work / "certs", days=2, now=dt.datetime.now(dt.timezone.utc),
                       overwrite=True)
        secret = load_or_create_secret(work / "secret")
        clients = cfg["data"]["clients"]
        tokens = work / "tokens"
        tokens.mkdir(exist_ok=True)
        for c in range(clients):
            replace_atomically(tokens / f"device-{c:04d}", issue_token(
                secret, f"device-{c:04d}", now=time.time(), ttl_seconds=2 * 86400).encode(),
                mode=0o600)
        banner(cfg, args, f" launch (a committer, {nodes} ingest processes, {clients} client "
                          f"processes, TLS on loopback, Redis at {url}, state in {work})")
        procs: list[subprocess.Popen] = []
        (work / "logs").mkdir(exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

        def spawn(module: str, cmd: list[str], log: str) -> None:
            with open(work / "logs" / log, "w") as log_file:
                procs.append(subprocess.Popen([sys.executable, "-m", module, *cmd],
                                              stdout=log_file, stderr=subprocess.STDOUT,
                                              env=env))

        names = [f"ingest-{i}" for i in range(nodes)]
        for name in names:
            spawn("shoal.cli.cluster", ["ingest", str(cfg_path), "--name", name,
                                        "--secret", str(work / "secret"),
                                        "--certs", str(work / "certs"),
                                        "--dir", str(work / name)], f"{name}.log")
        ports = [_read_port(work / name / "port", procs) for name in names]
        for c in range(clients):
            order = [ports[(c + k) % nodes] for k in range(nodes)]
            spawn("shoal.cli.edges", ["device", str(cfg_path), "--index", str(c),
                                      "--servers", ",".join(f"localhost:{p}" for p in order),
                                      "--token", str(tokens / f"device-{c:04d}"),
                                      "--ca", str(work / "certs" / "ca.pem")],
                  f"device-{c:04d}.log")
        progress = ProgressBar(cfg.rounds, quiet=args.quiet)
        try:
            exp, result = run_committer(cfg, work / "models",
                                        on_round=progress.version_evaluated)
        finally:
            progress.close()
            stop_processes(procs)
        return report(cfg, args, exp, result, {"ingest_processes": nodes,
                                               "client_processes": clients,
                                               "redis": url, "work_dir": str(work)})
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)


def ingest_main(argv: Sequence[str] | None = None) -> int:
    """``python -m shoal.cli.cluster ingest CONFIG ...``: one ingest node (until SIGTERM);
    its bound port is written to ``DIR/port``, its counters to stderr at the end.
    ``python -m shoal.cli.cluster commit CONFIG --dir DIR``: the committer alone (another
    machine's ingest nodes reach it through the config's Redis)."""
    ap = argparse.ArgumentParser(prog="python -m shoal.cli.cluster",
                                 description="a process of `shoal launch --ingest`")
    sub = ap.add_subparsers(dest="role", required=True)
    e = sub.add_parser("ingest", help="one ingest node")
    e.add_argument("config")
    e.add_argument("--name", required=True, help="the node's name, unique in the cluster")
    e.add_argument("--secret", required=True, help="the device-token secret")
    e.add_argument("--certs", required=True, help="directory with server.pem, server.key")
    e.add_argument("--dir", required=True, help="this node's state directory")
    e.add_argument("--port", type=int, default=0, help="gRPC port (0: any free one)")
    c = sub.add_parser("commit", help="the committer (prints the run's summary as JSON)")
    c.add_argument("config")
    c.add_argument("--dir", required=True, help="state directory (the model store: models/)")
    args = ap.parse_args(argv)
    if args.role == "commit":
        from shoal.config import load_config

        _, result = run_committer(load_config(args.config), Path(args.dir) / "models")
        print(json.dumps(result.summary()))
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    node = _ingest(args, stop)
    print(json.dumps({"role": "ingest", "name": args.name, "partials": node.answered}),
          file=sys.stderr)
    return 0


def _ingest(args: argparse.Namespace, stop: threading.Event) -> Any:
    from shoal.cli.edges import _write_port
    from shoal.cluster.ingest import run_ingest
    from shoal.cluster.rounds import RoundBoard
    from shoal.config import load_config
    from shoal.deploy import registry_from_config, settings_from_config
    from shoal.model_host import ModelHost
    from shoal.pipeline import Validation
    from shoal.transport.auth import Keyring, load_or_create_secret

    cfg = load_config(args.config)
    check_cluster(cfg)
    d = cfg["deploy"]
    work, certs = Path(args.dir), Path(args.certs)
    work.mkdir(parents=True, exist_ok=True)
    # the layout only, from a child that exits at once: PyTorch stays out of this process,
    # and Fashion-MNIST's shapes are known without its files
    spec = ModelHost(cfg, evaluates=False).spec
    board = RoundBoard(d["redis_url"], prefix=d["redis_prefix"])
    try:
        return run_ingest(
            args.name, board, settings=settings_from_config(cfg),
            keyring=Keyring.single(load_or_create_secret(Path(args.secret))),
            dim=spec.size, fingerprint=spec.fingerprint,
            registry_factory=lambda: registry_from_config(cfg),
            seed=cfg.seed, grace_s=d["ingest_grace_s"],
            tls=((certs / "server.pem").read_bytes(), (certs / "server.key").read_bytes()),
            stop=stop, validation=Validation(max_norm=d["max_norm"] or None),
            host=d["host"], port=args.port,
            on_ready=lambda port: _write_port(work / "port", port))
    finally:
        board.close()


if __name__ == "__main__":
    raise SystemExit(ingest_main())
