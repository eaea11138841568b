"""``shoal models``: list, show, diff, promote, roll back or sign versions in a model store."""

from __future__ import annotations

import argparse
import json

from shoal.cli.report import fmt
from shoal.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list, show, diff, promote or roll back model versions in a store",
        description="Every committed global model is a version with its lineage (parent, "
                    "rounds, config hash, training plan), metrics and status (candidate / "
                    "production / rolled_back). `shoal run` commits its final model when "
                    "output.store is set. `history` prints every move of the production "
                    "pointer with its reason (the audit trail).",
        epilog="examples:\n  shoal models --store models list\n"
               "  shoal models --store models show v3\n"
               "  shoal models --store models diff v2 v3\n"
               "  shoal models --store models promote v3 --reason 'canary passed'\n"
               "  shoal models --store models rollback v2\n"
               "  shoal models --store models history\n"
               "  shoal models --store models sign v3 --keys keys",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="model store directory")
    p.add_argument("action", choices=("list", "show", "diff", "promote", "rollback",
                                      "history", "sign"))
    p.add_argument("version", nargs="?", help="version for show / promote / rollback; the "
                                              "first of diff")
    p.add_argument("other", nargs="?", help="the second version of diff")
    p.add_argument("--reason", default="", help="why (promote / rollback), kept in history")
    p.add_argument("--keys", metavar="DIR",
                   help="sign: the operator's keys (`shoal keys --out DIR`); the version's "
                        "model and plan are signed with DIR/operator.key and the signatures "
                        "kept in the store (an aggregator serves only signed versions)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from shoal.store import ModelStore
    from shoal.store.lineage import diff_versions

    readonly = args.action in ("list", "show", "diff", "history")
    if args.action == "sign" and not args.keys:
        raise ConfigError("sign needs the operator's keys: --keys DIR (`shoal keys --out DIR`)")
    if args.action != "sign" and args.keys:
        raise ConfigError("--keys is only for sign")
    with ModelStore(args.store, readonly=readonly) as store:
        if args.action == "list":
            versions = store.list()
            if args.json:
                print(json.dumps([v.to_dict() for v in versions]))
                return 0
            if not versions:
                print(f"no model versions in {args.store}")
            for v in versions:
                acc = v.metrics.get("final_accuracy", v.metrics.get("accuracy"))
                first, last = v.rounds
                span = str(last) if first == last else f"{first}-{last}"
                print(f"v{v.id:<5} {v.status:<12} rounds {span:<9} parent "
                      f"{'-' if v.parent is None else 'v' + str(v.parent):<6} "
                      f"config {(v.config_hash or '-')[:12]:<12} "
                      f"accuracy {fmt(acc) if acc is not None else 'n/a'}  "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(v.created))}")
            return 0
        if args.action == "history":
            events = [vars(e) for e in store.history()]
            if args.json:
                print(json.dumps(events))
                return 0
            for e in events:
                prev = "-" if e["previous"] is None else f"v{e['previous']}"
                print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['at']))}  "
                      f"{e['action']:<8} v{e['version']:<5} (was {prev})  {e['reason']}")
            return 0
        version = _parse_version(args.version)
        if args.action == "diff":
            diff = diff_versions(store, version, _parse_version(args.other))
            print(json.dumps(diff, indent=None if args.json else 2))
            return 0
        if args.other is not None:
            raise ConfigError(f"{args.action} takes one version, got a second: {args.other!r}")
        if args.action == "show":
            v = store.get(version)
            info = v.to_dict() | {"lineage": [x.id for x in store.lineage(version)]}
            print(json.dumps(info, indent=None if args.json else 2))
            return 0
        if args.action == "sign":
            from pathlib import Path

            from shoal.lifecycle.keys import KEY_FILE, load_signer
            from shoal.lifecycle.store_signing import sign_version

            signer = load_signer(Path(args.keys) / KEY_FILE)
            v = sign_version(store, signer, version)
            print(f"v{v.id} signed ({', '.join(sorted(v.signatures))}) with "
                  f"{signer.key.scheme} key {signer.trusted.id}")
            return 0
        now = time.time()
        v = store.promote(version, now=now, reason=args.reason) if args.action == "promote" \
            else store.rollback(version, now=now, reason=args.reason)
        print(f"v{v.id} is now {v.status}")
        return 0


def _parse_version(text: str | None) -> int:
    if text is None:
        raise ConfigError("give a model VERSION (e.g. 3 or v3)")
    try:
        return int(text[1:] if text.lower().startswith("v") else text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a model version (e.g. 3 or v3)") from None
