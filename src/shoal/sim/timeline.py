"""Time-to-accuracy reports of a simulated run: per version, when it was committed on the
simulated clock and on the wall clock, how it scored, who took part and who dropped out.

:class:`Timeline` is an observer (the run adds it when device time is simulated): one
:class:`TimelineRow` per committed version (a sync round or a buffered server step), filled
with the central evaluation when that arrives. :func:`write_timeline` writes the rows as CSV,
:func:`plot_time_to_accuracy` draws accuracy against simulated hours for one or several runs
(sync against buffered on the same trace), :func:`plot_participation` the histogram of how
often each client trained, and :func:`time_to_accuracy` reads off when a run first reached a
target.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from shoal.observers import Observer
from shoal.records import RoundRecord

__all__ = ["Timeline", "TimelineRow", "plot_participation", "plot_time_to_accuracy",
           "time_to_accuracy", "write_timeline"]


@dataclass
class TimelineRow:
    """One committed version.

    Attributes:
        version: the version (0 = the initial model).
        sim_seconds: simulated time of the commit, from the start of the run.
        wall_seconds: wall time of the commit, from the start of the run.
        participants: client updates folded into it.
        sampled: clients asked for it (sync) or tasks sent while it was open (buffered).
        dropouts: clients that went offline mid-task while it was open.
        timed_out: clients past their deadline while it was open.
        staleness_mean, staleness_max: of its updates (versions behind).
        accuracy, loss: central evaluation (NaN where skipped).
        closed_by: why its aggregation closed.
    """

    version: int
    sim_seconds: float
    wall_seconds: float
    participants: int = 0
    sampled: int = 0
    dropouts: int = 0
    timed_out: int = 0
    staleness_mean: float = 0.0
    staleness_max: int = 0
    accuracy: float = math.nan
    loss: float = math.nan
    closed_by: str = ""


class Timeline(Observer):
    """Collects :class:`TimelineRow` s as the run commits and evaluates versions.

    Args:
        clock: the run's simulated time (``SimClock.now``).
        wall: the wall clock (seconds); measured from this observer's creation.
    """

    def __init__(self, clock: Callable[[], float],
                 wall: Callable[[], float] = time.perf_counter) -> None:
        self.clock, self.wall = clock, wall
        self._wall0 = wall()
        self.rows: list[TimelineRow] = []
        self._by_version: dict[int, TimelineRow] = {}

    def version_committed(self, record: RoundRecord) -> None:
        rej = record.rejected
        row = TimelineRow(version=record.version, sim_seconds=self.clock(),
                          wall_seconds=self.wall() - self._wall0,
                          participants=record.accepted, sampled=record.sampled,
                          dropouts=int(rej.get("offline", 0)),
                          timed_out=int(rej.get("timed_out", 0)),
                          staleness_mean=record.staleness_mean,
                          staleness_max=record.staleness_max, closed_by=record.closed_by)
        self.rows.append(row)
        self._by_version[row.version] = row

    def version_evaluated(self, record: RoundRecord) -> None:
        row = self._by_version.get(record.round)
        if row is None and record.round == 0:
            row = TimelineRow(version=0, sim_seconds=0.0, wall_seconds=0.0)
            self.rows.insert(0, row)
            self._by_version[0] = row
        if row is not None and record.eval:
            row.accuracy = float(record.eval.get("accuracy", math.nan))
            row.loss = float(record.eval.get("loss", math.nan))


def write_timeline(path: str | Path, rows: Sequence[TimelineRow]) -> None:
    """The rows as CSV, one column per :class:`TimelineRow` field (``sim_hours`` added)."""
    names = [f.name for f in fields(TimelineRow)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*names, "sim_hours"])
        for r in rows:
            d = asdict(r)
            w.writerow([*(d[n] for n in names), r.sim_seconds / 3600.0])


def time_to_accuracy(rows: Sequence[TimelineRow], target: float) -> float:
    """Simulated seconds at which the evaluated accuracy first reached ``target`` (``inf``
    if it never did)."""
    for r in rows:
        if math.isfinite(r.accuracy) and r.accuracy >= target:
            return r.sim_seconds
    return math.inf


def plot_time_to_accuracy(path: str | Path, runs: Mapping[str, Sequence[TimelineRow]], *,
                          title: str = "", target: float | None = None) -> None:
    """Test accuracy against simulated hours, one curve per run (e.g. sync and buffered on
    one trace); a dashed line at ``target``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in runs.items():
        pts = [(r.sim_seconds / 3600.0, r.accuracy) for r in rows if math.isfinite(r.accuracy)]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=2, label=label)
    if target is not None:
        ax.axhline(target, ls="--", color="gray", lw=1, label=f"target {target:g}")
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_participation(path: str | Path, counts: np.ndarray, *, title: str = "") -> None:
    """How many clients trained 0, 1, 2, ... times (who gets to train), log-scaled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = np.bincount(np.asarray(counts, np.int64))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(np.arange(hist.size), hist, width=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("accepted updates per client")
    ax.set_ylabel("clients")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title or f"{int((counts > 0).sum()):,} of {counts.size:,} clients trained")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
