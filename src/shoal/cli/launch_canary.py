"""``shoal launch --canary VERSION``: a canary rollout over gRPC instead of training.

The aggregator serves the model store in ``--dir`` signed with the operator's key
(:class:`~shoal.transport.serving.ModelServing`): the candidate to the devices inside the
canary (stable hash of the device id), production to the rest. Each evaluation round the
candidate is evaluated by a cohort inside the canary and production by an equally large
cohort outside it (:func:`~shoal.transport.evaluation_carrier.run_canary_deployed`), on the
devices' held-out splits, until the rule (:class:`~shoal.lifecycle.canary.CanaryRule`)
promotes or rolls back; every step goes to ``--dir``'s ``audit.jsonl``. The device processes
verify every model with the operator's public key and fetch their served model between tasks
(``shoal client --trusted-key --served-every --holdout``). The dashboard (on unless
``--no-dashboard``) shows the canary as the audit log records it, live, beside the store
read-only: the canary alone moves the production pointer while it runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.config import Config
from shoal.errors import ConfigError

__all__ = ["add_canary_options", "canary_overrides", "client_args", "run_canary_phase"]

log = logging.getLogger("shoal.aggregator")


def add_canary_options(p: argparse.ArgumentParser) -> None:
    """``--canary VERSION`` and the flags of the rollout, each stored under the ``[canary]``
    key it overrides (:func:`canary_overrides`)."""
    g = p.add_argument_group("canary rollout (instead of training)")
    g.add_argument("--canary", type=int, metavar="VERSION",
                   help="serve candidate VERSION of the model store in --dir to a fraction "
                        "of the devices, compare it with production by federated evaluation "
                        "and promote or roll back automatically (docs/lifecycle.md)")
    g.add_argument("--canary-fraction", dest="canary.fraction", type=float, metavar="SHARE",
                   help="share of devices served the candidate (canary.fraction, default 0.1)")
    g.add_argument("--keys", metavar="DIR",
                   help="the operator's keys (`shoal keys --out DIR`). Training: every "
                        "download and committed version is signed and every device process "
                        "verifies with --trusted-key DIR/operator.pub. --canary: the served "
                        "versions' key, default DIR/keys in --dir, made (ed25519) if "
                        "missing")
    g.add_argument("--canary-cohort", dest="canary.cohort", type=int, metavar="N",
                   help="devices per arm per evaluation round (canary.cohort, default 30)")
    g.add_argument("--min-clients", dest="canary.min_clients", type=int, metavar="N",
                   help="the rule's minimum sample per arm (canary.min_clients, default 30)")
    g.add_argument("--alpha", dest="canary.alpha", type=float, metavar="ALPHA",
                   help="level of each one-sided test (canary.alpha, default 0.05)")
    g.add_argument("--margin", dest="canary.margin", type=float, metavar="LOSS",
                   help="how much worse in loss the candidate may be and still count as not "
                        "worse (canary.margin, default 0)")
    g.add_argument("--loss-cap", dest="canary.cap", type=float, metavar="CAP",
                   help="reported losses are bounded to [0, CAP] (canary.cap, default 10)")
    g.add_argument("--trim", dest="canary.trim", type=float, metavar="SHARE",
                   help="share of each arm cut from either end before comparing "
                        "(Yuen's trimmed test; canary.trim, default 0.1, 0 = Welch's test)")
    g.add_argument("--max-evaluations", dest="canary.max_rounds", type=int, metavar="N",
                   help="evaluation rounds before an undecided canary is rolled back "
                        "(canary.max_rounds, default 10)")
    g.add_argument("--evaluation-timeout", dest="canary.evaluation_timeout_s",
                   type=float, metavar="SECONDS",
                   help="seconds each evaluation round waits for reports "
                        "(canary.evaluation_timeout_s, default 60)")
    g.add_argument("--holdout", dest="canary.holdout", type=float, metavar="SHARE",
                   help="share of each device's examples it evaluates on (canary.holdout, "
                        "default 0.2)")
    g.add_argument("--segment-by", dest="canary.segment_by", metavar="ATTR",
                   help="break evaluations down by this device attribute (canary.segment_by; "
                        "e.g. with --attr os=android,ios)")


def canary_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``[canary]`` keys the flags given override (each flag's destination is its key;
    a flag not given leaves the config's value, or the default)."""
    return {key: value for key, value in vars(args).items()
            if key.startswith("canary.") and value is not None}


def client_args(cfg: Config, keys: Path) -> list[str]:
    """What every device process of a canary is started with."""
    return ["--trusted-key", str(keys / "operator.pub"), "--served-every", "2",
            "--holdout", str(cfg["canary"]["holdout"])]


def operator_keys(args: argparse.Namespace, work: Path) -> Path:
    """The keys directory of a canary (made, ed25519, when it is ``--dir``'s default and
    missing)."""
    from shoal.lifecycle.keys import write_operator_key

    if args.keys:
        return Path(args.keys)
    keys = work / "keys"
    if not (keys / "operator.key").exists():
        keys.mkdir(parents=True, exist_ok=True)
        write_operator_key(keys, "ed25519")
    return keys


def run_canary_phase(cfg: Config, args: argparse.Namespace, paths: Any, keys: Path,
                     on_ready: Callable[[int], None]) -> dict[str, Any]:
    """Serve the canary of ``args.canary`` until its rule decides; returns the summary.

    Raises:
        ConfigError: no production version, a candidate that is not one, bad rule
            settings, or too few devices within ``deploy.wait_timeout_s``.
        KeyFileError: the signing key is missing or unusable.
    """
    from shoal.cli.dashboard import Operations
    from shoal.deploy import settings_from_config, wait_for_devices
    from shoal.lifecycle.audit import AuditLog, read_audit
    from shoal.observers import Observers
    from shoal.lifecycle.canary import Canary, CanaryRule
    from shoal.lifecycle.keys import load_signer
    from shoal.lifecycle.store_signing import sign_version
    from shoal.registry import SQLiteRegistry
    from shoal.store import ModelStore
    from shoal.transport.auth import Keyring, load_or_create_secret
    from shoal.transport.certs import load_client_ca
    from shoal.transport.evaluation_carrier import EvaluationCarrier, run_canary_deployed
    from shoal.transport.revocation import RevocationFile
    from shoal.transport.server import AggregatorService, serve
    from shoal.transport.serving import ModelServing

    d, c = cfg["deploy"], cfg["canary"]
    rule = CanaryRule(min_clients=c["min_clients"], alpha=c["alpha"], margin=c["margin"],
                      max_rounds=c["max_rounds"], cap=c["cap"], trim=c["trim"])
    signer = load_signer(keys / "operator.key")
    audit_path = Path(paths.store).parent / "audit.jsonl"
    asked = args.dashboard or cfg["dashboard"]["address"]
    with ModelStore(paths.store) as store, Operations(
            cfg, audit_path.parent, paths.registry, quiet=args.quiet, optional=not asked,
            log_events=bool(args.log_json),
            address="" if args.no_dashboard else asked or "127.0.0.1:0") as ops:
        prod = store.production()
        if prod is None:
            raise ConfigError(f"the model store {paths.store} has no production version to "
                              f"compare the candidate with (shoal models promote)",
                              key="canary")
        spec = store.load(prod.id).spec
        serving = ModelServing(store, key=signer.trusted)
        tls = client_ca = None
        if paths.tls_dir is not None:
            tls = ((paths.tls_dir / "server.pem").read_bytes(),
                   (paths.tls_dir / "server.key").read_bytes())
        if paths.client_ca is not None:
            client_ca = load_client_ca(paths.client_ca, now=dt.datetime.now(dt.timezone.utc))
        service = AggregatorService(
            settings_from_config(cfg), Keyring.single(load_or_create_secret(paths.secret)),
            spec.size, spec.fingerprint, lambda: SQLiteRegistry(paths.registry),
            revocations=RevocationFile(paths.revoked) if paths.revoked else None,
            serving=serving, signer=signer, segment_by=c["segment_by"],
            metrics=Observers(ops.observers))
        state = ops.dashboard.state if ops.dashboard is not None else None
        if state is not None:
            ops.on_store(ModelStore(paths.store, readonly=True), threading.Lock())
            if audit_path.exists():  # earlier canaries of this store
                for entry in read_audit(audit_path):
                    state.add_audit(entry)
            state.set_status("waiting", f"for devices; then a canary of v{args.canary}")
        canary = Canary(store, args.canary, c["fraction"], now=time.time(),
                        rule=rule, audit=AuditLog(audit_path, listener=state.add_audit
                                                  if state is not None else None))
        # the two versions compared are signed here (once the canary has checked them),
        # with the key the operator gave, before anything is served: serving never signs
        for version in (canary.production, canary.candidate):
            sign_version(store, signer, version)
        serving.canary = canary
        port, stop = serve(service, d["host"], d["port"], tls=tls, client_ca=client_ca)
        try:
            on_ready(port)
            devices = wait_for_devices(service.registry,
                                       d["wait_devices"] or cfg["data"]["clients"],
                                       d["wait_timeout_s"], service)
            if state is not None:
                state.set_status("running", f"canary of v{canary.candidate}")
            with EvaluationCarrier(service, devices, seed=cfg.seed) as carrier:
                outcome = run_canary_deployed(canary, carrier, cohort=c["cohort"],
                                              seed=cfg.seed,
                                              timeout_s=c["evaluation_timeout_s"])
        finally:
            stop()
        v = outcome.verdict
        production_now = store.production()
        # checked above: there was one, and promote and rollback only ever move the pointer
        assert production_now is not None
        return {"canary": {"candidate": canary.candidate, "production": canary.production,
                           "fraction": canary.fraction, "salt": canary.salt},
                "decision": v.decision, "reason": v.reason, "evaluations": outcome.rounds,
                "n_candidate": v.n_candidate, "n_production": v.n_production,
                "mean_candidate": v.mean_candidate, "mean_production": v.mean_production,
                "production_now": production_now.id,
                "canary_devices": sorted(outcome.canary_devices),
                "reached": {str(k): sorted(x) for k, x in outcome.reached.items()},
                "audit": str(audit_path)}
