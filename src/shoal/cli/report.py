"""What every training command shows and leaves behind: the banner, the run directory's
closing files, the summary (text or JSON) and the optional model-store commit. The progress
bar and the run directory's writer are observers (:mod:`shoal.telemetry`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING, Any

from shoal.config import Config
from shoal.telemetry.progress import fmt

if TYPE_CHECKING:
    from shoal.experiment import Experiment, RunResult
    from shoal.store.checkpoint import Checkpoint
    from shoal.telemetry.rundir import RunDirWriter

__all__ = ["banner", "fmt", "report", "summary_lines"]


def summary_lines(summary: dict[str, Any], cfg: Config) -> list[str]:
    """The text summary printed at the end of a run."""
    lines = [
        f"\ndone: {summary['rounds']} rounds in {summary['wall_seconds']:.1f} s (start-up "
        f"{summary['startup_seconds']:.1f} s, {summary['updates_per_second']:.0f} client "
        f"updates/s, engine {summary['engine']})",
        f"  final test accuracy     {fmt(summary['final_accuracy'])}",
        f"  mean of last 5 rounds   {fmt(summary['mean_accuracy_last5'])}",
        f"  initial accuracy        {fmt(summary['initial_accuracy'])}",
        f"  final test loss         {fmt(summary['final_loss'])}",
    ]
    if "epsilon" in summary:
        p = cfg["privacy"]
        lines.append(f"  privacy                 epsilon = {summary['epsilon']:.4g} at delta = "
                     f"{p['delta']:g} ({p['placement']} DP, {p['accountant']} accountant)")
    if summary.get("stopped"):
        lines.append(f"  stopped early           {summary['stopped']}")
    lines += [
        f"  traffic per round       {summary['bytes_up_per_round'] / 1e6:.3f} MB up, "
        f"{summary['bytes_down_per_round'] / 1e6:.3f} MB down",
        f"  peak memory             {summary['peak_rss_mb']:.0f} MiB",
        f"  run directory           {summary['run_dir']}",
    ]
    return lines


def banner(cfg: Config, args: argparse.Namespace, how: str = "") -> None:
    """One line on stderr saying what is about to run (nothing with ``--quiet``)."""
    if args.quiet:
        return
    smp = cfg["sampling"]
    cohort = (f"each joins a round with probability {smp['q']:g}"
              if smp["method"] == "poisson" else f"{smp['per_round']} per round")
    print(f"shoal{how}: {cfg['strategy']['name']} on {cfg['data']['dataset']}, "
          f"{cfg['data']['clients']} clients, {cohort}, {cfg.rounds} rounds, model "
          f"{cfg['model']['name']}, seed {cfg.seed}", file=sys.stderr)


def report(cfg: Config, args: argparse.Namespace, exp: Experiment, result: RunResult,
           extra: dict[str, Any] | None = None, run_dir: RunDirWriter | None = None) -> int:
    """Finish the run directory and print the summary (text, or one JSON object).

    ``run_dir`` is the :class:`~shoal.telemetry.RunDirWriter` that observed the run; without
    one, a new run directory is written from ``result.records``.
    """
    if run_dir is None:
        from shoal.telemetry.rundir import RunDirWriter

        run_dir = RunDirWriter(cfg)
        for rec in result.records:
            run_dir.version_evaluated(rec)
    summary = result.summary() | (extra or {})
    summary["run_dir"] = str(run_dir.path)
    ckpt = exp.checkpoint(result.state)
    ckpt.meta["final_accuracy"] = summary["final_accuracy"]
    run_dir.finish(ckpt, summary)
    if cfg["output"]["store"]:
        summary["model_version"] = _commit_to_store(cfg["output"]["store"], ckpt, summary)
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in summary.items()}))
    elif not args.quiet:
        print("\n".join(summary_lines(summary, cfg)))
    return 0


def _commit_to_store(root: str, ckpt: Checkpoint, summary: dict[str, Any]) -> int:
    import time

    from shoal.store import ModelStore

    metrics: dict[str, float] = {k: float(summary[k]) for k in ("final_accuracy", "final_loss", "epsilon")
               if k in summary and isinstance(summary[k], float) and math.isfinite(summary[k])}
    with ModelStore(root) as store:
        parent = store.latest()
        version = store.commit(ckpt, round=ckpt.state.version, metrics=metrics,
                               parent=parent.id if parent else None, now=time.time())
    return version.id
