"""``shoal traces``: look at, convert and generate device traces.

* ``shoal traces summary [TRACE]`` -- the distribution a trace gives a population: compute
  speed, bandwidth, model transfer time, online share and who is online hour by hour;
* ``shoal traces convert CAPACITY [AVAILABILITY] -o trace.npz`` -- FedScale's two pickles as
  one shoal trace file;
* ``shoal traces generate mobile --clients N -o trace.npz`` -- a built-in trace as a file, to
  inspect or edit and then run with ``--trace trace.npz``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shoal.sim.traces import DeviceTrace

EPILOG = """\
examples:
  shoal traces summary                          # the built-in 'mobile' trace, 100,000 devices
  shoal traces summary mobile --clients 1000000 --json
  shoal traces convert client_device_capacity client_behave_trace -o fedscale.npz
  shoal traces summary fedscale.npz
  shoal run --population 100000 --per-round 100 --trace fedscale.npz
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("traces", help="summarize, convert or generate device traces",
                       description="Device traces: compute speed, bandwidth and online "
                                   "windows of simulated devices (docs/simulation.md).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="traces_command", metavar="COMMAND")
    s = cmds.add_parser("summary", help="print a trace's distribution")
    s.add_argument("trace", nargs="?", default="mobile",
                   help="built-in name (mobile, uniform), a .npz trace or FedScale's capacity "
                        "pickle (default: mobile)")
    s.add_argument("--availability", default="",
                   help="FedScale's availability pickle, with a FedScale capacity file")
    s.add_argument("--clients", type=int, default=100_000,
                   help="population size the trace serves (default 100000)")
    s.add_argument("--seed", type=int, default=0, help="seed of a built-in trace")
    s.add_argument("--model-bytes", type=int, dest="model_bytes", default=0,
                   help="bytes of one model transfer (default: the 2NN in float32)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    c = cmds.add_parser("convert", help="FedScale's pickles -> a shoal .npz trace")
    c.add_argument("capacity", help="FedScale client_device_capacity pickle")
    c.add_argument("availability", nargs="?", default="",
                   help="FedScale client_behave_trace pickle (default: always online)")
    c.add_argument("-o", "--output", required=True, help="the .npz file to write")
    g = cmds.add_parser("generate", help="a built-in trace -> a .npz file")
    g.add_argument("name", help="mobile or uniform")
    g.add_argument("--clients", type=int, required=True, help="devices (rows) to generate")
    g.add_argument("--seed", type=int, default=0, help="the trace seed")
    g.add_argument("-o", "--output", required=True, help="the .npz file to write")
    p.set_defaults(func=run, _parser=p)


def _load(name: str, availability: str, clients: int, seed: int) -> DeviceTrace:
    from shoal.sim.devices import BUILTIN_TRACES, builtin_trace, trace_file

    if name in BUILTIN_TRACES:
        return builtin_trace(name, clients, seed=seed)
    return trace_file(name, availability)


def run(args: argparse.Namespace) -> int:
    from shoal.errors import ConfigError

    cmd = getattr(args, "traces_command", None)
    if cmd is None:
        args._parser.print_help()
        return 2
    if cmd == "summary":
        return _summary(args)
    if not args.output.endswith(".npz"):
        raise ConfigError(f"the output must be a .npz file, got {args.output!r}",
                          key="output")
    if cmd == "convert":
        from shoal.sim.traces import from_fedscale

        trace = from_fedscale(args.capacity, args.availability or None)
    else:
        trace = _load(args.name, "", args.clients, args.seed)
    trace.save(args.output)
    print(f"wrote {args.output}: {trace.capacity.rows:,} capacity rows, "
          f"{trace.availability.rows:,} availability rows ({trace.nbytes / 2**20:.1f} MiB)",
          file=sys.stderr)
    return 0


def _summary(args: argparse.Namespace) -> int:
    from shoal.sim.devices import summarize
    from shoal.uplink import raw_wire_size

    trace = _load(args.trace, args.availability, args.clients, args.seed)
    model_bytes = args.model_bytes or raw_wire_size(784 * 200 + 200 + 200 * 200 + 200
                                                    + 200 * 10 + 10)
    out = summarize(trace, args.clients, model_bytes=model_bytes)
    if args.json:  # strict JSON: an infinite bandwidth (instant transfers) becomes null
        print(json.dumps(_strict(out)))
        return 0
    print("\n".join(format_summary(out)))
    return 0


def _strict(value: object) -> object:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no inf)."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_summary(out: dict[str, Any]) -> list[str]:
    """The summary of :func:`shoal.sim.devices.summarize` as text lines."""
    pct = "  ".join(f"{int(q * 100):>8}%" for q in out["quantiles"])

    def row(label: str, values: list[float], fmt: str = "{:>9.3g}") -> str:
        return f"  {label:<28}" + "  ".join(fmt.format(v) for v in values)

    lines = [f"trace {out['name']!r} for {out['clients']:,} clients "
             f"({out['capacity_rows']:,} capacity rows, "
             f"{out['availability_rows']:,} availability rows"
             + (": always online)" if not out["availability_rows"] else ")"),
             f"  {'':<28}{pct}",
             row("compute ms / example", out["compute_ms_per_example"]),
             row("bandwidth kbit/s", out["bandwidth_kbps"]),
             row(f"model transfer s ({out['model_bytes'] / 1e6:.2f} MB)",
                 out["model_transfer_s"]),
             row("online share of period", out["online_share_of_period"])]
    if "period_h" in out:
        lines.append(row("period h", out["period_h"]))
        lines.append(f"  windows per device: {out['windows_per_device']:.2f} on average")
    hours = out["online_by_hour"]
    lines.append("  online by hour of day 1 (UTC, from the simulation's start):")
    lines.append("    " + " ".join(f"{h:02d}" for h in range(24)))
    lines.append("    " + " ".join(f"{round(100 * f):>2d}" if f < 0.995 else "**"
                                   for f in hours) + "  (% of clients; ** = all)")
    return lines
