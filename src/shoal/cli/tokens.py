"""``shoal enroll`` and ``shoal revoke``: device tokens, and the enrolment log between them.

``enroll`` records each issued token's id (never the token) next to the secret, so that
``revoke --device`` can revoke a token nobody kept. The two commands are listed apart in
``shoal --help`` (``certs`` sits between them), so each has its own ``add_*_parser``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.errors import ConfigError

if TYPE_CHECKING:
    from shoal.transport.tokens import Claims


def add_enroll_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "enroll", help="issue a device's signed enrolment token",
        description="Issue a token bound to DEVICE_ID, signed with the aggregator's secret "
                    "(created with mode 0600 if missing). A device may check in and upload "
                    "only as itself.")
    p.add_argument("device_id")
    p.add_argument("--secret", required=True, help="the aggregator's secret key file")
    p.add_argument("--days", type=float, default=30.0, help="validity (default 30)")
    p.add_argument("--out", help="write the token to this file (mode 0600)")
    p.set_defaults(func=enroll)


def add_revoke_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "revoke", help="revoke a device token (a running aggregator refuses it at once)",
        description="Add a token to the aggregator's revocation list (DIR/revoked.json of "
                    "`shoal serve`). A running aggregator re-reads the list within a second "
                    "and refuses the token with reason 'revoked'; entries are dropped once "
                    "their tokens have expired anyway.",
        epilog="examples:\n  shoal revoke device-0007.token --secret agg/secret "
               "--list agg/revoked.json\n  shoal revoke --device device-0007 --secret "
               "agg/secret --list agg/revoked.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("token", nargs="?", help="file with the token to revoke")
    p.add_argument("--device", help="instead: revoke every live token `shoal enroll` "
                                    "issued to this device (recorded next to the secret, "
                                    "in enrolled.jsonl)")
    p.add_argument("--secret", required=True, help="the aggregator's secret key file")
    p.add_argument("--list", required=True, help="revocation list (DIR/revoked.json)")
    p.set_defaults(func=revoke)


def _enrolment_log(secret: Path) -> Path:
    """Where ``shoal enroll`` records the ids of the tokens it issued: next to the secret."""
    return secret.with_name("enrolled.jsonl")


def _record_enrolment(secret: Path, claims: Claims) -> None:
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


def enroll(args: argparse.Namespace) -> int:
    import time

    from shoal.store.atomic import replace_atomically
    from shoal.transport.auth import load_or_create_secret
    from shoal.transport.tokens import issue_token, verify_token

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


def revoke(args: argparse.Namespace) -> int:
    import fcntl
    import time

    from shoal.store.atomic import fsync_dir, replace_atomically
    from shoal.transport.auth import AuthError, load_or_create_secret
    from shoal.transport.revocation import RevocationFile
    from shoal.transport.tokens import verify_token

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
