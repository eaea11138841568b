"""Virtual clients answering evaluation tasks on their own held-out data.

The simulator's carrier for federated evaluation (:class:`~shoal.events.EvalTask`): each
virtual client evaluates the task's model on its held-out examples and reports its mean loss,
accuracy, example count and, if asked, its label histogram (the cheap statistics drift
detection needs). The cohort's examples go through the model in one batched pass and are
reduced per client, so evaluating a thousand clients costs one forward pass over their data.
:func:`holdout_split` carves each client's held-out split out of its partition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from shoal import seeds
from shoal.data import Dataset
from shoal.events import EvalReported, EvalReports, SendEval
from shoal.frameworks.torch import FlatModule

__all__ = ["LocalEvaluator", "holdout_split"]


def holdout_split(parts: Sequence[np.ndarray], fraction: float, seed: int
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every client's examples into (train, held-out): a ``fraction`` of each client's
    examples (rounded, at least one when it has two or more), drawn from stream
    ``(seed, "holdout", client)``.

    Raises:
        ValueError: ``fraction`` is not in (0, 1).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    train, held = [], []
    for c, ix in enumerate(parts):
        ix = np.asarray(ix, np.int64)
        k = int(round(len(ix) * fraction))
        k = max(k, 1) if len(ix) >= 2 else 0
        perm = seeds.generator(seed, "holdout", c).permutation(len(ix))
        held.append(np.sort(ix[perm[:k]]))
        train.append(np.sort(ix[perm[k:]]))
    return train, held


class LocalEvaluator:
    """Evaluation-only virtual clients.

    Args:
        model: the model (its parameters are overwritten by each task's).
        data: the examples the held-out indices point into.
        held_out: per client id, its held-out example ids in ``data`` (may be replaced
            between tasks, e.g. as a client's data drifts: assign :attr:`held_out`).
        segment: client ids -> each client's segment (a device attribute), or ``None``.
        label_histogram: also report ``label_<k>``, the count of each class.
    """

    def __init__(self, model: FlatModule, data: Dataset, held_out: Sequence[np.ndarray], *,
                 segment: Callable[[np.ndarray], Sequence[str]] | None = None,
                 label_histogram: bool = False) -> None:
        self.model = model
        self.x = torch.from_numpy(data.x).reshape(len(data.y), -1)
        self.y = torch.from_numpy(np.asarray(data.y, np.int64))
        self.num_classes = data.num_classes
        self.held_out = list(held_out)
        self.segment = segment
        self.label_histogram = label_histogram

    @torch.no_grad()
    def reports(self, params: np.ndarray, client_ids: np.ndarray) -> EvalReports:
        """Each client's metrics on its held-out data for the model ``params``.

        A client with no held-out example reports NaN loss and accuracy and weight 0.
        """
        ids = np.asarray(client_ids, np.int64)
        parts = [np.asarray(self.held_out[c], np.int64) for c in ids.tolist()]
        sizes = np.array([len(p) for p in parts], np.int64)
        rows = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64))
        self.model.set(params)
        self.model.module.eval()
        owner = np.repeat(np.arange(len(ids)), sizes)
        nll = np.zeros(len(rows))
        hit = np.zeros(len(rows))
        for start in range(0, len(rows), 4096):
            idx = rows[start:start + 4096]
            logits = self.model.module(self.x[idx])
            yb = self.y[idx]
            nll[start:start + len(idx)] = torch.nn.functional.cross_entropy(
                logits, yb, reduction="none").double().numpy()
            hit[start:start + len(idx)] = (logits.argmax(1) == yb).double().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = np.bincount(owner, nll, len(ids)) / sizes
            acc = np.bincount(owner, hit, len(ids)) / sizes
        metrics = {"loss": loss, "accuracy": acc}
        if self.label_histogram:
            labels = self.y[rows].numpy()
            counts = np.zeros((len(ids), self.num_classes))
            np.add.at(counts, (owner, labels), 1.0)
            metrics |= {f"label_{k}": counts[:, k] for k in range(self.num_classes)}
        segments = tuple(self.segment(ids)) if self.segment is not None else ()
        return EvalReports(ids, sizes, metrics, segments)

    def answer(self, command: SendEval, now: float) -> EvalReported:
        """Carry out a :class:`~shoal.events.SendEval`: the event of its cohort's reports."""
        return EvalReported(command.task.task_id,
                            self.reports(command.task.params, command.client_ids), now)
