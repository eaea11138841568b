"""Peer-to-peer federated learning with no server: gossip.

Peers train on their own data and average with their neighbours (decentralized SGD: Lian et
al., "Can Decentralized Algorithms Outperform Centralized Algorithms?", NeurIPS 2017).

* :mod:`~shoal.gossip.topology` -- who talks to whom (ring, torus, random regular,
  Erdős–Rényi, complete, D-Cliques);
* :mod:`~shoal.gossip.mixing` -- the weights W (Metropolis–Hastings by default, the
  time-varying one-peer exponential graph) and their spectral gap;
* :mod:`~shoal.gossip.rules` -- weighted averaging or a trimmed mean against Byzantine
  neighbours;
* :mod:`~shoal.gossip.node` -- one peer, sans-I/O: messages and time in, messages out;
* :mod:`~shoal.gossip.network` -- nodes exchanging messages in memory (tests, reference);
* :mod:`~shoal.gossip.simulator` -- n peers stacked, a step as one sparse product, local
  training with the cohort engine (imports torch; not loaded by this package);
* :mod:`~shoal.gossip.metrics`, :mod:`~shoal.gossip.build`, :mod:`~shoal.gossip.state` --
  consensus distance and accuracy, a network from a config, a peer's checkpoint and trace.

Deployed peers: :mod:`shoal.transport.gossip_peer` (gRPC, mutual TLS). See docs/gossip.md.
"""

from __future__ import annotations

from shoal.gossip.metrics import consensus_distance
from shoal.gossip.mixing import (MixingMatrix, OnePeerExponential, Schedule, Spectrum,
                                 StaticSchedule, max_degree, metropolis_hastings, spectrum)
from shoal.gossip.network import InMemoryNetwork
from shoal.gossip.node import Answer, GossipNode, Leave, MixResult, Offer, Send
from shoal.gossip.rules import MixingRule, TrimmedMean, Weighted, trimmed_mean
from shoal.gossip.topology import (Topology, complete, d_cliques, erdos_renyi,
                                   random_regular, ring, torus)

__all__ = [
    "Answer", "GossipNode", "InMemoryNetwork", "Leave", "MixResult", "MixingMatrix",
    "MixingRule", "Offer", "OnePeerExponential", "Schedule", "Send", "Spectrum",
    "StaticSchedule", "Topology", "TrimmedMean", "Weighted", "complete", "consensus_distance",
    "d_cliques", "erdos_renyi", "max_degree", "metropolis_hastings", "random_regular", "ring",
    "spectrum", "torus", "trimmed_mean",
]
