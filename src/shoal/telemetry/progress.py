"""The progress bar of every training command: rounds done, accuracy, loss, epsilon, the
updates the run has rejected (or lost) so far, by reason, and -- in a simulation with device
time -- the simulated time next to the wall time."""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable
from typing import TextIO

from shoal.observers import Observer
from shoal.records import RoundRecord

__all__ = ["ProgressBar", "fmt", "sim_time"]

#: how many rejection reasons the bar names (the most frequent); the rest are summed
_REASONS_SHOWN = 3


def fmt(v: float | None, digits: int = 4) -> str:
    """``v`` with ``digits`` decimals, or ``n/a`` for a missing or non-finite value."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) \
        else f"{v:.{digits}f}"


def sim_time(seconds: float) -> str:
    """Simulated time for people: ``42.0 s``, ``17.5 min``, ``3.25 h``, ``2.10 d``."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86_400:.2f} d"


class ProgressBar(Observer):
    """A tqdm bar on ``file`` (stderr) that advances as rounds are final (evaluated).

    The accuracy it shows is that of the round it counts, and the rejections are those of
    the rounds it counts plus the attempts abandoned so far, from the records (the same
    counts as the run directory's ``rejected_*`` columns).

    Args:
        rounds: the run's last version (the bar's total).
        quiet: draw nothing.
        start: the version a resumed run starts from (counted as done, not timed).
        file: where to draw.
        clock: the run's simulated time in seconds (the bar then shows it, e.g.
            ``sim 3.25 h``, beside tqdm's wall time).
    """

    def __init__(self, rounds: int, *, quiet: bool = False, start: int = 0,
                 file: TextIO | None = None, clock: Callable[[], float] | None = None
                 ) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=rounds, initial=start, unit="round", file=file or sys.stderr,
                        disable=quiet, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                        "[{elapsed}<{remaining}{postfix}]")
        self.bar.set_description("round")
        self._metrics = ""
        self._rejected: Counter[str] = Counter()
        self.clock = clock
        self._sim = ""

    @property
    def text(self) -> str:
        """What the bar shows after its counts: the last evaluation and the rejections."""
        parts = [p for p in (self._sim, self._metrics) if p]
        if self._rejected:
            top = self._rejected.most_common(_REASONS_SHOWN)
            shown = [f"{reason} {count}" for reason, count in top]
            rest = sum(self._rejected.values()) - sum(count for _, count in top)
            if rest:
                shown.append(f"other {rest}")
            parts.append("rejected " + ", ".join(shown))
        return "  ".join(parts)

    def _advance(self, version: int) -> None:
        if version > self.bar.n:
            self.bar.update(version - self.bar.n)

    def _show(self) -> None:
        self.bar.set_postfix_str(self.text, refresh=False)

    def version_committed(self, record: RoundRecord) -> None:
        if self.clock is not None:
            self._sim = f"sim {sim_time(self.clock())}"
            self._show()

    def version_evaluated(self, record: RoundRecord) -> None:
        if record.eval:
            text = f"acc {fmt(record.eval['accuracy'])}  loss {fmt(record.eval['loss'], 3)}"
            if "epsilon" in record.privacy:
                text += f"  eps {record.privacy['epsilon']:.3g}"
            self._metrics = text
        self._rejected.update(record.rejected)
        self._show()
        self._advance(record.round)

    def round_abandoned(self, record: RoundRecord, reason: str) -> None:
        self._rejected.update(record.rejected)

    def close(self) -> None:
        self._show()
        self.bar.close()
