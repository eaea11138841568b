"""A gossip network from a :class:`~shoal.config.Config`: its schedule, its rule, its start.

Every peer of a deployment builds the same network from the same config (the random
topologies and D-Cliques' swaps draw from ``gossip.topology_seed``), so no peer needs to be
told the graph; the simulator builds it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shoal import seeds
from shoal.build import load_partition
from shoal.config import Config
from shoal.data import FederatedData
from shoal.errors import ConfigError
from shoal.gossip.mixing import (OnePeerExponential, Schedule, StaticSchedule, max_degree,
                                 metropolis_hastings)
from shoal.gossip.rules import MixingRule, rule_from_name
from shoal.gossip.topology import (Topology, complete, d_cliques, erdos_renyi,
                                   random_regular, ring, torus)

__all__ = ["Network", "network_from_config", "label_counts", "initial_models", "peer_data"]


@dataclass(frozen=True, eq=False)
class Network:
    """What a gossip run mixes with.

    Attributes:
        schedule: W of every step.
        rule: weighted or trimmed mean.
        topology: the graph (``None`` for the time-varying exponential graph).
    """

    schedule: Schedule
    rule: MixingRule
    topology: Topology | None

    @property
    def num_edges(self) -> int:
        """Undirected edges (for the exponential graph: the peers one step talks to)."""
        return self.topology.num_edges if self.topology is not None else self.schedule.n


def peer_data(cfg: Config) -> FederatedData:
    """The training set split among the peers, and the test set
    (:func:`shoal.build.load_partition`).

    Raises:
        ConfigError: the config asks for a population whose data is generated on demand
            (peers hold index arrays into one dataset here).
    """
    return load_partition(cfg, "a gossip peer")


def label_counts(data: FederatedData) -> np.ndarray:
    """``(clients, classes)``: examples of each class each client holds."""
    y, k = data.train.y, data.train.num_classes
    return np.stack([np.bincount(y[ix], minlength=k) for ix in data.client_indices])


def network_from_config(cfg: Config, data: FederatedData | None = None) -> Network:
    """The network of ``cfg["gossip"]`` over ``data.clients`` peers.

    Raises:
        ConfigError: a topology that does not fit (see the builders), D-Cliques without
            ``data``, or a trimmed mean some peer can never apply (fewer than ``2 trim``
            neighbours).
    """
    g, n = cfg["gossip"], cfg["data"]["clients"]
    rng = seeds.generator(g["topology_seed"], "gossip", "topology")
    rule = rule_from_name(g["rule"], g["trim"])
    if g["topology"] == "exponential":
        if rule.trim:
            raise ConfigError("gossip.rule = 'trimmed_mean' needs at least 2 trim + 1 "
                              "values per peer; the one-peer exponential graph gives 2",
                              key="gossip.rule")
        return Network(OnePeerExponential(n), rule, None)
    if g["topology"] == "d_cliques":
        if data is None:
            raise ConfigError("gossip.topology = 'd_cliques' needs the clients' labels",
                              key="gossip.topology")
        top = d_cliques(label_counts(data), g["clique_size"], rng,
                        interclique=g["interclique"])
    else:
        top = {"ring": lambda: ring(n), "torus": lambda: torus(n),
               "complete": lambda: complete(n),
               "regular": lambda: random_regular(n, g["degree"], rng),
               "erdos_renyi": lambda: erdos_renyi(n, g["edge_probability"], rng),
               }[g["topology"]]()
    fewest = int(top.degrees().min())
    if rule.trim and fewest < 2 * rule.trim:
        raise ConfigError(f"gossip.trim = {rule.trim} needs every peer to have at least "
                          f"{2 * rule.trim} neighbours; topology {top.name!r} has a peer "
                          f"with {fewest}", key="gossip.trim")
    w = metropolis_hastings(top) if g["weights"] == "metropolis" else max_degree(top)
    return Network(StaticSchedule(w), rule, top)


def initial_models(cfg: Config, in_features: int, num_classes: int,
                   peers: list[int]) -> np.ndarray:
    """``(len(peers), D)`` float32 starting models: with ``gossip.init = "same"`` all the
    model of ``seed`` (as :func:`shoal.models.build_model` makes it); with
    ``"independent"`` peer ``i`` from ``seeds.torch_seed(seed, "gossip-init", i)``."""
    from shoal.frameworks.torch import FlatModule
    from shoal.models import build_model

    name = cfg["model"]["name"]

    def params(seed: int) -> np.ndarray:
        return FlatModule(build_model(name, in_features, num_classes, seed)).get()

    if cfg["gossip"]["init"] == "same":
        return np.tile(params(cfg.seed), (len(peers), 1))
    return np.stack([params(seeds.torch_seed(cfg.seed, "gossip-init", i)) for i in peers])
