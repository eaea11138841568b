"""The ``shoal`` command.

``main(argv)`` returns an exit code instead of exiting, so tests run the CLI in process.
Exit codes: 0 success, 2 a usage or configuration error (the message says what to change),
1 any other shoal error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from shoal.config import Config, config_markdown, load_config, to_toml
from shoal.errors import BudgetExhausted, ConfigError, DataError, ShoalError

__all__ = ["main"]

DESCRIPTION = """\
shoal: federated learning at very large scale.

Train one model from the private data of many clients without moving the data. `shoal run`
simulates a federated training run in this process (virtual clients over a shared dataset);
with no config file it runs the reference workload "config S": Fashion-MNIST split among 100
clients by a Dirichlet(0.5) label skew, 10 clients per round, 30 rounds of FedAvg on a
784-200-200-10 MLP. `shoal launch` runs the same round engine as a real deployment on this
machine (a gRPC aggregator and one process per device, TLS on loopback); `shoal serve` and
`shoal client` run the two sides separately.
"""

RUN_EPILOG = """\
examples:
  shoal run                               # config S, progress bar, run directory under runs/
  shoal run --rounds 10 --clients 1000 --per-round 100   # config L
  shoal run my.toml --seed 2 --json       # one JSON summary object on stdout
  shoal run --set strategy.name=fedadam --set strategy.server_lr=0.03
  shoal config > my.toml                  # every option with its default, to edit

The run directory holds config.toml (resolved), metrics.jsonl and metrics.csv (one row per
round), summary.json, model.npz (final checkpoint) and curves.png (accuracy and loss).
"""


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as TOML scalars (``0.1``, ``true``, ``"x"``),
    bare words as strings."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out[key.strip()] = value
    return out


def _overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides = _parse_set(args.set or [])
    for flag, key in (("rounds", "rounds"), ("clients", "data.clients"),
                      ("per_round", "sampling.per_round"), ("seed", "seed"),
                      ("out", "output.dir")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return overrides


def _config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, _overrides_from_args(args))


def _fmt(v: float, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) \
        else f"{v:.{digits}f}"


def _summary_lines(summary: dict, cfg: Config) -> list[str]:
    lines = [
        f"\ndone: {summary['rounds']} rounds in {summary['wall_seconds']:.1f} s (start-up "
        f"{summary['startup_seconds']:.1f} s, {summary['updates_per_second']:.0f} client "
        f"updates/s, engine {summary['engine']})",
        f"  final test accuracy     {_fmt(summary['final_accuracy'])}",
        f"  mean of last 5 rounds   {_fmt(summary['mean_accuracy_last5'])}",
        f"  initial accuracy        {_fmt(summary['initial_accuracy'])}",
        f"  final test loss         {_fmt(summary['final_loss'])}",
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


def _banner(cfg: Config, args: argparse.Namespace, how: str = "") -> None:
    if args.quiet:
        return
    smp = cfg["sampling"]
    cohort = (f"each joins a round with probability {smp['q']:g}"
              if smp["method"] == "poisson" else f"{smp['per_round']} per round")
    print(f"shoal{how}: {cfg['strategy']['name']} on {cfg['data']['dataset']}, "
          f"{cfg['data']['clients']} clients, {cohort}, {cfg.rounds} rounds, model "
          f"{cfg['model']['name']}, seed {cfg.seed}", file=sys.stderr)


class _Progress:
    """The progress bar every training command shows (round, accuracy, loss, epsilon)."""

    def __init__(self, cfg: Config, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=cfg.rounds, unit="round", file=sys.stderr, disable=quiet,
                        dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                        "[{elapsed}<{remaining}{postfix}]")
        self.bar.set_description("round")

    def __call__(self, rec) -> None:
        if rec.eval:
            text = f"acc {_fmt(rec.eval['accuracy'])}  loss {_fmt(rec.eval['loss'], 3)}"
            if "epsilon" in rec.privacy:
                text += f"  eps {rec.privacy['epsilon']:.3g}"
            self.bar.set_postfix_str(text)
        if rec.round > 0:
            self.bar.update(1)

    def skip(self, rounds: int) -> None:
        self.bar.update(rounds)

    def close(self) -> None:
        self.bar.close()


def _report(cfg: Config, args: argparse.Namespace, exp, result, extra: dict | None = None
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
        print("\n".join(_summary_lines(summary, cfg)))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from shoal.sim.experiment import Experiment

    resume = None
    if args.resume:
        from shoal.config import parse_config
        from shoal.store import load_checkpoint

        resume = load_checkpoint(args.resume)
        if args.config is None and "config" in resume.meta:
            # continue with the checkpoint's own config; flags and --set still override
            base = parse_config(resume.meta["config"])
            cfg = base.with_overrides(_overrides_from_args(args))
        else:
            cfg = _config_from_args(args)
    else:
        cfg = _config_from_args(args)
    _banner(cfg, args)
    exp = Experiment(cfg)
    if args.verbose:
        print(exp.data.summary().format(), file=sys.stderr)
        print(f"engine: {exp.engine}; {exp.spec.size:,} parameters; start-up "
              f"{exp.startup_seconds:.2f} s", file=sys.stderr)
    progress = _Progress(cfg, args.quiet)
    state = exp.restore(resume) if resume is not None else None
    if state is not None:
        progress.skip(state.round)
    try:
        result = exp.run(progress, state=state)
    finally:
        progress.close()
    return _report(cfg, args, exp, result)


def _cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shoal.deploy import AggregatorPaths, run_aggregator

    cfg = _config_from_args(args)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    paths = AggregatorPaths(secret=Path(args.secret) if args.secret else work / "secret",
                            registry=work / "registry.db", store=work / "models",
                            tls_dir=Path(args.certs) if args.certs else None,
                            port_file=work / "port",
                            client_ca=Path(args.client_ca) if args.client_ca else None,
                            revoked=work / "revoked.json")
    if args.log_json:
        from shoal.telemetry import configure_json_logging

        configure_json_logging(open(args.log_json, "a", buffering=1))
    _banner(cfg, args, " aggregator")
    progress = _Progress(cfg, args.quiet)

    security = ("mutual TLS" if paths.client_ca else "TLS" if paths.tls_dir
                else "no TLS, loopback only")

    def ready(port: int) -> None:
        if not args.quiet:
            print(f"aggregator listening on {cfg['deploy']['host']}:{port} ({security}); "
                  f"waiting for devices", file=sys.stderr)

    try:
        exp, result = run_aggregator(cfg, paths, on_round=progress, on_ready=ready)
    finally:
        progress.close()
    return _report(cfg, args, exp, result)


def _cmd_client(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading
    from pathlib import Path

    from shoal.sim.experiment import load_data
    from shoal.training import LocalTrainConfig
    from shoal.transport.client import DeviceClient
    from shoal.transport.reference import fmnist_evaluate_fn, fmnist_train_fn

    if (args.cert is None) != (args.key is None):
        raise ConfigError("--cert and --key go together (the client certificate for mutual "
                          "TLS and its private key)", key="cert")
    if args.cert is not None and args.ca is None:
        raise ConfigError("a client certificate needs TLS: give --ca too", key="cert")
    device = args.device_id or f"device-{args.index:04d}"
    client_cert = None
    if args.cert is not None:
        client_cert = _client_certificate(args.cert, args.key, device)
    cfg = _config_from_args(args)
    data = load_data(cfg)
    if not 0 <= args.index < data.num_clients:
        raise ConfigError(f"--index {args.index} is not a client of this config (0 .. "
                          f"{data.num_clients - 1})", key="index")
    idx = data.client_indices[args.index]
    local = LocalTrainConfig(epochs=cfg["client"]["epochs"],
                             batch_size=cfg["client"]["batch_size"], lr=cfg["client"]["lr"])
    train = fmnist_train_fn(cfg["model"]["name"], data.train.x[idx], data.train.y[idx], local,
                            cfg.seed, args.index, num_classes=data.train.num_classes)
    evaluate = fmnist_evaluate_fn(cfg["model"]["name"], data.train.x[idx], data.train.y[idx],
                                  seed=cfg.seed, num_classes=data.train.num_classes)
    token = Path(args.token).read_text().strip()
    ca = Path(args.ca).read_bytes() if args.ca else None
    if ca is None and not args.server.startswith(("127.0.0.1:", "localhost:", "[::1]:")):
        raise ConfigError("--ca is required for a server that is not on this machine "
                          "(connections are TLS)", key="ca")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    def die_after(stage: str, rnd: int) -> None:
        if stage == args.die_after:
            print(f"{device}: --die-after {stage}: killing myself in round {rnd}",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    with DeviceClient(args.server, token, device, root_certificates=ca,
                      client_cert=client_cert, train=train,
                      evaluate=evaluate, attributes={"index": str(args.index)},
                      max_retries=args.max_retries,
                      after_stage=die_after if args.die_after else None) as client:
        stats = client.run(max_rounds=args.max_tasks, stop=stop)
    if not args.quiet:
        print(json.dumps({"device": device, **stats.__dict__}), file=sys.stderr)
    return 0


def _client_certificate(cert: str, key: str, device: str) -> tuple[bytes, bytes]:
    """``(chain, key)`` PEM for mutual TLS, checked here so that a wrong pair is a clear
    error at start-up and not an endless retry of failing handshakes."""
    import datetime as dt
    from pathlib import Path

    from shoal.transport.certs import client_identity, load_pem_check

    load_pem_check(cert, key, now=dt.datetime.now(dt.timezone.utc))
    chain = Path(cert).read_bytes()
    named = client_identity(chain)
    if named != device:
        raise ConfigError(f"the client certificate {cert} names "
                          f"{named if named else 'no single valid device name'}, but this "
                          f"device is {device!r}: the aggregator would refuse every call",
                          key="cert")
    return chain, Path(key).read_bytes()


def _cmd_launch(args: argparse.Namespace) -> int:
    import datetime as dt
    import os
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    from shoal.config import to_toml
    from shoal.deploy import AggregatorPaths, check_deployable, run_aggregator
    from shoal.store.atomic import replace_atomically
    from shoal.transport.auth import issue_token, load_or_create_secret
    from shoal.transport.certs import make_client_cert, make_local_pki

    cfg = _config_from_args(args)
    deaths = _parse_die_after(args.die_after, cfg["data"]["clients"])
    check_deployable(cfg, tls=True, mutual_tls=args.mtls)  # before writing certs and tokens
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="shoal-launch-"))
    work.mkdir(parents=True, exist_ok=True)
    n = cfg["data"]["clients"]
    cfg_path = work / "config.toml"
    cfg_path.write_text(to_toml(cfg))
    pki = make_local_pki(work / "certs", days=2, now=dt.datetime.now(dt.timezone.utc),
                         overwrite=True)
    secret = load_or_create_secret(work / "secret")
    tokens = work / "tokens"
    tokens.mkdir(exist_ok=True)
    for i in range(n):
        replace_atomically(tokens / f"device-{i:04d}", issue_token(
            secret, f"device-{i:04d}", now=time.time(),
            ttl_seconds=2 * 86400).encode(), mode=0o600)
    client_certs = [make_client_cert(work / "certs", name=f"device-{i:04d}",
                                     ca_cert=pki.ca_cert, ca_key=pki.ca_key, days=2,
                                     now=dt.datetime.now(dt.timezone.utc), overwrite=True)
                    for i in range(n)] if args.mtls else []
    paths = AggregatorPaths(secret=work / "secret", registry=work / "registry.db",
                            store=work / "models", tls_dir=work / "certs",
                            port_file=work / "port",
                            client_ca=pki.ca_cert if args.mtls else None,
                            revoked=work / "revoked.json")
    security = "mutual TLS" if args.mtls else "TLS"
    _banner(cfg, args, f" launch ({n} client processes, {security} on loopback, state in "
                       f"{work})")
    procs: list[subprocess.Popen] = []
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def start_clients(port: int) -> None:
        for i in range(n):
            cmd = [sys.executable, "-m", "shoal.cli", "client", str(cfg_path), "--server",
                   f"localhost:{port}", "--token", str(tokens / f"device-{i:04d}"),
                   "--ca", str(pki.ca_cert), "--index", str(i)]
            if client_certs:
                cmd += ["--cert", str(client_certs[i].cert), "--key", str(client_certs[i].key)]
            if i < len(deaths):
                cmd += ["--die-after", deaths[i]]
            with open(logs / f"device-{i:04d}.log", "w") as log_file:
                procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                              env=env))

    if args.log_json:
        from shoal.telemetry import configure_json_logging

        configure_json_logging(open(args.log_json, "a", buffering=1))
    progress = _Progress(cfg, args.quiet)
    try:
        exp, result = run_aggregator(cfg, paths, on_round=progress, on_ready=start_clients)
    finally:
        progress.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    return _report(cfg, args, exp, result, {"client_processes": n, "work_dir": str(work)})


_SECAGG_STAGES = ("advertise_keys", "share_keys", "masked_input", "unmasking")


def _parse_die_after(specs: Sequence[str], clients: int) -> list[str]:
    """``["share_keys:2", "masked_input:1"]`` -> the stage for client 0, 1, 2, ..."""
    out: list[str] = []
    for spec in specs:
        stage, _, count = spec.partition(":")
        if stage not in _SECAGG_STAGES or not count.isdigit():
            raise ConfigError(f"--die-after {spec!r}: expected STAGE:N with STAGE one of "
                              f"{', '.join(_SECAGG_STAGES)}", key="die_after")
        out += [stage] * int(count)
    if len(out) > clients:
        raise ConfigError(f"--die-after asks {len(out)} client processes to die; there are "
                          f"{clients}", key="die_after")
    return out


def _commit_to_store(root: str, ckpt, summary: dict) -> int:
    import time

    from shoal.store import ModelStore

    metrics = {k: float(summary[k]) for k in ("final_accuracy", "final_loss", "epsilon")
               if k in summary and isinstance(summary[k], float) and math.isfinite(summary[k])}
    with ModelStore(root) as store:
        parent = store.latest()
        version = store.commit(ckpt, round=ckpt.state.round, metrics=metrics,
                               parent=parent.id if parent else None, now=time.time())
    return version.id


def _cmd_models(args: argparse.Namespace) -> int:
    import time

    from shoal.store import ModelStore

    readonly = args.action in ("list", "show")
    with ModelStore(args.store, readonly=readonly) as store:
        if args.action == "list":
            versions = store.list()
            if args.json:
                print(json.dumps([v.to_dict() for v in versions]))
                return 0
            if not versions:
                print(f"no model versions in {args.store}")
            for v in versions:
                acc = v.metrics.get("final_accuracy")
                print(f"v{v.id:<5} {v.status:<12} round {v.round:<6} parent "
                      f"{'-' if v.parent is None else 'v' + str(v.parent):<6} "
                      f"accuracy {_fmt(acc) if acc is not None else 'n/a'}  "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(v.created))}")
            return 0
        version = _parse_version(args.version)
        if args.action == "show":
            v = store.get(version)
            info = v.to_dict() | {"lineage": [x.id for x in store.lineage(version)]}
            print(json.dumps(info, indent=None if args.json else 2))
            return 0
        now = time.time()
        v = store.promote(version, now=now) if args.action == "promote" \
            else store.rollback(version, now=now)
        print(f"v{v.id} is now {v.status}")
        return 0


def _parse_version(text: str | None) -> int:
    if text is None:
        raise ConfigError("give a model VERSION (e.g. 3 or v3)")
    try:
        return int(text[1:] if text.lower().startswith("v") else text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a model version (e.g. 3 or v3)") from None


def _cmd_certs(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone
    from pathlib import Path

    from shoal.transport.certs import make_client_cert, make_local_pki

    out, now = Path(args.out), datetime.now(timezone.utc)
    if args.client and (out / "ca.pem").exists():
        if args.hostname:
            raise ConfigError(f"--hostname names the server certificate of a new CA, but "
                              f"{out / 'ca.pem'} exists: --client issues with it and makes "
                              f"no server certificate", key="hostname")
        existing = [p for n in args.client for p in (out / f"client-{n}.pem",
                                                   out / f"client-{n}.key") if p.exists()]
        if existing and not args.overwrite:  # check all before writing any
            raise ConfigError(f"{existing[0]} already exists; pass --overwrite to replace "
                              f"it", key="client")
    if not args.client or not (out / "ca.pem").exists():
        paths = make_local_pki(out, hostnames=tuple(args.hostname or ()), days=args.days,
                               now=now, overwrite=args.overwrite)
        print(f"CA certificate      {paths.ca_cert}   (give this to clients)\n"
              f"CA key              {paths.ca_key}   (keep offline; signs client "
              f"certificates)\n"
              f"server certificate  {paths.server_cert}\n"
              f"server key          {paths.server_key}")
    for name in args.client or ():
        c = make_client_cert(out, name=name, ca_cert=out / "ca.pem", ca_key=out / "ca.key",
                             days=args.days, now=now, overwrite=args.overwrite)
        print(f"client {name:<12} {c.cert}, {c.key}   (shoal client --device-id {name} "
              f"--cert {c.cert} --key {c.key})")
    return 0


def _enrolment_log(secret: Path) -> Path:
    """Where ``shoal enroll`` records the ids of the tokens it issued: next to the secret."""
    return secret.with_name("enrolled.jsonl")


def _record_enrolment(secret: Path, claims) -> None:
    """Append ``{device, jti, iat, exp}`` to the enrolment log (no secrets: the token itself
    is not kept), so that ``shoal revoke --device`` can revoke a token nobody kept."""
    import os

    line = json.dumps({"device": claims.sub, "jti": claims.jti, "iat": claims.iat,
                       "exp": claims.exp}) + "\n"
    fd = os.open(_enrolment_log(secret), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _cmd_enroll(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from shoal.store.atomic import replace_atomically
    from shoal.transport.auth import issue_token, load_or_create_secret, verify_token

    secret = load_or_create_secret(args.secret)
    now = time.time()
    token = issue_token(secret, args.device_id, now=now, ttl_seconds=int(args.days * 86400))
    _record_enrolment(Path(args.secret), verify_token(secret, token, now=now))
    if args.out:
        replace_atomically(args.out, (token + "\n").encode(), mode=0o600)
        print(f"token for {args.device_id!r} written to {args.out} (valid {args.days:g} days)")
    else:
        print(token)
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    import fcntl
    import time
    from pathlib import Path

    from shoal.store.atomic import fsync_dir, replace_atomically
    from shoal.transport.auth import (AuthError, RevocationFile, load_or_create_secret,
                                      verify_token)

    if (args.token is None) == (args.device is None):
        raise ConfigError("give a token file or --device (not both)", key="token")
    listed = Path(args.list)
    if not Path(args.secret).is_file():
        raise ConfigError(f"secret file {args.secret} does not exist (the aggregator's "
                          f"DIR/secret)", key="secret")
    now = time.time()
    if args.token is not None:
        token_file = Path(args.token)
        if not token_file.is_file():
            raise ConfigError(f"token file {args.token} does not exist (give the file `shoal "
                              f"enroll --out` wrote, not the token itself)", key="token")
        try:
            # signature and claims only: a token not yet valid (or already expired) is
            # still this aggregator's, and only expiry makes revoking it pointless
            claims = verify_token(load_or_create_secret(args.secret),
                                  token_file.read_text().strip(), now=now,
                                  leeway_seconds=1e12)
        except AuthError as exc:
            raise ConfigError(f"{args.token} is not a token of this aggregator "
                              f"({exc.reason}: {exc})", key="token") from None
        targets = [(claims.sub, claims.jti, claims.exp)]
    else:
        log = _enrolment_log(Path(args.secret))
        targets = []
        lines = log.read_text().splitlines() if log.is_file() else []
        for number, line in enumerate(lines, start=1):
            try:
                r = json.loads(line)
                if r["device"] == args.device:
                    targets.append((r["device"], str(r["jti"]), int(r["exp"])))
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{log}, line {number}: not an enrolment record",
                                  key="device") from None
        if not targets:
            raise ConfigError(f"no token of {args.device!r} is recorded in {log} (tokens "
                              f"issued by `shoal enroll` with this secret are)", key="device")
    targets = [t for t in targets if now < t[2] + 60]
    if not targets:
        print("the token(s) expired already; nothing to revoke")
        return 0
    listed.parent.mkdir(parents=True, exist_ok=True)
    with open(listed.with_name(listed.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent revokes must not drop each other's
        updated = RevocationFile(listed).current()  # refuses a malformed list
        for _, jti, exp in targets:
            updated = updated.revoke(jti, exp)
        updated = updated.prune(now)
        replace_atomically(listed, (updated.to_json() + "\n").encode(), mode=0o644)
        fsync_dir(listed.parent)
    for device, jti, _ in targets:
        print(f"revoked a token of {device!r} (id {jti}) in {args.list}")
    print(f"a running aggregator refuses it within a second ({len(updated)} revoked tokens "
          f"listed)")
    return 0


def _cmd_privacy(args: argparse.Namespace) -> int:
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


def _cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(config_markdown())
        return 0
    sys.stdout.write(to_toml(_config_from_args(args)))
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config file (default: config S)")
    p.add_argument("--rounds", type=int, help="number of rounds (config key: rounds)")
    p.add_argument("--clients", type=int, help="number of clients (data.clients)")
    p.add_argument("--per-round", type=int, dest="per_round",
                   help="clients sampled per round (sampling.per_round)")
    p.add_argument("--seed", type=int, help="run seed (seed)")
    p.add_argument("--out", help="parent directory of run directories (output.dir)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key, e.g. --set client.lr=0.1 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `shoal COMMAND --help` for a command's options. Docs: docs/ in the "
               "source tree; every config option: docs/configuration.md.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="simulate a federated training run",
        description="Simulate federated training with virtual clients in this process, show "
                    "progress, print a summary and write a run directory.",
        epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(run)
    run.add_argument("--resume", metavar="CHECKPOINT",
                     help="continue from a run directory's model.npz (with its config unless "
                          "CONFIG is given); e.g. --resume runs/X/model.npz --rounds 60")
    run.add_argument("--json", action="store_true",
                     help="print the summary as one JSON object on stdout")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="also print the partition summary and engine details")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar or banner")
    run.set_defaults(func=_cmd_run)

    privacy = sub.add_parser(
        "privacy", help="plan differential privacy: epsilon for a setting, or the noise "
                        "for a target epsilon",
        description="Compute the (epsilon, delta) of DP-FedAvg with Poisson client sampling "
                    "using Google's dp-accounting, or the noise multiplier a target epsilon "
                    "needs. Same accounting as `shoal run` with [privacy] placement = "
                    "'central' and sampling.method = 'poisson'.",
        epilog="examples:\n  shoal privacy --q 0.1 --noise-multiplier 1.0 --rounds 100\n"
               "  shoal privacy --q 0.01 --rounds 1000 --target-epsilon 2 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    privacy.add_argument("--q", type=float, required=True,
                         help="probability that a client takes part in a round")
    privacy.add_argument("--noise-multiplier", type=float, dest="noise_multiplier",
                         help="noise std divided by the clip norm (z)")
    privacy.add_argument("--rounds", type=int, required=True, help="number of rounds")
    privacy.add_argument("--delta", type=float, default=1e-5,
                         help="delta (default 1e-5; keep it below 1/population)")
    privacy.add_argument("--target-epsilon", type=float, dest="target_epsilon",
                         help="also find the noise multiplier that reaches this epsilon")
    privacy.add_argument("--accountant", choices=("rdp", "pld"), default="rdp",
                         help="dp-accounting's RDP or PLD accountant (default rdp)")
    privacy.add_argument("--json", action="store_true", help="print one JSON object")
    privacy.set_defaults(func=_cmd_privacy)

    serve_p = sub.add_parser(
        "serve", help="run the aggregator: serve devices over gRPC",
        description="Run the round engine with real devices: a gRPC aggregator (TLS with "
                    "--certs) that devices pull tasks from. Every committed round is written "
                    "to DIR/models, and a restarted aggregator resumes from it.",
        epilog="examples:\n  shoal certs --out certs && shoal enroll device-000 --secret "
               "work/secret --out t0\n  shoal serve my.toml --dir work --certs certs",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(serve_p)
    serve_p.add_argument("--dir", default="aggregator",
                         help="state directory: secret, registry.db, models/, port")
    serve_p.add_argument("--certs", help="directory with server.pem and server.key")
    serve_p.add_argument("--client-ca", dest="client_ca", metavar="PEM",
                         help="mutual TLS (cross-silo): accept only devices with a client "
                              "certificate signed by this CA whose common name is the "
                              "device id (shoal certs --client NAME); needs --certs")
    serve_p.add_argument("--secret", help="token secret file (default DIR/secret)")
    serve_p.add_argument("--json", action="store_true", help="print the summary as JSON")
    serve_p.add_argument("--log-json", dest="log_json", metavar="FILE",
                         help="append structured logs (one JSON object per line) to FILE")
    serve_p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    serve_p.set_defaults(func=_cmd_serve)

    client_p = sub.add_parser(
        "client", help="run one device: check in, train on local data, upload, repeat",
        description="The device runtime on the reference data: client INDEX of the config's "
                    "partition trains exactly as it would in `shoal run` (same batches, same "
                    "random streams), against an aggregator started with `shoal serve`. "
                    "Your own model and data: use shoal.transport.client.DeviceClient from "
                    "Python with a train function.")
    _add_run_options(client_p)
    client_p.add_argument("--server", required=True, help="aggregator HOST:PORT")
    client_p.add_argument("--token", required=True, help="file with this device's token "
                          "(shoal enroll)")
    client_p.add_argument("--ca", help="CA certificate of the aggregator (ca.pem)")
    client_p.add_argument("--cert", help="client certificate for mutual TLS (its common name "
                                         "must be the device id)")
    client_p.add_argument("--key", help="private key of --cert")
    client_p.add_argument("--index", type=int, required=True,
                          help="which client of the partition this device is")
    client_p.add_argument("--device-id", dest="device_id",
                          help="device id (default device-INDEX, 4 digits)")
    client_p.add_argument("--max-tasks", type=int, dest="max_tasks",
                          help="stop after this many tasks (default: run until stopped)")
    client_p.add_argument("--max-retries", type=int, dest="max_retries", default=None,
                          help="give up after this many failed reconnections in a row")
    client_p.add_argument("--die-after", dest="die_after", choices=_SECAGG_STAGES,
                          help="fault injection for resilience tests: the process kills "
                               "itself (SIGKILL) right after the aggregator took its message "
                               "for this stage of a secure-aggregation round")
    client_p.add_argument("-q", "--quiet", action="store_true")
    client_p.set_defaults(func=_cmd_client)

    launch = sub.add_parser(
        "launch", help="deploy on this machine: an aggregator and N client processes over "
                       "TLS on loopback",
        description="Start an aggregator and one client process per client of the config "
                    "(real processes, real sockets, TLS on), run to the end and report like "
                    "`shoal run`. With deploy.over_selection = 1 and deploy.min_fraction = 1 "
                    "the devices train exactly the clients and batches `shoal run` would.",
        epilog="example:\n  shoal launch --clients 20 --rounds 10 --per-round 10 "
               "--set deploy.over_selection=1.0",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(launch)
    launch.add_argument("--dir", help="state directory (default: a new temporary one)")
    launch.add_argument("--json", action="store_true", help="print the summary as JSON")
    launch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    launch.add_argument("--log-json", dest="log_json", metavar="FILE",
                        help="append the aggregator's structured log (JSON lines) to FILE")
    launch.add_argument("--mtls", action="store_true",
                        help="mutual TLS: every client process presents its own client "
                             "certificate (common name = its device id), as silos would")
    launch.add_argument("--die-after", dest="die_after", action="append", default=[],
                        metavar="STAGE:N",
                        help="fault injection (repeatable): the next N client processes, "
                             "from device-0000 on, kill themselves (SIGKILL) right after "
                             "STAGE of their first secure-aggregation round; STAGE is one of "
                             + ", ".join(_SECAGG_STAGES))
    launch.set_defaults(func=_cmd_launch)

    models = sub.add_parser(
        "models", help="list, show, promote or roll back model versions in a model store",
        description="Every committed global model is a version with its parent, round, "
                    "metrics and status (candidate / production / rolled_back). `shoal run` "
                    "commits its final model when output.store is set.",
        epilog="examples:\n  shoal models --store models list\n"
               "  shoal models --store models promote v3\n"
               "  shoal models --store models rollback v2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_argument("--store", required=True, help="model store directory")
    models.add_argument("action", choices=("list", "show", "promote", "rollback"))
    models.add_argument("version", nargs="?", help="version for show / promote / rollback")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(func=_cmd_models)

    revoke = sub.add_parser(
        "revoke", help="revoke a device token (a running aggregator refuses it at once)",
        description="Add a token to the aggregator's revocation list (DIR/revoked.json of "
                    "`shoal serve`). A running aggregator re-reads the list within a second "
                    "and refuses the token with reason 'revoked'; entries are dropped once "
                    "their tokens have expired anyway.",
        epilog="examples:\n  shoal revoke device-0007.token --secret agg/secret "
               "--list agg/revoked.json\n  shoal revoke --device device-0007 --secret "
               "agg/secret --list agg/revoked.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    revoke.add_argument("token", nargs="?", help="file with the token to revoke")
    revoke.add_argument("--device", help="instead: revoke every live token `shoal enroll` "
                                         "issued to this device (recorded next to the secret, "
                                         "in enrolled.jsonl)")
    revoke.add_argument("--secret", required=True, help="the aggregator's secret key file")
    revoke.add_argument("--list", required=True, help="revocation list (DIR/revoked.json)")
    revoke.set_defaults(func=_cmd_revoke)

    certs = sub.add_parser(
        "certs", help="make a self-signed CA and server certificate for local TLS",
        description="Write ca.pem, ca.key, server.pem and server.key (ECDSA P-256) into a "
                    "directory, for running an aggregator with TLS on this machine or a "
                    "test network; with --client, also client certificates for mutual TLS. "
                    "Production deployments bring their own certificates.")
    certs.add_argument("--out", default="certs", help="directory (default: certs)")
    certs.add_argument("--client", action="append", metavar="NAME",
                       help="also issue a client certificate for mutual TLS with common "
                            "name NAME (the device id), signed by the CA in --out (made "
                            "first if missing); repeatable")
    certs.add_argument("--hostname", action="append",
                       help="extra DNS name or IP for the server certificate (repeatable); "
                            "localhost, 127.0.0.1 and ::1 are always included")
    certs.add_argument("--days", type=int, default=365, help="validity (default 365)")
    certs.add_argument("--overwrite", action="store_true", help="replace existing files")
    certs.set_defaults(func=_cmd_certs)

    enroll = sub.add_parser(
        "enroll", help="issue a device's signed enrolment token",
        description="Issue a token bound to DEVICE_ID, signed with the aggregator's secret "
                    "(created with mode 0600 if missing). A device may check in and upload "
                    "only as itself.")
    enroll.add_argument("device_id")
    enroll.add_argument("--secret", required=True, help="the aggregator's secret key file")
    enroll.add_argument("--days", type=float, default=30.0, help="validity (default 30)")
    enroll.add_argument("--out", help="write the token to this file (mode 0600)")
    enroll.set_defaults(func=_cmd_enroll)

    config = sub.add_parser(
        "config", help="print the resolved configuration as TOML",
        description="Print the configuration a run would use (defaults, a file, and "
                    "overrides merged and validated) as TOML, or the option reference.")
    _add_run_options(config)
    config.add_argument("--markdown", action="store_true",
                        help="print the option reference (docs/configuration.md) instead")
    config.set_defaults(func=_cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shoal`` command line; returns the process exit code."""
    import logging

    # dp-accounting logs a warning for every RDP order it skips; it is not actionable.
    logging.getLogger("absl").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"shoal: configuration error: {exc}", file=sys.stderr)
        return 2
    except BudgetExhausted as exc:
        print(f"shoal: privacy budget: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"shoal: data error: {exc}", file=sys.stderr)
        return 1
    except ShoalError as exc:
        print(f"shoal: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
