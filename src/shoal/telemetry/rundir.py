"""The run directory: what a run leaves behind for people and tools.

``<output.dir>/<name>/`` holds

* ``config.toml``   -- the resolved configuration (every key; reloads to the same run);
* ``metrics.jsonl`` -- one JSON object per round (round 0 = the initial model);
* ``metrics.csv``   -- the same table for spreadsheets;
* ``summary.json``  -- the headline numbers printed at the end;
* ``model.npz``     -- the final checkpoint (see :mod:`shoal.store.checkpoint`);
* ``curves.png``    -- test accuracy and loss per round.

:class:`RunDirWriter` is an observer: ``config.toml`` is written when it is made and each
round's line is appended to ``metrics.jsonl`` as the round's record is final, so a run that
stops early leaves what it did; :meth:`RunDirWriter.finish` writes the rest.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from shoal.config import Config, to_toml
from shoal.observers import Observer
from shoal.records import RoundRecord
from shoal.store import Checkpoint, save_checkpoint

__all__ = ["RunDirWriter", "make_run_dir"]


def make_run_dir(cfg: Config) -> Path:
    """Create and return a fresh run directory under ``cfg["output"]["dir"]``."""
    parent = Path(cfg["output"]["dir"])
    name = cfg["output"]["name"] or time.strftime("%Y%m%d-%H%M%S") + f"-seed{cfg.seed}"
    path = parent / name
    suffix = 1
    while path.exists() and not cfg["output"]["name"]:
        path = parent / f"{name}-{suffix}"
        suffix += 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def _clean(v: object) -> object:
    # JSON has no NaN: write null so every line parses with strict readers.
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _json_line(record: RoundRecord) -> str:
    return json.dumps({k: _clean(v) for k, v in record.to_dict().items()}) + "\n"


class RunDirWriter(Observer):
    """Writes a run directory from the records the run reports.

    Args:
        cfg: the run's resolved configuration.
        path: the directory, created if missing (default: a fresh one from
            :func:`make_run_dir`).
    """

    def __init__(self, cfg: Config, path: Path | None = None) -> None:
        self.cfg = cfg
        self.path = path if path is not None else make_run_dir(cfg)
        self.records: list[RoundRecord] = []
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.toml").write_text(to_toml(cfg))
        (self.path / "metrics.jsonl").write_text("")

    def version_evaluated(self, record: RoundRecord) -> None:
        self.records.append(record)
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(_json_line(record))

    def finish(self, checkpoint: Checkpoint, summary: Mapping[str, object]) -> None:
        """Write the files only a finished run has: the table, the checkpoint, the curves
        and the summary."""
        write_csv(self.path / "metrics.csv", self.records)
        save_checkpoint(self.path / "model.npz", checkpoint)
        cfg = self.cfg
        plot_curves(self.path / "curves.png", self.records,
                    f"{cfg['strategy']['name']} · {cfg['model']['name']} · "
                    f"{cfg['data']['dataset']} · {cfg['data']['clients']} clients · seed "
                    f"{cfg.seed}")
        (self.path / "summary.json").write_text(
            json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2) + "\n")


def write_csv(path: Path, records: Sequence[RoundRecord]) -> None:
    """The rounds as a CSV table; a column per key any round has (blank where absent)."""
    rows = [r.to_dict() for r in records]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(rows)


def plot_curves(path: Path, records: Sequence[RoundRecord], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if "accuracy" in r.eval]
    rounds = [r.round for r in evals]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(rounds, [r.eval["accuracy"] for r in evals], marker="o", ms=3)
    ax1.set_xlabel("round")
    ax1.set_ylabel("test accuracy")
    ax1.grid(alpha=0.3)
    ax2.plot(rounds, [r.eval["loss"] for r in evals], marker="o", ms=3, color="tab:red",
             label="test loss")
    trained = [r for r in records if r.round > 0 and math.isfinite(r.train_loss)]
    ax2.plot([r.round for r in trained], [r.train_loss for r in trained], color="tab:gray",
             alpha=0.7, label="mean local training loss")
    ax2.set_xlabel("round")
    ax2.set_ylabel("cross-entropy")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
