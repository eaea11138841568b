"""What an open aggregation's arrivals add up to, besides the aggregate itself, and the
:class:`~shoal.records.RoundRecord` it becomes.

The coordinator folds each arrival's vectors into its :class:`~shoal.pipeline.PipelineRun`
and its counts here: accepted updates, examples, loss, bytes, staleness, refusals by reason,
and what a group's aggregate (:class:`~shoal.events.PartialAggregate`: secure aggregation's
sum, an edge aggregator's upload) reports besides its vector. Plain bookkeeping: no clock,
no I/O.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from shoal.records import RoundRecord

__all__ = ["Tally"]

#: a group's metrics that are traffic, not values to record with the round
_TRAFFIC = ("upload_bytes", "download_bytes")


@dataclass
class Tally:
    """The counts of one open aggregation (a sync round or a buffered server step)."""

    started: float
    sampled: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    examples: int = 0
    loss_sum: float = 0.0
    loss_weight: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    group_metrics: dict[str, float] = field(default_factory=dict)

    def rows_folded(self, keep: np.ndarray, examples: np.ndarray, weights: np.ndarray,
                    metrics: Mapping[str, np.ndarray], staleness: int) -> None:
        """Count the rows of an arrival that were folded (``keep``, a mask over its rows;
        ``weights`` their folded weights; ``examples`` and ``metrics`` for every row)."""
        k = int(keep.sum())
        every = bool(keep.all())
        self.accepted += k
        self.examples += int(weights.sum())
        self.staleness_sum += staleness * k
        self.staleness_max = max(self.staleness_max, staleness)
        if "upload_bytes" in metrics:
            up = np.asarray(metrics["upload_bytes"])
            self.bytes_up += int(up.sum() if every else up[keep].sum())
        if "loss" in metrics:
            loss = np.asarray(metrics["loss"], dtype=np.float64)
            ok = keep & np.isfinite(loss)
            self.loss_sum += float((loss[ok] * examples[ok]).sum())
            self.loss_weight += int(examples[ok].sum())

    def group_folded(self, clients: int, examples: int, metrics: Mapping[str, float],
                     staleness: int) -> None:
        """Count a group's aggregate of ``clients`` updates and ``examples`` weight; its
        metrics other than traffic are summed into the round's record."""
        self.accepted += clients
        self.examples += examples
        self.staleness_sum += staleness * clients
        self.staleness_max = max(self.staleness_max, staleness)
        self.bytes_up += int(metrics.get("upload_bytes", 0))
        for key, value in metrics.items():
            if key not in _TRAFFIC:
                self.group_metrics[key] = self.group_metrics.get(key, 0.0) + value

    def record(self, *, round: int, version: int, committed: bool, seconds: float,
               info: Mapping[str, float], closed_by: str, attempt: int) -> RoundRecord:
        """The record of this aggregation once closed."""
        return RoundRecord(
            round=round, version=version, sampled=self.sampled, accepted=self.accepted,
            rejected=dict(self.rejected), examples=self.examples,
            train_loss=self.loss_sum / self.loss_weight if self.loss_weight else math.nan,
            committed=committed, seconds=seconds, bytes_up=self.bytes_up,
            bytes_down=self.bytes_down, privacy=dict(info), closed_by=closed_by,
            attempt=attempt, staleness_max=self.staleness_max,
            staleness_mean=self.staleness_sum / self.accepted if self.accepted else 0.0)
