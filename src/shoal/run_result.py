"""What a run returns: :class:`RunResult` (its records, final state and timings) and the
headline numbers of its summary (what ``shoal run --json`` prints)."""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass, field

import numpy as np

from shoal.params import ParamSpec
from shoal.records import RoundRecord
from shoal.strategy import ServerState

__all__ = ["RunResult", "peak_rss_mb"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class RunResult:
    """The outcome of :meth:`Experiment.run`."""

    records: list[RoundRecord]
    state: ServerState
    spec: ParamSpec
    startup_seconds: float
    wall_seconds: float  # the rounds only; the summary adds start-up
    engine: str
    stopped: str = ""
    extra: dict = field(default_factory=dict)
    stage_states: tuple = ()
    #: with simulated device time: per committed version, simulated and wall time, accuracy,
    #: participants, dropouts, staleness (:class:`~shoal.sim.timeline.TimelineRow`)
    timeline: list = field(default_factory=list)
    #: with simulated device time: accepted updates per client (who got to train)
    participation: np.ndarray | None = None

    def evaluated(self) -> list[RoundRecord]:
        return [r for r in self.records if "accuracy" in r.eval]

    def summary(self) -> dict:
        """The run's headline numbers (what ``shoal run --json`` prints)."""
        evals = self.evaluated()
        last = evals[-1].eval if evals else {}
        tail = [r.eval["accuracy"] for r in evals if r.round > 0][-5:]
        updates = sum(r.accepted for r in self.records)
        # records time rounds on the run's clock: simulated seconds under device time
        train_seconds = self.wall_seconds if "sim_hours" in self.extra else \
            sum(r.seconds for r in self.records if r.round > 0)
        trained = [r for r in self.records if r.round > 0]
        privacy = [r.privacy for r in trained if "epsilon" in r.privacy]
        extra = dict(self.extra)
        if privacy:
            extra["epsilon"] = privacy[-1]["epsilon"]
        if self.stopped:
            extra["stopped"] = self.stopped
        return {
            "final_accuracy": last.get("accuracy", math.nan),
            "final_loss": last.get("loss", math.nan),
            "mean_accuracy_last5": float(np.mean(tail)) if tail else math.nan,
            "initial_accuracy": evals[0].eval["accuracy"] if evals else math.nan,
            "rounds": self.state.version,
            "client_updates": updates,
            "updates_per_second": updates / train_seconds if train_seconds else math.nan,
            "wall_seconds": self.startup_seconds + self.wall_seconds,
            "startup_seconds": self.startup_seconds,
            "train_seconds": self.wall_seconds,
            "peak_rss_mb": peak_rss_mb(),
            "engine": self.engine,
            "num_params": self.spec.size,
            "bytes_up_per_round": float(np.mean([r.bytes_up for r in trained])) if trained
            else 0.0,
            "bytes_down_per_round": float(np.mean([r.bytes_down for r in trained])) if trained
            else 0.0,
            **extra,
        }
