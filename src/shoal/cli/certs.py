"""``shoal certs``: a self-signed CA, a server certificate and client certificates."""

from __future__ import annotations

import argparse

from shoal.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certs", help="make a self-signed CA and server certificate for local TLS",
        description="Write ca.pem, ca.key, server.pem and server.key (ECDSA P-256) into a "
                    "directory, for running an aggregator with TLS on this machine or a "
                    "test network; with --client, also client certificates for mutual TLS. "
                    "Production deployments bring their own certificates.")
    p.add_argument("--out", default="certs", help="directory (default: certs)")
    p.add_argument("--client", action="append", metavar="NAME",
                   help="also issue a client certificate for mutual TLS with common "
                        "name NAME (the device id), signed by the CA in --out (made "
                        "first if missing); repeatable")
    p.add_argument("--hostname", action="append",
                   help="extra DNS name or IP for the server certificate (repeatable); "
                        "localhost, 127.0.0.1 and ::1 are always included")
    p.add_argument("--days", type=int, default=365, help="validity (default 365)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
