"""``shoal privacy``: plan differential privacy (epsilon for a setting, or the noise a
target epsilon needs)."""

from __future__ import annotations

import argparse
import json

from shoal.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "privacy", help="plan differential privacy: epsilon for a setting, or the noise "
                        "for a target epsilon",
        description="Compute the (epsilon, delta) of DP-FedAvg with Poisson client sampling "
                    "using Google's dp-accounting, or the noise multiplier a target epsilon "
                    "needs. Same accounting as `shoal run` with [privacy] placement = "
                    "'central' and sampling.method = 'poisson'.",
        epilog="examples:\n  shoal privacy --q 0.1 --noise-multiplier 1.0 --rounds 100\n"
               "  shoal privacy --q 0.01 --rounds 1000 --target-epsilon 2 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--q", type=float, required=True,
                   help="probability that a client takes part in a round")
    p.add_argument("--noise-multiplier", type=float, dest="noise_multiplier",
                   help="noise std divided by the clip norm (z)")
    p.add_argument("--rounds", type=int, required=True, help="number of rounds")
    p.add_argument("--delta", type=float, default=1e-5,
                   help="delta (default 1e-5; keep it below 1/population)")
    p.add_argument("--target-epsilon", type=float, dest="target_epsilon",
                   help="also find the noise multiplier that reaches this epsilon")
    p.add_argument("--accountant", choices=("rdp", "pld"), default="rdp",
                   help="dp-accounting's RDP or PLD accountant (default rdp)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shoal.privacy import privacy_report

    if args.noise_multiplier is None and args.target_epsilon is None:
        raise ConfigError("give --noise-multiplier (to compute epsilon) or --target-epsilon "
                          "(to find the noise multiplier), or both")
    z = args.noise_multiplier
    if z is None:
        from shoal.privacy import noise_multiplier_for

        z = noise_multiplier_for(args.target_epsilon, args.q, args.rounds, args.delta,
                                 args.accountant)
    report = privacy_report(args.q, z, args.rounds, args.delta, args.accountant,
                            target_epsilon=args.target_epsilon)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"epsilon = {report['epsilon']:.4f} at delta = {args.delta:g}\n"
          f"  {args.rounds} rounds, Poisson sampling rate q = {args.q:g}, noise multiplier "
          f"z = {z:.4f}, accountant {args.accountant} (dp-accounting "
          f"{report.get('dp_accounting_version', '?')})")
    if args.target_epsilon is not None:
        print(f"  for epsilon <= {args.target_epsilon:g}: noise multiplier "
              f"{report['noise_multiplier_for_target']:.4f}"
              + (f", or at z = {z:.4f} at most {report['max_rounds_at_target']} rounds"
                 if "max_rounds_at_target" in report else ""))
    for w in report.get("warnings", []):
        print(f"  warning: {w}")
    return 0
