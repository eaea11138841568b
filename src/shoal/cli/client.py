"""``shoal client``: one device on the reference data, against ``shoal serve``."""

from __future__ import annotations

import argparse
import json
import sys

from shoal.cli.options import add_run_options, config_from_args
from shoal.errors import ConfigError

# the stages of a secure-aggregation round after which --die-after kills the process
SECAGG_STAGES = ("advertise_keys", "share_keys", "masked_input", "unmasking")


def add_parser(sub) -> None:
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
    p.add_argument("--die-after", dest="die_after", choices=SECAGG_STAGES,
                   help="fault injection for resilience tests: the process kills "
                        "itself (SIGKILL) right after the aggregator took its message "
                        "for this stage of a secure-aggregation round")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading
    from pathlib import Path

    from shoal.build import load_data
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
    cfg = config_from_args(args)
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
