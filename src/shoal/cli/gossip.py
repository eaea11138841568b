"""``shoal gossip``: peer-to-peer training with no server.

``shoal gossip sim`` simulates ``data.clients`` peers in this process (the vectorized
simulator); ``shoal gossip peer`` runs one deployed peer, and ``shoal launch --gossip N``
(:func:`launch_peers`) starts N of them on loopback, each with mutual TLS, and reports on the
network when they are done. Both modes build the same network from the ``[gossip]`` section
(:func:`shoal.gossip.build.network_from_config`). See docs/gossip.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.cli.options import add_run_options, overrides_from_args
from shoal.config import Config, load_config
from shoal.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from shoal.data import FederatedData

__all__ = ["add_parser", "launch_peers", "PeerFiles", "prepare_network", "peer_command",
           "gossip_config"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gossip", help="peer-to-peer training with no server: simulate it, or run one peer",
        description="Decentralized SGD (D-PSGD): each peer trains on its own client's data "
                    "and averages with its neighbours under the [gossip] topology and "
                    "weights. `shoal gossip sim` simulates every peer in this process; "
                    "`shoal launch --gossip N` deploys N peer processes on loopback.",
        epilog="example:\n  shoal gossip sim --clients 100 --rounds 50 --set "
               "gossip.topology='\"d_cliques\"' --set data.partition='\"shards\"'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_subparsers(dest="gossip_mode", metavar="MODE")
    s = modes.add_parser("sim", help="simulate the peers in this process")
    add_run_options(s)
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    s.set_defaults(func=run_sim)
    q = modes.add_parser("peer", help="one deployed peer (shoal launch --gossip starts them)")
    add_run_options(q)
    q.add_argument("--index", type=int, required=True, help="this peer's client index")
    q.add_argument("--dir", required=True, help="the network's directory (ports, states)")
    q.add_argument("--certs", required=True,
                   help="directory with ca.pem, server.pem/.key and client-peer-NNNN.pem/.key")
    q.add_argument("--trace", action="store_true", help="append the model after every step "
                                                          "to peers/NAME/trace.shc")
    q.add_argument("--linger", type=float, default=2.0, metavar="S",
                   help="keep answering neighbours this long after the last step")
    q.add_argument("--die-at-step", dest="die_at_step", type=int, metavar="T",
                   help="fault injection: SIGKILL this process right after mixing step T")
    q.add_argument("--byzantine", type=float, metavar="SHIFT",
                   help="fault injection: offer every model plus SHIFT (a Byzantine peer)")
    q.set_defaults(func=run_peer)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def gossip_config(args: argparse.Namespace, peers: int | None = None) -> Config:
    """The config of the command line, with ``data.clients = peers`` when given. Every peer
    trains every step, so ``sampling.per_round`` does not apply: unless set explicitly it is
    1, which any number of peers satisfies."""
    overrides = overrides_from_args(args)
    if peers is not None:
        overrides["data.clients"] = peers
    overrides.setdefault("sampling.per_round", 1)
    return load_config(args.config, overrides)


# -- simulation ----------------------------------------------------------------------------

def run_sim(args: argparse.Namespace) -> int:
    import resource

    import torch

    from shoal.gossip.run import simulate

    cfg = gossip_config(args)
    torch.set_num_threads(cfg["sim"]["threads"] or 1)  # per-peer steps are small matmuls

    def show(row: dict[str, Any]) -> None:
        if not args.quiet and not args.json:
            print(f"step {row['step']:5d}  consensus {row['consensus']:.4g}  accuracy: "
                  f"average {row['accuracy_average']:.4f}, peers "
                  f"{row['accuracy_peers_mean']:.4f} (min {row['accuracy_peers_min']:.4f}, "
                  f"max {row['accuracy_peers_max']:.4f})", file=sys.stderr)

    run = simulate(cfg, on_record=show)
    summary = {**run.summary(cfg),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "consensus_per_step": run.consensus, "history": run.history}
    _print_summary(summary, args)
    return 0


def _print_summary(summary: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in summary.items()}))
        return
    gap = summary.get("spectral_gap")
    lines = [f"\ndone: {summary['steps']} gossip steps of {summary['peers']} peers "
             f"({summary['mode']}) in {summary['wall_seconds']:.1f} s",
             f"  topology                {summary['topology']}, {summary['edges']} edges, "
             f"rule {summary['rule']}"
             + (f", spectral gap {gap:.4g} (lambda2 {summary['lambda2']:.6g})"
                if gap is not None else ""),
             f"  consensus distance      {summary['final_consensus']:.4g}",
             f"  accuracy of the average {summary['accuracy_average']:.4f}",
             f"  accuracy of the peers   mean {summary['accuracy_peers_mean']:.4f}, min "
             f"{summary['accuracy_peers_min']:.4f}, max {summary['accuracy_peers_max']:.4f}",
             f"  sent per peer per step  "
             f"{summary['bytes_sent_per_peer_per_step'] / 1e6:.3f} MB"]
    print("\n".join(lines))


# -- deployment ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PeerFiles:
    """Where a deployed network keeps its files (one directory, shared by the peers)."""

    work: Path
    config: Path
    certs: Path

    def port_file(self, name: str) -> Path:
        return self.work / "ports" / name

    def peer_dir(self, name: str) -> Path:
        return self.work / "peers" / name


def prepare_network(work: Path, cfg: Config, peers: int) -> PeerFiles:
    """Write the network's config, a local CA, the host's server certificate and one client
    certificate per peer (common name ``peer-NNNN``) under ``work``."""
    import datetime as dt

    from shoal.config import to_toml
    from shoal.transport.certs import make_client_cert, make_local_pki
    from shoal.transport.gossip_peer import peer_name

    work.mkdir(parents=True, exist_ok=True)
    files = PeerFiles(work, work / "config.toml", work / "certs")
    files.config.write_text(to_toml(cfg))
    now = dt.datetime.now(dt.timezone.utc)
    pki = make_local_pki(files.certs, days=2, now=now, overwrite=True)
    for i in range(peers):
        make_client_cert(files.certs, name=peer_name(i), ca_cert=pki.ca_cert,
                         ca_key=pki.ca_key, days=2, now=now, overwrite=True)
    (work / "ports").mkdir(exist_ok=True)
    return files


def peer_command(files: PeerFiles, index: int, *extra: str) -> list[str]:
    """The command line of peer ``index``."""
    return [sys.executable, "-m", "shoal.cli", "gossip", "peer", str(files.config),
            "--index", str(index), "--dir", str(files.work), "--certs", str(files.certs),
            *extra]


def run_peer(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    import numpy as np

    from shoal.gossip.build import initial_models, network_from_config, peer_data
    from shoal.gossip.node import GossipNode, MixResult
    from shoal.gossip.state import append_trace, load_state, save_state
    from shoal.store.atomic import replace_atomically
    from shoal.transport.gossip_peer import GossipPeer, PeerTLS, peer_name

    cfg = gossip_config(args)
    n, g = cfg["data"]["clients"], cfg["gossip"]
    if not 0 <= args.index < n:
        raise ConfigError(f"--index {args.index} is not a peer of this network (0 .. {n - 1})",
                          key="index")
    names = [peer_name(i) for i in range(n)]
    name = names[args.index]
    files = PeerFiles(Path(args.dir), Path(args.config or ""), Path(args.certs))
    home = files.peer_dir(name)
    home.mkdir(parents=True, exist_ok=True)
    data = peer_data(cfg)
    net = network_from_config(cfg, data)
    features = int(np.prod(data.train.feature_shape))
    params = initial_models(cfg, features, data.train.num_classes, [args.index])[0]
    resumed = load_state(home / "state.shc", len(params))
    step = 0
    if resumed is not None:
        step, params = resumed
    node = GossipNode(args.index, net.schedule, params, rule=net.rule, step=step,
                      step_timeout_s=g["step_timeout_s"])
    shift = args.byzantine

    def tamper(p: np.ndarray) -> np.ndarray:
        return (p + np.float32(shift)).astype(np.float32)

    def resolve(i: int) -> str | None:
        try:
            return files.port_file(names[i]).read_text().strip() or None
        except FileNotFoundError:
            return None

    def on_mix(res: MixResult) -> None:
        save_state(home / "state.shc", res.step + 1, res.params)
        if args.trace:
            append_trace(home / "trace.shc", res.step, res.params)
        if args.die_at_step is not None and res.step == args.die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    peer = GossipPeer(node, names, resolve, tls=PeerTLS.from_dir(files.certs, name),
                      train=_peer_training(cfg, data, args.index), on_mix=on_mix,
                      min_step_s=g["min_step_s"], tamper=tamper if shift else None)
    port = peer.start()
    replace_atomically(files.port_file(name), f"localhost:{port}".encode())
    deadline = time.monotonic() + 120
    while any(resolve(i) is None for i in range(n)):  # every peer up before step 0
        if time.monotonic() > deadline:
            raise ConfigError("not every peer wrote its port file within 120 s", key="dir")
        time.sleep(0.05)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        peer.run(cfg.rounds, stop)
        stop.wait(args.linger)  # neighbours finishing the last step may still pull from us
        peer.leave()
    finally:
        peer.close()
    traffic = peer.traffic
    with peer.cond:
        stats = {"peer": name, "step": node.step, "down": sorted(node.down),
                 "models_sent": node.stats.models_sent,
                 "models_received": node.stats.models_received,
                 "refused": dict(node.stats.refused), "refused_by": dict(node.stats.refused_by),
                 "jumps": node.stats.jumps, "bytes_sent": traffic.bytes_sent,
                 "bytes_received": traffic.bytes_received,
                 "failed_calls": traffic.failed_calls, "resumed_at": step}
    replace_atomically(home / "stats.json", json.dumps(stats).encode())
    return 0


def _peer_training(cfg: Config, data: FederatedData, index: int
                   ) -> Callable[[np.ndarray, int], np.ndarray] | None:
    """Peer ``index``'s local training, ``train(params, step) -> trained``, or ``None`` for
    pure averaging: :func:`shoal.training.train_local` on its client's examples with the
    stream ``seeds.generator(seed, "train", step, index)`` -- the simulator's."""
    if not cfg["gossip"]["local_training"]:
        return None
    from shoal.training import LocalTrainConfig
    from shoal.transport.reference import fmnist_train_fn

    idx = data.client_indices[index]
    c = cfg["client"]
    fit = fmnist_train_fn(cfg["model"]["name"], data.train.x[idx], data.train.y[idx],
                          LocalTrainConfig(epochs=c["epochs"], batch_size=c["batch_size"],
                                           lr=c["lr"]), cfg.seed, index,
                          num_classes=data.train.num_classes)

    def train(params: np.ndarray, step: int) -> np.ndarray:
        return params + fit(params, {}, step).delta

    return train


def launch_peers(args: argparse.Namespace) -> int:
    """``shoal launch --gossip N``: N peer processes on loopback, then the network's report
    (consensus, accuracy of the average and of each peer, bytes per peer)."""
    import subprocess
    import tempfile

    import numpy as np

    from shoal.experiment import peak_rss_mb
    from shoal.frameworks.torch import FlatModule
    from shoal.gossip.build import network_from_config, peer_data
    from shoal.gossip.metrics import consensus_distance, evaluate_models
    from shoal.gossip.state import load_state
    from shoal.models import build_model
    from shoal.transport.gossip_peer import peer_name

    n = args.gossip
    if n < 2:
        raise ConfigError(f"--gossip needs at least 2 peers, got {n}", key="gossip")
    if args.die_after or args.attr:
        raise ConfigError("--die-after and --attr are for client processes; a gossip network "
                          "has none", key="gossip")
    cfg = gossip_config(args, n)
    data = peer_data(cfg)
    net = network_from_config(cfg, data)  # refuse a bad topology before starting anything
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="shoal-gossip-"))
    files = prepare_network(work, cfg, n)
    if not args.quiet:
        print(f"shoal launch: {n} gossip peers ({cfg['gossip']['topology']}, "
              f"{net.num_edges} edges, mutual TLS on loopback), {cfg.rounds} steps, state in "
              f"{work}", file=sys.stderr)
    started = time.perf_counter()
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = []
    for i in range(n):
        home = files.peer_dir(peer_name(i))
        home.mkdir(parents=True, exist_ok=True)
        with open(home / "log", "w") as log:
            procs.append(subprocess.Popen(peer_command(files, i), stdout=log,
                                          stderr=subprocess.STDOUT, env=env))
    try:
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    features = int(np.prod(data.train.feature_shape))
    model = FlatModule(build_model(cfg["model"]["name"], features, data.train.num_classes,
                                   cfg.seed))
    dim = model.spec.size
    states = [load_state(files.peer_dir(peer_name(i)) / "state.shc", dim) for i in range(n)]
    stats = [_read_json(files.peer_dir(peer_name(i)) / "stats.json") for i in range(n)]
    finished = [s for s in states if s is not None]
    if not finished:
        raise ConfigError(f"no peer finished a step; see the logs in {work}/peers", key="dir")
    params = np.stack([p for _, p in finished])
    acc = evaluate_models(model, params, data.test.x, data.test.y, range(len(finished)),
                          peer_examples=cfg["gossip"]["peer_eval_examples"])
    sent = [s["bytes_sent"] for s in stats if s]
    summary = {
        "mode": "deployment", "topology": cfg["gossip"]["topology"], "peers": n,
        "edges": net.num_edges, "rule": net.rule.name, "lambda2": None, "spectral_gap": None,
        "steps": cfg.rounds, "final_consensus": consensus_distance(params),
        **acc.summary(),
        "bytes_sent_per_peer_per_step": float(np.mean(sent)) / cfg.rounds if sent else 0.0,
        "steps_reached": [s[0] if s is not None else 0 for s in states],
        "exit_codes": codes, "wall_seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(), "work_dir": str(work),
    }
    _print_summary(summary, args)
    return 0 if all(c == 0 for c in codes) else 1


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
