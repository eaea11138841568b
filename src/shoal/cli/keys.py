"""``shoal keys``: the operator's signing key pair for models and training plans."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys", help="make the operator's key pair that signs models and training plans",
        description="Write operator.key (mode 0600, where models are signed: `shoal serve "
                    "--keys DIR`, `shoal launch --keys DIR`, `shoal models sign VERSION "
                    "--keys DIR`) and operator.pub (give it to every device: `shoal client "
                    "--trusted-key DIR/operator.pub`) into a directory DIR. Devices refuse "
                    "a model or plan that is unsigned or signed by another key.")
    p.add_argument("--out", default="keys", help="directory (default: keys)")
    p.add_argument("--scheme", default="ed25519", choices=("ed25519", "ml-dsa-65", "hybrid"),
                   help="ed25519 (default), ml-dsa-65 (post-quantum, FIPS 204) or hybrid "
                        "(both; a signature holds while either does)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing pair (devices trusting the old public key will "
                        "refuse what the new one signs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shoal.lifecycle.keys import load_trusted_key, write_operator_key

    Path(args.out).mkdir(parents=True, exist_ok=True)
    private, public = write_operator_key(args.out, args.scheme, overwrite=args.overwrite)
    trusted = load_trusted_key(public)
    print(f"signing key   {private}   (aggregator only: shoal serve / shoal launch / "
          f"shoal models sign --keys {args.out})\n"
          f"public key    {public}   (every device: shoal client --trusted-key {public})\n"
          f"scheme        {trusted.scheme}, key id {trusted.id}")
    return 0
