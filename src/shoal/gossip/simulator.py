"""The vectorized gossip simulator: n peers' models stacked, a step as a sparse product.

Driving n :class:`~shoal.gossip.node.GossipNode` objects (:mod:`shoal.gossip.network`) costs
``O(edges)`` Python messages per step. Here the models are one ``(n, D)`` float32 matrix and
a step is

1. local training of every live peer, rows updated in place, through a
   :data:`LocalTraining` function (:func:`cohort_training` trains with the simulator's cohort
   engine, :class:`~shoal.sim.cohort.CohortTrainer`), then
2. mixing: ``X <- W Y``, one sparse-times-dense product (``torch.addmm`` with a CSR W, into a
   second buffer that is reused, so no step allocates ``n x D``), or the trimmed mean of
   :mod:`shoal.gossip.rules` over gathered neighbour rows, in column blocks.

Churn is a set of *down* peers: they neither train nor mix, and every live peer gives a down
neighbour's weight to itself -- exactly what a node does when a neighbour cannot be reached,
so the simulator and a network of nodes with the same peers down compute the same models.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shoal import seeds
from shoal.codec import Chain, to_bytes
from shoal.gossip.metrics import consensus_distance
from shoal.gossip.mixing import MixingMatrix, Schedule
from shoal.gossip.rules import MixingRule, TrimmedMean, Weighted, trimmed_mean
from shoal.sim.cohort import CohortTrainer
from shoal.training import LocalTrainConfig

__all__ = ["GossipSimulator", "LocalTraining", "StepReport", "cohort_training",
           "model_wire_bytes"]

LocalTraining = Callable[[np.ndarray, int, np.ndarray], None]
"""``train(params, step, peers)``: train the rows ``peers`` of the ``(n, D)`` float32
``params`` in place for gossip step ``step``."""

_BLOCK_BYTES = 64 << 20  # gathered neighbour rows per block of the trimmed mean


def model_wire_bytes(dim: int) -> int:
    """Bytes of one float32 model of ``dim`` parameters in shoal's wire format (what a gossip
    message carries)."""
    return len(to_bytes(Chain([]).encode(np.zeros(dim, np.float32), np.random.default_rng(0))))


@dataclass(frozen=True)
class StepReport:
    """One simulated step.

    Attributes:
        step: the step just mixed.
        consensus: consensus distance after mixing (``None`` unless tracked).
        bytes_sent: per peer, bytes of the models it sent this step (push-pull: one model
            to every live peer that mixes it).
    """

    step: int
    consensus: float | None
    bytes_sent: np.ndarray


class GossipSimulator:
    """n peers gossiping in one process.

    Args:
        schedule: W of every step.
        params: ``(n, D)`` starting models (copied): float32, or float64 for pure averaging
            (no ``train``) when rounding must stay far below the quantities measured.
        rule: :class:`~shoal.gossip.rules.Weighted` (default) or a trimmed mean.
        train: local training of each step (``None``: pure averaging).
        track_consensus: compute the consensus distance after every step (one pass over
            the models).

    Raises:
        ValueError: ``params`` does not have one row per peer.
    """

    def __init__(self, schedule: Schedule, params: np.ndarray, *,
                 rule: MixingRule = Weighted(), train: LocalTraining | None = None,
                 track_consensus: bool = True) -> None:
        params = np.asarray(params)
        if params.ndim != 2 or params.shape[0] != schedule.n \
                or params.dtype not in (np.float32, np.float64) \
                or (train is not None and params.dtype != np.float32):
            raise ValueError(f"params must be float32 (float64 without training) of shape "
                             f"({schedule.n}, D), got {params.dtype} {params.shape}")
        self.schedule = schedule
        self.rule = rule
        self.train = train
        self.track_consensus = track_consensus
        self.n, self.dim = params.shape
        self._x = np.array(params, order="C")
        self._out = np.empty_like(self._x)
        self.step = 0
        self.down: frozenset[int] = frozenset()
        self._csr: dict[tuple[int, frozenset[int]], torch.Tensor] = {}
        self.model_bytes = model_wire_bytes(self.dim)  # float32 on the wire, whatever the dtype here

    @property
    def params(self) -> np.ndarray:
        """The current ``(n, D)`` models (a view; the next step overwrites it)."""
        return self._x

    def set_down(self, peers: Iterable[int]) -> None:
        """Peers that are down from the next step on (replacing the previous set)."""
        down = frozenset(int(p) for p in peers)
        if any(not 0 <= p < self.n for p in down):
            raise ValueError(f"down peers must be in 0..{self.n - 1}")
        self.down = down

    def live(self) -> np.ndarray:
        """int64 indices of the peers that are not down."""
        mask = np.ones(self.n, dtype=bool)
        mask[list(self.down)] = False
        return np.flatnonzero(mask)

    def effective(self, step: int) -> MixingMatrix:
        """W of ``step`` as the live peers apply it: a down neighbour's weight goes to the
        peer itself; a down peer keeps its model (its row is the identity)."""
        w = self.schedule.at(step)
        if not self.down:
            return w
        rows = np.repeat(np.arange(self.n), np.diff(w.indptr))
        cols, vals = w.indices.copy(), w.weights.copy()
        down = np.zeros(self.n, dtype=bool)
        down[list(self.down)] = True
        moved = down[cols] & (rows != cols)
        moved |= down[rows] & (rows != cols)
        to_self = np.bincount(rows[moved], weights=vals[moved], minlength=self.n)
        keep = ~moved
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        diag = rows == cols
        vals[diag] += to_self[rows[diag]]
        vals[diag & down[rows]] = 1.0
        return MixingMatrix.from_edges(self.n, rows, cols, vals, f"{w.name} (churn)")

    def run_step(self) -> StepReport:
        """Train every live peer, then mix once."""
        step = self.step
        live = self.live()
        if self.train is not None:
            self.train(self._x, step, live)
        w = self.effective(step)
        if isinstance(self.rule, TrimmedMean):
            self._trimmed(w, self.rule.trim)
        else:
            key = (step % self.schedule.period, self.down)
            csr = self._csr.get(key)
            if csr is None:
                with warnings.catch_warnings():  # "sparse CSR support is in beta"
                    warnings.simplefilter("ignore", UserWarning)
                    csr = self._csr[key] = torch.sparse_csr_tensor(
                        torch.from_numpy(w.indptr), torch.from_numpy(w.indices),
                        torch.from_numpy(w.weights.astype(self._x.dtype)), (self.n, self.n))
            y, out = torch.from_numpy(self._x), torch.from_numpy(self._out)
            torch.addmm(out, csr, y, beta=0.0, out=out)
        self._x, self._out = self._out, self._x
        self.step += 1
        sent = np.diff(w.transposed.indptr) - 1  # receivers of each peer's model, self excluded
        sent[list(self.down)] = 0
        return StepReport(step, consensus_distance(self._x[live]) if self.track_consensus
                          else None, sent.astype(np.int64) * self.model_bytes)

    def _trimmed(self, w: MixingMatrix, trim: int) -> None:
        """Each live peer's trimmed mean of its own and its live neighbours' rows."""
        counts = np.diff(w.indptr)
        self._out[:] = self._x
        for m in np.unique(counts):
            peers = np.flatnonzero((counts == m))
            peers = peers[~np.isin(peers, list(self.down))]
            if m <= 2 * trim or not len(peers):
                continue  # too few values: the peer keeps its own model (a node does too)
            idx = np.stack([w.indices[w.indptr[p]:w.indptr[p + 1]] for p in peers])
            block = max(1, _BLOCK_BYTES // (4 * idx.size))
            for c in range(0, self.dim, block):
                self._out[peers, c:c + block] = trimmed_mean(self._x[idx, c:c + block], trim)

    def run(self, steps: int, on_step: Callable[[StepReport], None] | None = None) -> None:
        """Run ``steps`` steps, calling ``on_step`` after each."""
        for _ in range(steps):
            report = self.run_step()
            if on_step is not None:
                on_step(report)


def cohort_training(trainer: CohortTrainer, client_indices: Sequence[np.ndarray],
                    config: LocalTrainConfig, seed: int) -> LocalTraining:
    """Local training of peer ``i`` on client ``i``'s examples with the cohort engine.

    Peer ``i`` trains at step ``t`` with the stream ``seeds.generator(seed, "train", t, i)``
    -- the one a deployed peer uses -- from its own model. The cohort engine batches clients
    that start from one model; gossip peers each start from their own, so every peer is a
    cohort of one (1.33x the time of batched training for 1,000 2NN peers:
    docs/benchmarks.md, "Gossip").
    """
    indices = list(client_indices)

    def train(params: np.ndarray, step: int, peers: np.ndarray) -> None:
        for i in peers:
            i = int(i)
            res = trainer.train(params[i], [indices[i]], config,
                                [seeds.generator(seed, "train", step, i)])
            params[i] += res.deltas[0]

    return train
