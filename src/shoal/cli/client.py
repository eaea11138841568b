"""``shoal client``: one device on the reference data, against ``shoal serve``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from shoal.build import load_partition
from shoal.cli.options import add_run_options, config_from_args
from shoal.errors import ConfigError
from shoal.registry.validation import (MAX_WINDOWS, MINUTES_PER_WEEK, RegistryError,
                                       validate_attributes)

# the stages of a secure-aggregation round after which --die-after kills the process
SECAGG_STAGES = ("advertise_keys", "share_keys", "masked_input", "unmasking")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "client", help="run one device: check in, train on local data, upload, repeat",
        description="The device runtime on the reference data: client INDEX of the config's "
                    "partition trains exactly as it would in `shoal run` (same batches, same "
                    "random streams), against an aggregator started with `shoal serve`. "
                    "Your own model and data: use shoal.transport.client.DeviceClient from "
                    "Python with a train function.")
    add_run_options(p)
    p.add_argument("--server", required=True, help="aggregator HOST:PORT")
    p.add_argument("--token", required=True, help="file with this device's token "
                   "(shoal enroll)")
    p.add_argument("--ca", help="CA certificate of the aggregator (ca.pem)")
    p.add_argument("--cert", help="client certificate for mutual TLS (its common name "
                                  "must be the device id)")
    p.add_argument("--key", help="private key of --cert")
    p.add_argument("--index", type=int, required=True,
                   help="which client of the partition this device is")
    p.add_argument("--device-id", dest="device_id",
                   help="device id (default device-INDEX, 4 digits)")
    p.add_argument("--max-tasks", type=int, dest="max_tasks",
                   help="stop after this many tasks (default: run until stopped)")
    p.add_argument("--max-retries", type=int, dest="max_retries", default=None,
                   help="give up after this many failed reconnections in a row")
    p.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                   help="a device attribute sent when enrolling, for stratified selection "
                        "(sampling.stratify_by); repeatable, e.g. --attr os=android "
                        "--attr region=eu. The attribute 'index' is --index unless given")
    p.add_argument("--window", action="append", default=[], metavar="[DAYS/]HH:MM-HH:MM",
                   help="when the device is available, in UTC, for availability-aware "
                        "selection; repeatable. DAYS: Mon..Sun, a range (Mon-Fri, Fri-Mon) "
                        "or a list (Sat,Sun); default every day. An end at or before the "
                        "start runs past midnight: Mon-Fri/22:00-06:00 is five nights, "
                        "24:00 ends a day. No --window: always available")
    p.add_argument("--die-after", dest="die_after", choices=SECAGG_STAGES,
                   help="fault injection for resilience tests: the process kills "
                        "itself (SIGKILL) right after the aggregator took its message "
                        "for this stage of a secure-aggregation round")
    p.add_argument("--trusted-key", dest="trusted_key", metavar="FILE",
                   help="the operator's public key (operator.pub from `shoal keys`): every "
                        "model and training plan must be signed by it; anything unsigned, "
                        "signed by another key or tampered with is refused (the server is "
                        "told, the device keeps the model it had)")
    p.add_argument("--served-every", dest="served_every", type=float, metavar="SECONDS",
                   help="fetch the served (production) model at start and then at most "
                        "this often between tasks, as an app would for inference")
    p.add_argument("--holdout", type=float, metavar="FRACTION",
                   help="evaluate on a held-out FRACTION of this client's examples (the "
                        "simulator's split, shoal.sim.evaluation.holdout_split) and train "
                        "on the rest; default: train and evaluate on all of them")
    p.add_argument("--min-noise", dest="min_noise", type=float, default=0.0, metavar="Z",
                   help="distributed DP: take part only in secure rounds that ask this device "
                        "for a noise share of standard deviation at least Z times the clip "
                        "norm (the server chooses the share; this is the device's own floor "
                        "against a server asking for too little). Default 0: no floor")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading
    from pathlib import Path

    from shoal.training import LocalTrainConfig
    from shoal.transport.client import DeviceClient
    from shoal.transport.reference import fmnist_evaluate_fn, fmnist_train_fn

    if (args.cert is None) != (args.key is None):
        raise ConfigError("--cert and --key go together (the client certificate for mutual "
                          "TLS and its private key)", key="cert")
    if args.cert is not None and args.ca is None:
        raise ConfigError("a client certificate needs TLS: give --ca too", key="cert")
    attributes = {"index": str(args.index), **parse_attributes(args.attr)}
    windows = parse_windows(args.window)
    device = args.device_id or f"device-{args.index:04d}"
    client_cert = None
    if args.cert is not None:
        client_cert = _client_certificate(args.cert, args.key, device)
    cfg = config_from_args(args)
    data = load_partition(cfg, "shoal client")
    if not 0 <= args.index < data.num_clients:
        raise ConfigError(f"--index {args.index} is not a client of this config (0 .. "
                          f"{data.num_clients - 1})", key="index")
    idx = held = data.client_indices[args.index]
    if args.holdout is not None:
        if not 0 < args.holdout < 1:
            raise ConfigError(f"--holdout must be in (0, 1), got {args.holdout}",
                              key="holdout")
        from shoal.sim.evaluation import holdout_split

        parts, held_parts = holdout_split(data.client_indices, args.holdout, cfg.seed)
        idx, held = parts[args.index], held_parts[args.index]
    trusted = None
    if args.trusted_key is not None:
        from shoal.lifecycle.keys import load_trusted_key

        trusted = load_trusted_key(args.trusted_key)
    local = LocalTrainConfig(epochs=cfg["client"]["epochs"],
                             batch_size=cfg["client"]["batch_size"], lr=cfg["client"]["lr"])
    train = fmnist_train_fn(cfg["model"]["name"], data.train.x[idx], data.train.y[idx], local,
                            cfg.seed, args.index, num_classes=data.train.num_classes)
    evaluate = fmnist_evaluate_fn(cfg["model"]["name"], data.train.x[held],
                                  data.train.y[held], seed=cfg.seed,
                                  num_classes=data.train.num_classes)
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
                      client_cert=client_cert, train=train, examples=len(idx),
                      evaluate=evaluate, attributes=attributes, windows=windows,
                      max_retries=args.max_retries, trusted_key=trusted,
                      served_every_s=args.served_every, min_noise=args.min_noise,
                      after_stage=die_after if args.die_after else None) as client:
        stats = client.run(max_rounds=args.max_tasks, stop=stop)
    if not args.quiet:
        print(json.dumps({"device": device, **stats.__dict__}), file=sys.stderr)
    return 0


def parse_attributes(specs: Sequence[str]) -> dict[str, str]:
    """``["os=android", "region=eu"]`` -> ``{"os": "android", "region": "eu"}``.

    Raises:
        ConfigError: (key ``attr``) a spec without ``=``, a repeated name, or a name or
            value the registry would refuse (naming it and the rule).
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, eq, value = spec.partition("=")
        if not eq:
            raise ConfigError(f"--attr {spec!r}: expected KEY=VALUE, e.g. os=android",
                              key="attr")
        if name in out:
            raise ConfigError(f"--attr {name} is given twice", key="attr")
        out[name] = value
    try:
        validate_attributes(out)
    except RegistryError as exc:
        raise ConfigError(f"--attr: {exc}", key="attr") from None
    return out


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_windows(specs: Sequence[str]) -> list[tuple[int, int]]:
    """Availability windows ``[DAYS/]HH:MM-HH:MM`` (UTC) as ``(start, end)`` minutes of the
    week (Monday 00:00 = 0), one per day: ``"Mon-Fri/22:00-06:00"`` is five windows, each
    running past midnight; ``"Sun/22:00-02:00"`` wraps around the end of the week.

    Raises:
        ConfigError: (key ``window``) naming the part of the spec that is wrong and what
            it must be, or more windows than a device may declare.
    """
    out: list[tuple[int, int]] = []
    for spec in specs:
        days_part, slash, times = spec.rpartition("/")
        days = _parse_days(days_part, spec) if slash else list(range(7))
        first, dash, last = times.partition("-")
        if not dash:
            raise ConfigError(f"--window {spec!r}: expected [DAYS/]HH:MM-HH:MM, e.g. "
                              f"Mon-Fri/22:00-06:00", key="window")
        start, end = _minute(first, spec, "start"), _minute(last, spec, "end")
        if start == 24 * 60:
            raise ConfigError(f"--window {spec!r}: the start must be before 24:00",
                              key="window")
        if start == end:
            raise ConfigError(f"--window {spec!r}: start and end are the same time; use "
                              f"00:00-24:00 for a whole day", key="window")
        length = end - start if end > start else end + 24 * 60 - start
        for day in days:
            begin = day * 24 * 60 + start
            out.append((begin, (begin + length) % MINUTES_PER_WEEK))
    if len(out) > MAX_WINDOWS:
        raise ConfigError(f"--window: {len(out)} daily windows, a device may declare at most "
                          f"{MAX_WINDOWS}", key="window")
    return out


def _parse_days(text: str, spec: str) -> list[int]:
    days: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.partition("-")
        try:
            a = _DAYS.index(lo.strip().lower())
            b = _DAYS.index(hi.strip().lower()) if dash else a
        except ValueError:
            raise ConfigError(f"--window {spec!r}: {part!r} is not a day or a range of days "
                              f"(Mon, Tue, Wed, Thu, Fri, Sat, Sun; e.g. Mon-Fri)",
                              key="window") from None
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))  # Fri-Mon wraps
    return sorted(days)


def _minute(text: str, spec: str, which: str) -> int:
    hh, colon, mm = text.strip().partition(":")
    if not (colon and hh.isdigit() and mm.isdigit() and len(mm) == 2
            and (int(hh), int(mm)) <= (24, 0) and int(mm) < 60):
        raise ConfigError(f"--window {spec!r}: the {which} {text!r} must be a time HH:MM "
                          f"from 00:00 to 24:00", key="window")
    return int(hh) * 60 + int(mm)


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
