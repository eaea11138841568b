"""What a gossip run reports: how far apart the peers are, and how good their models are.

* :func:`consensus_distance` -- ``sqrt(1/n sum_i ||x_i - mean||^2)``, the quantity whose decay
  the spectral gap governs (the "consensus distance" of Kong et al., "Consensus Control for
  Decentralized Deep Learning", ICML 2021);
* :func:`evaluate_models` -- test accuracy and loss of the average model and of each peer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads only when models are evaluated
    from shoal.frameworks.torch import FlatModule

__all__ = ["consensus_distance", "PeerAccuracy", "evaluate_models"]

_ROWS = 64  # rows per block when subtracting the mean (bounds the float64 temporary)


def consensus_distance(params: np.ndarray) -> float:
    """``sqrt(1/n sum_i ||x_i - x_mean||^2)`` of the rows of ``params`` (``(n, D)``),
    accumulated in float64 block by block (no ``n x D`` temporary, and no cancellation:
    the distances are taken from the mean, not from ``sum ||x||^2 - n ||mean||^2``)."""
    n = params.shape[0]
    if n == 0:
        return 0.0
    mean = params.mean(axis=0, dtype=np.float64)
    total = 0.0
    for a in range(0, n, _ROWS):
        diff = params[a:a + _ROWS].astype(np.float64) - mean
        total += float(np.einsum("ij,ij->", diff, diff))
    return float(np.sqrt(total / n))


@dataclass(frozen=True)
class PeerAccuracy:
    """Test accuracy of the peers' models.

    Attributes:
        average: accuracy of the average model (what the network converges to).
        average_loss: its mean cross-entropy.
        peers: accuracy of each evaluated peer's own model, in the order asked for.
        examples: test examples each peer was evaluated on.
    """

    average: float
    average_loss: float
    peers: np.ndarray
    examples: int

    def summary(self) -> dict[str, float]:
        p = self.peers
        return {"accuracy_average": self.average, "loss_average": self.average_loss,
                "accuracy_peers_mean": float(p.mean()) if len(p) else float("nan"),
                "accuracy_peers_min": float(p.min()) if len(p) else float("nan"),
                "accuracy_peers_max": float(p.max()) if len(p) else float("nan")}


def evaluate_models(model: FlatModule, params: np.ndarray, x_test: np.ndarray,
                    y_test: np.ndarray, peers: Sequence[int], *,
                    peer_examples: int = 0) -> PeerAccuracy:
    """Accuracy of the mean of ``params``'s rows on the whole test set, and of each of
    ``peers``' own rows on the first ``peer_examples`` test examples (0: all).

    Args:
        model: a :class:`~shoal.frameworks.torch.FlatModule` of the model.
        params: ``(n, D)`` float32 models.
        x_test, y_test: the test set.
        peers: which peers to evaluate one by one.
        peer_examples: test examples per peer (evaluating n models costs n passes).
    """
    import torch

    from shoal.training import evaluate

    xt, yt = torch.from_numpy(x_test), torch.from_numpy(y_test)
    avg = evaluate(model, params.mean(axis=0, dtype=np.float64).astype(np.float32), xt, yt)
    k = len(yt) if peer_examples <= 0 else min(peer_examples, len(yt))
    accs = np.array([evaluate(model, params[int(i)], xt[:k], yt[:k])["accuracy"]
                     for i in peers], dtype=np.float64)
    return PeerAccuracy(avg["accuracy"], avg["loss"], accs, k)
