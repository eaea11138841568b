"""The run directory: what a finished run leaves behind for people and tools.

``<output.dir>/<name>/`` holds

* ``config.toml``   -- the resolved configuration (every key; reloads to the same run);
* ``metrics.jsonl`` -- one JSON object per round (round 0 = the initial model);
* ``metrics.csv``   -- the same table for spreadsheets;
* ``summary.json``  -- the headline numbers printed at the end;
* ``model.npz``     -- the final checkpoint (see :mod:`shoal.store.checkpoint`);
* ``curves.png``    -- test accuracy and loss per round.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

from shoal.config import Config, to_toml
from shoal.records import RoundRecord
from shoal.store import Checkpoint, save_checkpoint

__all__ = ["make_run_dir", "write_run"]


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


def write_metrics(path: Path, records: Sequence[RoundRecord]) -> None:
    rows = [r.to_dict() for r in records]
    with open(path / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path / "metrics.csv", "w", newline="") as f:
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
    fig.savefig(path / "curves.png", dpi=100)
    plt.close(fig)


def write_run(path: Path, cfg: Config, records: Sequence[RoundRecord], checkpoint: Checkpoint,
              summary: dict) -> None:
    """Write every file of the run directory (see the module docstring)."""
    (path / "config.toml").write_text(to_toml(cfg))
    write_metrics(path, records)
    save_checkpoint(path / "model.npz", checkpoint)
    plot_curves(path, records, f"{cfg['strategy']['name']} · {cfg['model']['name']} · "
                f"{cfg['data']['dataset']} · {cfg['data']['clients']} clients · seed "
                f"{cfg.seed}")
    (path / "summary.json").write_text(
        json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2) + "\n")
