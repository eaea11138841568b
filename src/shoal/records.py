"""What one aggregation produced: a :class:`RoundRecord` per round (sync) or server step
(buffered), one line of the run's metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["RoundRecord"]


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one round or server step.

    Attributes:
        round: the round (sync) or server step (buffered); 0 is the initial model. A
            committed one produces ``version == round``.
        version: the model version after it (unchanged when not committed).
        sampled: clients asked to train for it.
        accepted: client updates folded into the aggregate.
        rejected: reason -> count of refused updates (and of clients that failed).
        examples: training examples behind the accepted updates.
        train_loss: example-weighted mean local training loss of accepted updates.
        committed: whether the global model changed.
        eval: central evaluation metrics (e.g. ``accuracy``, ``loss``), empty if skipped.
        seconds: duration by the run's clock (simulated seconds under a simulated clock).
        bytes_up: bytes the accepted updates took on the wire (0 if the carrier did not say).
        bytes_down: bytes sent to the asked clients (model downloads).
        privacy: values the pipeline's stages reported (``epsilon``, ``secagg_dropped``, ...).
        closed_by: why it closed (``target_reached``, ``all_reported``, ``deadline``,
            ``buffer_full``, ``abandoned``, ...).
        attempt: the retry number of a synchronous round (0 = first cohort).
        staleness_max, staleness_mean: over the accepted updates (buffered aggregation).
    """

    round: int
    version: int = 0
    sampled: int = 0
    accepted: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)
    examples: int = 0
    train_loss: float = math.nan
    committed: bool = False
    eval: Mapping[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    privacy: Mapping[str, float] = field(default_factory=dict)
    closed_by: str = ""
    attempt: int = 0
    staleness_max: int = 0
    staleness_mean: float = 0.0

    def to_dict(self) -> dict:
        d = {"round": self.round, "version": self.version, "sampled": self.sampled,
             "accepted": self.accepted, "rejected": sum(self.rejected.values()),
             "examples": self.examples, "train_loss": self.train_loss,
             "committed": self.committed, "seconds": self.seconds, "bytes_up": self.bytes_up,
             "bytes_down": self.bytes_down, "staleness_max": self.staleness_max,
             "staleness_mean": self.staleness_mean}
        d.update({f"eval_{k}": v for k, v in self.eval.items()})
        d.update({f"privacy_{k}": v for k, v in self.privacy.items()})
        d.update({f"rejected_{k}": v for k, v in self.rejected.items()})
        return d
