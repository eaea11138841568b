"""A simulated gossip run from a :class:`~shoal.config.Config`: data, network, models, local
training with the cohort engine, the vectorized simulator, and the reports (consensus
distance every step; accuracy of the average and of each peer every ``eval.every`` steps).
``shoal gossip sim`` and ``benchmarks/bench_gossip.py`` run it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shoal.config import Config
from shoal.data import FederatedData
from shoal.frameworks.torch import FlatModule
from shoal.gossip.build import Network, initial_models, network_from_config, peer_data
from shoal.gossip.metrics import consensus_distance, evaluate_models
from shoal.gossip.mixing import MAX_DENSE_PEERS, Spectrum, spectrum
from shoal.gossip.simulator import GossipSimulator, cohort_training
from shoal.models import build_model
from shoal.sim.cohort import CohortTrainer
from shoal.training import LocalTrainConfig

__all__ = ["GossipRun", "simulate"]


@dataclass
class GossipRun:
    """What a simulated run measured.

    Attributes:
        network: the schedule, rule and topology.
        spectrum: the schedule's spectral gap (``None`` above the dense limit).
        consensus: consensus distance after each step (index 0: the start).
        history: per evaluation, ``{"step", "consensus", "accuracy_average", ...}``.
        bytes_sent: per peer, model bytes sent over the whole run.
        wall_seconds: from loading the data to the last evaluation.
    """

    network: Network
    spectrum: Spectrum | None
    consensus: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    bytes_sent: np.ndarray = field(default_factory=lambda: np.zeros(0))
    wall_seconds: float = 0.0

    def summary(self, cfg: Config) -> dict[str, Any]:
        s = self.spectrum
        last = self.history[-1] if self.history else {}
        return {
            "mode": "simulation", "topology": cfg["gossip"]["topology"],
            "peers": cfg["data"]["clients"], "edges": self.network.num_edges,
            "rule": self.network.rule.name, "lambda2": s.lambda2 if s else None,
            "spectral_gap": s.gap if s else None, "steps": cfg.rounds,
            "final_consensus": self.consensus[-1],
            **{k: v for k, v in last.items() if k not in ("step", "consensus")},
            "bytes_sent_per_peer_per_step": float(self.bytes_sent.mean()) / max(cfg.rounds, 1),
            "wall_seconds": self.wall_seconds,
        }


def simulate(cfg: Config, *, data: FederatedData | None = None,
             on_record: Callable[[dict[str, Any]], None] | None = None) -> GossipRun:
    """Run ``cfg.rounds`` gossip steps of ``data.clients`` peers (``cfg["gossip"]``).

    Args:
        data: the federated data (default: :func:`~shoal.gossip.build.peer_data`).
        on_record: called with each evaluation's row as it is made.

    Raises:
        ConfigError: the network does not fit the config (:func:`network_from_config`).
    """
    started = time.perf_counter()
    data = data if data is not None else peer_data(cfg)
    net = network_from_config(cfg, data)
    n, classes = cfg["data"]["clients"], data.train.num_classes
    features = int(np.prod(data.train.feature_shape))
    name = cfg["model"]["name"]
    train = None
    if cfg["gossip"]["local_training"]:
        c = cfg["client"]
        trainer = CohortTrainer(build_model(name, features, classes, cfg.seed),
                                torch.from_numpy(data.train.x), torch.from_numpy(data.train.y),
                                engine=cfg["sim"]["engine"])
        train = cohort_training(trainer, data.client_indices, LocalTrainConfig(
            epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"]), cfg.seed)
    sim = GossipSimulator(net.schedule, initial_models(cfg, features, classes, list(range(n))),
                          rule=net.rule, train=train)
    evaluator = FlatModule(build_model(name, features, classes, cfg.seed))  # not the trainer's
    run = GossipRun(net, spectrum(net.schedule) if n <= MAX_DENSE_PEERS else None,
                    bytes_sent=np.zeros(n))

    def record(step: int) -> None:
        acc = evaluate_models(evaluator, sim.params, data.test.x, data.test.y, range(n),
                              peer_examples=cfg["gossip"]["peer_eval_examples"])
        row = {"step": step, "consensus": run.consensus[-1], **acc.summary()}
        run.history.append(row)
        if on_record is not None:
            on_record(row)

    run.consensus.append(consensus_distance(sim.params))
    record(0)
    every = cfg["eval"]["every"]
    for step in range(1, cfg.rounds + 1):
        report = sim.run_step()
        run.bytes_sent += report.bytes_sent
        run.consensus.append(float(report.consensus or 0.0))
        if step % every == 0 or step == cfg.rounds:
            record(step)
    run.wall_seconds = time.perf_counter() - started
    return run
