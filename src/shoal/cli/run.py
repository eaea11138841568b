"""``shoal run``: simulate a federated training run in this process."""

from __future__ import annotations

import argparse
import sys

from shoal.cli.options import add_run_options, config_from_args, overrides_from_args
from shoal.cli.report import banner, report

EPILOG = """\
examples:
  shoal run                               # config S, progress bar, run directory under runs/
  shoal run --rounds 10 --clients 1000 --per-round 100   # config L
  shoal run my.toml --seed 2 --json       # one JSON summary object on stdout
  shoal run --set strategy.name=fedadam --set strategy.server_lr=0.03
  shoal config > my.toml                  # every option with its default, to edit

The run directory holds config.toml (resolved), metrics.jsonl and metrics.csv (one row per
round), summary.json, model.npz (final checkpoint) and curves.png (accuracy and loss).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="simulate a federated training run",
        description="Simulate federated training with virtual clients in this process, show "
                    "progress, print a summary and write a run directory.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue from a run directory's model.npz (with its config unless "
                        "CONFIG is given); e.g. --resume runs/X/model.npz --rounds 60")
    p.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print the partition summary and engine details")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only errors (and the summary with --json)")
    p.add_argument("--log-json", dest="log_json", metavar="FILE",
                   help="append a structured log of the run (JSON lines: versions, "
                        "rejections by reason, privacy) to FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shoal.experiment import Experiment
    from shoal.telemetry import LogObserver, ProgressBar, RunDirWriter

    resume = None
    if args.resume:
        from shoal.config import parse_config
        from shoal.store import load_checkpoint

        resume = load_checkpoint(args.resume)
        if args.config is None and "config" in resume.meta:
            # continue with the checkpoint's own config; flags and --set still override
            base = parse_config(resume.meta["config"])
            cfg = base.with_overrides(overrides_from_args(args))
        else:
            cfg = config_from_args(args)
    else:
        cfg = config_from_args(args)
    banner(cfg, args)
    exp = Experiment(cfg)
    if args.verbose:
        print(exp.data.summary().format(), file=sys.stderr)
        print(f"engine: {exp.engine}; {exp.spec.size:,} parameters; start-up "
              f"{exp.startup_seconds:.2f} s", file=sys.stderr)
    state = exp.restore(resume) if resume is not None else None
    observers = [RunDirWriter(cfg)]
    if args.log_json:
        from shoal.telemetry import configure_json_logging

        configure_json_logging(open(args.log_json, "a", buffering=1))
        observers.append(LogObserver())
    progress = ProgressBar(cfg.rounds, quiet=args.quiet,
                           start=state.version if state is not None else 0)
    try:
        result = exp.run(state=state, observers=[progress, *observers])
    finally:
        progress.close()
    return report(cfg, args, exp, result, run_dir=observers[0])
