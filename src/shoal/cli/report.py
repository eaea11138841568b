"""What every training command shows and leaves behind: the banner, the progress bar, the
run directory, the summary (text or JSON) and the optional model-store commit."""

from __future__ import annotations

import argparse
import json
import math
import sys

from shoal.config import Config


def fmt(v: float, digits: int = 4) -> str:
    """``v`` with ``digits`` decimals, or ``n/a`` for a missing or non-finite value."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) \
        else f"{v:.{digits}f}"


def summary_lines(summary: dict, cfg: Config) -> list[str]:
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


class Progress:
    """The progress bar every training command shows (round, accuracy, loss, epsilon)."""

    def __init__(self, cfg: Config, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=cfg.rounds, unit="round", file=sys.stderr, disable=quiet,
                        dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                        "[{elapsed}<{remaining}{postfix}]")
        self.bar.set_description("round")

    def __call__(self, rec) -> None:
        if rec.eval:
            text = f"acc {fmt(rec.eval['accuracy'])}  loss {fmt(rec.eval['loss'], 3)}"
            if "epsilon" in rec.privacy:
                text += f"  eps {rec.privacy['epsilon']:.3g}"
            self.bar.set_postfix_str(text)
        if rec.round > 0:
            self.bar.update(1)

    def skip(self, rounds: int) -> None:
        self.bar.update(rounds)

    def close(self) -> None:
        self.bar.close()


def report(cfg: Config, args: argparse.Namespace, exp, result, extra: dict | None = None
           ) -> int:
    """Write the run directory and print the summary (text, or one JSON object)."""
    from shoal.rundir import make_run_dir, write_run

    run_dir = make_run_dir(cfg)
    summary = result.summary() | (extra or {})
    summary["run_dir"] = str(run_dir)
    ckpt = exp.checkpoint(result.state)
    ckpt.meta["final_accuracy"] = summary["final_accuracy"]
    write_run(run_dir, cfg, result.records, ckpt, summary)
    if cfg["output"]["store"]:
        summary["model_version"] = _commit_to_store(cfg["output"]["store"], ckpt, summary)
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in summary.items()}))
    elif not args.quiet:
        print("\n".join(summary_lines(summary, cfg)))
    return 0


def _commit_to_store(root: str, ckpt, summary: dict) -> int:
    import time

    from shoal.store import ModelStore

    metrics = {k: float(summary[k]) for k in ("final_accuracy", "final_loss", "epsilon")
               if k in summary and isinstance(summary[k], float) and math.isfinite(summary[k])}
    with ModelStore(root) as store:
        parent = store.latest()
        version = store.commit(ckpt, round=ckpt.state.version, metrics=metrics,
                               parent=parent.id if parent else None, now=time.time())
    return version.id
