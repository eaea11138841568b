"""Gossip: accuracy of D-PSGD on label-skewed Fashion-MNIST by topology, and the simulator's
speed at 1,000 peers against the alternatives it replaces.

Parts (``--part``), each printing one JSON line per result:

* ``accuracy``: 100 peers, 2NN, ``shards`` (McMahan et al.: 2 label-sorted shards per peer,
  so each peer holds 1 or 2 classes), 1 local epoch per step (batch 32, lr 0.05), one run per
  topology -- ring, D-Cliques (cliques of 10, one edge per pair of cliques), fully
  connected -- through :func:`shoal.gossip.run.simulate`. One line per evaluation (accuracy
  of the average model on the 10,000 test images, and of each peer's own model on the first
  ``--peer-examples``), then a summary per topology: edges, spectral gap, final accuracies,
  and the gaps to fully connected.
* ``scale``: ``--peers`` (1,000) peers of the 2NN on the Dirichlet(0.5) split, ring: seconds
  per step of local training (every peer a cohort of one, :func:`cohort_training`) and of
  mixing (one CSR ``addmm``), peak RSS; the baselines measured in the same run:
  - mixing as a dense ``W @ X`` (what the sparse product replaces), timed on a slice of rows
    and scaled;
  - training the same peers as one batched cohort from a common model (what the engine does
    in FedAvg, and cannot do when every peer starts from its own model);
  - pure averaging through ``n`` :class:`~shoal.gossip.node.GossipNode` objects exchanging
    messages in memory (:class:`~shoal.gossip.network.InMemoryNetwork`) against the
    vectorized simulator, on a ``--node-dim``-parameter model (n node objects of the 2NN
    would hold several GB of message copies).

    .venv/bin/python benchmarks/bench_gossip.py --part accuracy --steps 40
    .venv/bin/python benchmarks/bench_gossip.py --part scale --peers 1000 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from shoal import seeds
from shoal.config import load_config
from shoal.gossip.build import peer_data
from shoal.gossip.mixing import StaticSchedule, metropolis_hastings
from shoal.gossip.network import InMemoryNetwork
from shoal.gossip.node import GossipNode
from shoal.gossip.run import simulate
from shoal.gossip.simulator import GossipSimulator, cohort_training
from shoal.gossip.topology import ring
from shoal.models import build_model
from shoal.sim.cohort import CohortTrainer
from shoal.training import LocalTrainConfig


def emit(**row: object) -> None:
    print(json.dumps(row), flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def accuracy(args: argparse.Namespace) -> None:
    base = {"data.clients": 100, "data.partition": "shards", "rounds": args.steps,
            "eval.every": args.eval_every, "gossip.peer_eval_examples": args.peer_examples,
            "seed": args.seed}
    data = peer_data(load_config(None, base))
    classes = np.array([len(np.unique(data.train.y[ix])) for ix in data.client_indices])
    emit(part="accuracy", what="partition", peers_with_2_classes=int((classes == 2).sum()),
         peers_with_1_class=int((classes == 1).sum()))
    finals = {}
    for topology in ("ring", "d_cliques", "complete"):
        cfg = load_config(None, {**base, "gossip.topology": topology})

        def row(r: dict, topology: str = topology) -> None:
            emit(part="accuracy", topology=topology, **r)

        run = simulate(cfg, data=data, on_record=row)
        summary = run.summary(cfg)
        finals[topology] = summary
        emit(part="accuracy", what="summary", **summary)
    full = finals["complete"]
    for topology in ("ring", "d_cliques"):
        s = finals[topology]
        emit(part="accuracy", what="against_complete", topology=topology,
             edge_fraction=s["edges"] / full["edges"],
             accuracy_gap=full["accuracy_average"] - s["accuracy_average"],
             peer_accuracy_gap=full["accuracy_peers_mean"] - s["accuracy_peers_mean"])


def scale(args: argparse.Namespace) -> None:
    n = args.peers
    cfg = load_config(None, {"data.clients": n, "seed": args.seed})
    data = peer_data(cfg)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
    model = build_model("mlp2nn", 784, 10, cfg.seed)
    trainer = CohortTrainer(model, x, y)
    local = LocalTrainConfig()
    start = trainer.flat_module.get()
    sched = StaticSchedule(metropolis_hastings(ring(n)))
    train = cohort_training(trainer, data.client_indices, local, cfg.seed)
    timed = {"train": 0.0}

    def timed_train(params: np.ndarray, step: int, peers: np.ndarray) -> None:
        t = time.perf_counter()
        train(params, step, peers)
        timed["train"] += time.perf_counter() - t

    sim = GossipSimulator(sched, np.tile(start, (n, 1)), train=timed_train,
                          track_consensus=False)
    sim.run_step()  # warm-up (buffers, CSR)
    timed["train"] = 0.0
    t = time.perf_counter()
    for _ in range(args.steps):
        sim.run_step()
    step_s = (time.perf_counter() - t) / args.steps
    train_s = timed["train"] / args.steps
    emit(part="scale", peers=n, params=int(start.size), steps=args.steps,
         seconds_per_step=step_s, train_seconds_per_step=train_s,
         mix_seconds_per_step=step_s - train_s, peak_rss_mb=peak_rss_mb())

    # baseline 1: a dense W @ X on a slice of rows, scaled to n rows
    rows = max(1, n // 20)
    dense = torch.from_numpy(sched.at(0).to_dense()[:rows].astype(np.float32))
    xs = torch.from_numpy(sim.params)
    t = time.perf_counter()
    dense @ xs
    dense_s = (time.perf_counter() - t) * n / rows
    emit(part="scale", baseline="dense_mixing", seconds_per_step=dense_s,
         sparse_over_dense=(step_s - train_s) / dense_s)

    # baseline 2: the same peers trained as one batched cohort from one model
    rngs = [seeds.generator(cfg.seed, "train", 0, i) for i in range(n)]
    chunk = 100
    t = time.perf_counter()
    for a in range(0, n, chunk):
        trainer.train(start, list(data.client_indices[a:a + chunk]), local, rngs[a:a + chunk])
    batched_s = time.perf_counter() - t
    emit(part="scale", baseline="batched_cohort_training", seconds_per_step=batched_s,
         one_peer_cohorts_over_batched=train_s / batched_s)

    # baseline 3: n node objects exchanging messages vs the simulator, pure averaging
    dim = args.node_dim
    x0 = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    nodes = [GossipNode(i, sched, x0[i]) for i in range(n)]
    net = InMemoryNetwork(nodes)
    vec = GossipSimulator(sched, x0, track_consensus=False)
    t = time.perf_counter()
    for _ in range(args.steps):
        net.step()
    nodes_s = (time.perf_counter() - t) / args.steps
    t = time.perf_counter()
    for _ in range(args.steps):
        vec.run_step()
    vec_s = (time.perf_counter() - t) / args.steps
    diff = float(np.abs(np.stack([nd.params for nd in nodes]) - vec.params).max())
    emit(part="scale", baseline="node_objects_in_memory", params=dim,
         node_seconds_per_step=nodes_s, vectorized_seconds_per_step=vec_s,
         speedup=nodes_s / vec_s, max_abs_difference=diff)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("accuracy", "scale", "all"), default="all")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--peer-examples", type=int, default=1000)
    p.add_argument("--peers", type=int, default=1000)
    p.add_argument("--node-dim", type=int, default=7850)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    emit(part="setup", threads=args.threads, machine="shared 2-core machine; other "
         "engineers' jobs ran at the same time")
    if args.part in ("accuracy", "all"):
        accuracy(args)
    if args.part in ("scale", "all"):
        scale(args)


if __name__ == "__main__":
    main()
