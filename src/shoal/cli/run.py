"""``shoal run``: simulate a federated training run (in this process, or on Ray)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.cli.options import add_run_options, overrides_from_args
from shoal.cli.report import banner, report
from shoal.config import Config

if TYPE_CHECKING:
    from shoal.experiment import RunResult

EPILOG = """\
examples:
  shoal run                               # config S, progress bar, run directory under runs/
  shoal run --rounds 10 --clients 1000 --per-round 100   # config L
  shoal run my.toml --seed 2 --json       # one JSON summary object on stdout
  shoal run --set strategy.name=fedadam --set strategy.server_lr=0.03
  shoal config > my.toml                  # every option with its default, to edit
  shoal run --backend ray                 # cohorts trained by Ray actors on this machine
  shoal run --backend ray --address auto  # ... on the Ray cluster this machine is part of
  shoal run --population 1000000 --per-round 1000 --trace mobile --rounds 20
                                          # a million phones that come and go, in
                                          # simulated time (data generated per client)
  shoal run --dashboard 127.0.0.1:8080    # the web dashboard, live while it runs

The run directory holds config.toml (resolved), metrics.jsonl and metrics.csv (one row per
round), summary.json, model.npz (final checkpoint) and curves.png (accuracy and loss). With
simulated device time (--trace, sim.time_model) also timeline.csv (per version: simulated and
wall time, accuracy, participants, dropouts, staleness), time_to_accuracy.png and
participation.png (how often each client trained).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="simulate a federated training run",
        description="Simulate federated training with virtual clients in this process, show "
                    "progress, print a summary and write a run directory.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue from a run directory's model.npz (with its config unless "
                        "CONFIG is given); e.g. --resume runs/X/model.npz --rounds 60")
    p.add_argument("--population", type=int, metavar="N",
                   help="simulate N clients whose data is generated on demand (data.clients "
                        "= N, data.population = 'generated'): for populations too large to "
                        "split a dataset among")
    p.add_argument("--trace", metavar="NAME|FILE",
                   help="simulate device time from a trace (sim.time_model = 'trace', "
                        "sim.trace): built-in 'mobile' or 'uniform', a .npz trace, or "
                        "FedScale's capacity pickle; see `shoal traces summary`")
    p.add_argument("--backend", choices=("local", "ray"),
                   help="who trains the cohorts (sim.backend): this process, or Ray actors "
                        "(docs/scaling.md)")
    p.add_argument("--address", metavar="auto|ray://HOST:PORT",
                   help="the Ray cluster to join (sim.ray_address; implies --backend ray); "
                        "without it a Ray is started on this machine")
    p.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print the partition summary and engine details")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only errors (and the summary with --json)")
    p.add_argument("--log-json", dest="log_json", metavar="FILE",
                   help="append a structured log of the run (JSON lines: versions, "
                        "rejections by reason, privacy) to FILE")
    p.add_argument("--dashboard", metavar="HOST:PORT",
                   help="serve the web dashboard of this run while it runs (port 0: any "
                        "free one; the URL is printed); `shoal dashboard RUN_DIR` shows it "
                        "afterwards (docs/dashboard.md)")
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The shared flags and ``--set``, plus ``--population``, ``--trace``, ``--backend``
    and ``--address``."""
    overrides = overrides_from_args(args)
    if args.population is not None:
        overrides.update({"data.clients": args.population, "data.population": "generated"})
    if args.trace is not None:
        overrides.update({"sim.time_model": "trace", "sim.trace": args.trace})
    if args.backend is not None:
        overrides["sim.backend"] = args.backend
    if args.address is not None:
        overrides.update({"sim.backend": "ray", "sim.ray_address": args.address})
    return overrides


def run(args: argparse.Namespace) -> int:
    from shoal.config import load_config
    from shoal.experiment import Experiment
    from shoal.telemetry import LogObserver, ProgressBar, RunDirWriter
    from shoal.telemetry.progress import sim_time

    resume = None
    if args.resume:
        from shoal.config import parse_config
        from shoal.store import load_checkpoint

        resume = load_checkpoint(args.resume)
        if args.config is None and "config" in resume.meta:
            # continue with the checkpoint's own config; flags and --set still override
            base = parse_config(resume.meta["config"])
            cfg = base.with_overrides(_overrides(args))
        else:
            cfg = load_config(args.config, _overrides(args))
    else:
        cfg = load_config(args.config, _overrides(args))
    if args.dashboard:
        from shoal.cli.dashboard import simulation_address

        simulation_address(cfg, args.dashboard)  # a bad address is refused before anything
    banner(cfg, args)
    exp = Experiment(cfg)
    if args.verbose:
        summary = exp.data.summary()
        if summary.num_clients < exp.data.num_clients:  # a generated population: a sample
            print(f"the first {summary.num_clients:,} of {exp.data.num_clients:,} clients "
                  f"(their data is generated on demand):", file=sys.stderr)
        print(summary.format(), file=sys.stderr)
        print(f"engine: {exp.engine}; {exp.spec.size:,} parameters; start-up "
              f"{exp.startup_seconds:.2f} s", file=sys.stderr)
    state = exp.restore(resume) if resume is not None else None
    observers = [RunDirWriter(cfg)]
    if args.log_json:
        from shoal.telemetry import configure_json_logging

        configure_json_logging(open(args.log_json, "a", buffering=1))
        observers.append(LogObserver())
    dashboard = None
    if args.dashboard:
        from shoal.cli.dashboard import serve_simulation

        dashboard = serve_simulation(cfg, observers[0].path, args.dashboard, exp.spec.size,
                                     quiet=args.quiet)
        observers.append(dashboard.observer)
    if cfg["hierarchy"]["edges"]:  # each edge's part, for the dashboard (edges.jsonl)
        from shoal.dashboard.edges import EdgeLog
        from shoal.hierarchy.tiers import observe_tiers
        from shoal.observers import Observers

        observers.append(EdgeLog(observers[0].path))
        observe_tiers(exp.pool, Observers(observers))
    timed = exp.time_model is not None
    progress = ProgressBar(cfg.rounds, quiet=args.quiet,
                           start=state.version if state is not None else 0,
                           clock=(lambda: exp.clock.now()) if timed else None)
    try:
        result = exp.run(state=state, observers=[progress, *observers])
    except BaseException as exc:
        if dashboard is not None:
            dashboard.state.set_status("failed", str(exc))
        raise
    finally:
        progress.close()
        exp.close()
        if dashboard is not None:
            if dashboard.state.status != "failed":
                dashboard.state.set_status("finished")
            dashboard.stop()
    if result.timeline:
        _write_timeline(observers[0].path, cfg, result)
    code = report(cfg, args, exp, result, run_dir=observers[0])
    if result.timeline and not (args.json or args.quiet):
        x = result.extra
        print(f"  simulated time          {sim_time(3600 * x['sim_hours'])} "
              f"({x['sim_hours_per_wall_hour']:.3g} simulated hours per wall hour)\n"
              f"  clients trained         {x['clients_trained']:,} of "
              f"{exp.pool.num_clients:,} ({x['dropouts']:,} dropped out mid-task); "
              f"timeline.csv, time_to_accuracy.png, participation.png")
    return code


def _write_timeline(path: Path, cfg: Config, result: RunResult) -> None:
    """timeline.csv, time_to_accuracy.png and participation.png in the run directory."""
    from shoal.sim.timeline import plot_participation, plot_time_to_accuracy, write_timeline

    write_timeline(path / "timeline.csv", result.timeline)
    label = f"{cfg['round']['policy']} · {cfg['sim']['time_model']}" + (
        f" {cfg['sim']['trace']}" if cfg["sim"]["time_model"] == "trace" else "")
    plot_time_to_accuracy(path / "time_to_accuracy.png", {label: result.timeline},
                          title=f"{cfg['data']['clients']:,} clients · seed {cfg.seed}")
    if result.participation is not None:
        plot_participation(path / "participation.png", result.participation)
