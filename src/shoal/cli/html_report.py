"""``shoal report``: one self-contained HTML file of a run directory (plots and tables)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="write a self-contained HTML report of a run directory",
        description="Write one HTML file with a run's plots and tables (accuracy and loss, "
                    "time per round, clients, traffic, privacy) and its summary; it opens "
                    "offline, from a file, for papers and tickets.",
        epilog="example:\n  shoal report runs/20261207-120451-seed0   # -> runs/.../report.html",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run directory (runs/<name>)")
    p.add_argument("-o", "--out", help="the HTML file (default: RUN_DIR/report.html)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shoal.cli.report import summary_lines
    from shoal.config import load_config
    from shoal.dashboard.report import write_report

    run_dir = Path(args.run_dir)
    lines: list[str] = []
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        summary = {k: (float("nan") if v is None else v)
                   for k, v in json.loads(summary_file.read_text()).items()}
        lines = summary_lines(summary, load_config(run_dir / "config.toml"))
    out = write_report(run_dir, args.out or run_dir / "report.html", lines)
    print(out)
    print(f"shoal report: wrote {out} ({out.stat().st_size / 1e3:.0f} kB)", file=sys.stderr)
    return 0
