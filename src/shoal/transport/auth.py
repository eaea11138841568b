"""Device authentication for the gRPC deployment: tokens, revocation, rate limits. Pure and stdlib-only: no sockets, no clocks (``now`` is an argument, Unix seconds).

A token is ``kid "." b64url(claims) "." b64url(HMAC-SHA256(key[kid], domain || kid "." claims))``
with claims exactly ``{"v": 1, "sub", "iat", "exp", "jti", "scope"}`` — RFC 7519 names, but not
JWT: one algorithm, no ``alg`` header to confuse, no library. HMAC rather than Ed25519 because
the aggregator fleet both issues and verifies; devices never verify tokens, so public
verifiability buys nothing, while an HMAC costs ~3 µs against ~250 µs for an Ed25519
verification (this 2-core machine). The price: every verifier holds the issuing secret; edge
aggregators outside that trust would need Ed25519 behind the same ``kid`` scheme.

Verification parses nothing untrusted beyond a fixed-shape envelope before authenticating it:
size (> 2 KiB refused before decoding), shape, canonical base64url, key id, constant-time tag
comparison, and only then strict JSON. Each refusal is an :class:`AuthError` whose ``reason``
tells the device what to do. :class:`Keyring` rotates keys (one issues, older ones verify);
:class:`RevocationList` revokes token ids until they expire. The rate limiter lives in
:mod:`shoal.transport.limits` and is re-exported here. See ``docs/security.md``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from shoal.errors import ConfigError, ShoalError
from shoal.store.atomic import fsync_dir
from shoal.transport.limits import RateLimiter, int_at_least

__all__ = [
    "AUTH_REASONS", "KNOWN_SCOPES", "MAX_TOKEN_CHARS", "SECRET_BYTES",
    "AuthError", "CredentialFileError",
    "Claims", "Keyring", "key_id", "load_or_create_secret", "issue_token", "verify_token",
    "RevocationList", "RevocationFile", "RateLimiter",
]

_log = logging.getLogger("shoal.auth")

AUTH_REASONS = frozenset({"missing", "malformed", "bad_signature", "expired", "not_yet_valid",
                          "wrong_device", "revoked", "scope"})
"""Every value :attr:`AuthError.reason` takes."""
KNOWN_SCOPES = frozenset({"checkin", "upload"})
"""Scopes a token may grant."""
DEFAULT_SCOPE = ("checkin", "upload")
MAX_TOKEN_CHARS = 2048
"""Tokens longer than this are refused before any decoding."""
SECRET_BYTES = 32
"""Length of generated secrets; shorter secrets are refused."""
MAX_DEVICE_ID_CHARS = 128

_DOMAIN = b"shoal-device-token-v1\x00"
_FIELDS = frozenset({"v", "sub", "iat", "exp", "jti", "scope"})
_KID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_JTI = re.compile(r"[A-Za-z0-9_-]{22}")
_MAX_TIME = 2**53  # integers JSON round-trips exactly everywhere


class AuthError(ShoalError):
    """A request's credentials were refused; nothing was changed.

    Attributes:
        reason: one of :data:`AUTH_REASONS` — ``"missing"`` (no token), ``"malformed"`` (not a
            well-formed token), ``"bad_signature"`` (wrong or unknown key, or tampered),
            ``"expired"`` / ``"not_yet_valid"`` (outside its validity, after clock-skew
            leeway), ``"wrong_device"`` (bound to another device), ``"revoked"``, ``"scope"``
            (does not grant the requested operation).
        device_id: the device concerned when known (never taken from an unauthenticated token).
    """

    def __init__(self, reason: str, detail: str = "", *, device_id: str | None = None) -> None:
        if reason not in AUTH_REASONS:
            raise ValueError(f"unknown AuthError reason {reason!r}")
        msg = f"authentication failed ({reason})"
        if device_id is not None:
            msg += f" for device {device_id!r}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)
        self.reason = reason
        self.device_id = device_id


class CredentialFileError(ConfigError):
    """A secret, key or certificate file is missing, unreadable, malformed, too widely
    readable, expired, or does not match its pair.

    Attributes:
        path: the offending file.
    """

    def __init__(self, message: str, path: str | os.PathLike[str]) -> None:
        super().__init__(message)
        self.path = str(path)


# --------------------------------------------------------------------------- keys

def key_id(secret: bytes) -> str:
    """A short public name for a secret (8 base64url characters of a domain-separated SHA-256),
    used as the token's ``kid`` when none is given. Reveals nothing useful about the secret."""
    return _b64encode(hashlib.sha256(b"shoal-kid\x00" + secret).digest()[:6])


def _check_secret(secret: object, what: str) -> bytes:
    if not isinstance(secret, bytes | bytearray) or len(secret) < SECRET_BYTES:
        raise ConfigError(f"{what} must be at least {SECRET_BYTES} bytes", key=what)
    return bytes(secret)


def _check_kid(kid: object) -> str:
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise ConfigError(f"key id {kid!r} must be 1-32 characters of [A-Za-z0-9_-]", key="kid")
    return kid


@dataclass(frozen=True)
class Keyring:
    """Token keys: ``active_kid`` issues; every key in ``keys`` (active included) verifies.

    Rotate by :meth:`rotate` (the new key issues, the old one keeps verifying the tokens already
    out), then :meth:`retire` the old one once its tokens have expired.
    """

    active_kid: str
    keys: Mapping[str, bytes]

    def __post_init__(self) -> None:
        keys = {_check_kid(k): _check_secret(s, f"secret {k!r}") for k, s in self.keys.items()}
        if self.active_kid not in keys:
            raise ConfigError(f"active key id {self.active_kid!r} is not in the keyring",
                              key="active_kid")
        object.__setattr__(self, "keys", MappingProxyType(keys))

    @classmethod
    def single(cls, secret: bytes, kid: str | None = None) -> Keyring:
        """A keyring of one key (``kid`` defaults to :func:`key_id` of the secret)."""
        secret = _check_secret(secret, "secret")
        kid = key_id(secret) if kid is None else kid
        return cls(kid, {kid: secret})

    def rotate(self, secret: bytes, kid: str | None = None) -> Keyring:
        """A new keyring in which ``secret`` issues and every current key still verifies."""
        secret = _check_secret(secret, "secret")
        kid = key_id(secret) if kid is None else _check_kid(kid)
        if kid in self.keys:
            raise ConfigError(f"key id {kid!r} is already in the keyring", key="kid")
        return Keyring(kid, {**self.keys, kid: secret})

    def retire(self, kid: str) -> Keyring:
        """A new keyring without ``kid``; its tokens stop verifying. The active key cannot be
        retired (rotate first)."""
        if kid == self.active_kid:
            raise ConfigError(f"cannot retire the active key {kid!r}; rotate first", key="kid")
        if kid not in self.keys:
            raise ConfigError(f"key id {kid!r} is not in the keyring", key="kid")
        return Keyring(self.active_kid, {k: s for k, s in self.keys.items() if k != kid})


def _as_keyring(secret: bytes | Keyring) -> Keyring:
    return secret if isinstance(secret, Keyring) else Keyring.single(secret)


def load_or_create_secret(path: str | os.PathLike[str]) -> bytes:
    """Read the server's token secret from ``path``, creating it (32 bytes from :mod:`secrets`,
    stored as hex, mode 0600) if the file does not exist.

    Creation is atomic and race-free: the secret is written to a private temporary file and
    hard-linked into place, so two processes starting together end up with the same secret.

    Raises:
        CredentialFileError: the file exists but is group/other-accessible (on POSIX), is not
            64 hexadecimal characters, or cannot be read.
    """
    path = Path(path)
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(SECRET_BYTES)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(secret.hex().encode("ascii") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process won the race: use its secret
            return _read_secret(path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return secret


def _read_secret(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if os.name == "posix" and mode & 0o077:
                raise CredentialFileError(
                    f"secret file {path} has permissions {stat.S_IMODE(mode):04o}; it must be "
                    f"readable by its owner only (chmod 600 {path})", path)
            text = f.read(4 * SECRET_BYTES)
    except (FileNotFoundError, CredentialFileError):
        raise
    except OSError as exc:
        raise CredentialFileError(f"cannot read secret file {path}: {exc}", path) from None
    text = text.strip()
    if len(text) != 2 * SECRET_BYTES or not re.fullmatch(rb"[0-9a-fA-F]+", text):
        raise CredentialFileError(
            f"secret file {path} must hold {2 * SECRET_BYTES} hexadecimal characters", path)
    return bytes.fromhex(text.decode("ascii"))


# --------------------------------------------------------------------------- tokens

@dataclass(frozen=True)
class Claims:
    """The verified content of a device token.

    Attributes:
        sub: the device id the token is bound to.
        iat: issue time, Unix seconds.
        exp: expiry, Unix seconds (the token is valid for ``iat <= now < exp``, ± leeway).
        jti: random unique token id (16 bytes, base64url), the handle for revocation.
        scope: the operations granted, e.g. ``("checkin", "upload")``.
        kid: id of the key that authenticated it.
        v: format version (1).
    """

    sub: str
    iat: int
    exp: int
    jti: str
    scope: tuple[str, ...]
    kid: str
    v: int = 1


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    """Strict unpadded base64url: alphabet, length and canonical trailing bits."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise AuthError("malformed", f"{what} is not unpadded base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64encode(raw) != text:
        raise AuthError("malformed", f"{what} is not canonical base64url")
    return raw


def _tag(key: bytes, signed: str) -> bytes:
    return hmac.new(key, _DOMAIN + signed.encode("ascii"), hashlib.sha256).digest()


def _check_device_id(device_id: object) -> str:
    if (not isinstance(device_id, str) or not 1 <= len(device_id) <= MAX_DEVICE_ID_CHARS
            or not device_id.isprintable()):
        raise ConfigError(f"device id must be 1-{MAX_DEVICE_ID_CHARS} printable characters, "
                          f"got {device_id!r}", key="device_id")
    return device_id


def _check_scope(scope: Iterable[str]) -> tuple[str, ...]:
    scope = tuple(scope)
    if not scope or len(set(scope)) != len(scope) or not set(scope) <= KNOWN_SCOPES:
        raise ConfigError(f"scope must be distinct values from {sorted(KNOWN_SCOPES)}, "
                          f"got {list(scope)}", key="scope")
    return scope


def issue_token(secret: bytes | Keyring, device_id: str, *, now: float, ttl_seconds: int,
                scope: Iterable[str] = DEFAULT_SCOPE) -> str:
    """Issue a token bound to ``device_id``, valid from ``floor(now)`` for ``ttl_seconds``.

    Args:
        secret: the server secret, or a :class:`Keyring` (its active key issues).
        device_id: 1-128 printable characters.
        now: current time, Unix seconds.
        ttl_seconds: positive integer lifetime.
        scope: operations granted, a non-empty subset of :data:`KNOWN_SCOPES`.

    Raises:
        ConfigError: a secret shorter than 32 bytes, or an invalid device id, ttl or scope.
    """
    ring = _as_keyring(secret)
    device_id = _check_device_id(device_id)
    scope = _check_scope(scope)
    int_at_least(ttl_seconds, "ttl_seconds", 1)
    if not math.isfinite(now) or not 0 <= now < _MAX_TIME - ttl_seconds:
        raise ConfigError(f"now must be a finite non-negative Unix time, got {now!r}", key="now")
    iat = math.floor(now)
    claims = {"v": 1, "sub": device_id, "iat": iat, "exp": iat + ttl_seconds,
              "jti": _b64encode(secrets.token_bytes(16)), "scope": list(scope)}
    payload = _b64encode(json.dumps(claims, sort_keys=True, separators=(",", ":"),
                                    ensure_ascii=False).encode("utf-8"))
    signed = f"{ring.active_kid}.{payload}"
    return f"{signed}.{_b64encode(_tag(ring.keys[ring.active_kid], signed))}"


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_claims(raw: bytes, kid: str) -> Claims:
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_json_pairs,
                         parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        raise AuthError("malformed", "claims are not a JSON object") from None
    if not isinstance(obj, dict):
        raise AuthError("malformed", "claims are not a JSON object")
    if obj.keys() != _FIELDS:
        extra, missing = sorted(obj.keys() - _FIELDS), sorted(_FIELDS - obj.keys())
        raise AuthError("malformed", f"claims have extra fields {extra} / missing {missing}")
    v, sub, iat, exp, jti, scope = (obj[k] for k in ("v", "sub", "iat", "exp", "jti", "scope"))
    if not _is_int(v) or v != 1:
        raise AuthError("malformed", f"unsupported token version {v!r}")
    if (not isinstance(sub, str) or not 1 <= len(sub) <= MAX_DEVICE_ID_CHARS
            or not sub.isprintable()):
        raise AuthError("malformed", "claim 'sub' is not a valid device id")
    if not (_is_int(iat) and _is_int(exp) and 0 <= iat < exp <= _MAX_TIME):
        raise AuthError("malformed", "claims 'iat'/'exp' must be integers, 0 <= iat < exp")
    if not isinstance(jti, str) or not _JTI.fullmatch(jti):
        raise AuthError("malformed", "claim 'jti' must be 22 base64url characters")
    if (not isinstance(scope, list) or not scope or not all(isinstance(s, str) for s in scope)
            or len(set(scope)) != len(scope) or not set(scope) <= KNOWN_SCOPES):
        raise AuthError("malformed", f"claim 'scope' must be distinct values from "
                                     f"{sorted(KNOWN_SCOPES)}")
    return Claims(sub=sub, iat=iat, exp=exp, jti=jti, scope=tuple(scope), kid=kid, v=v)


def verify_token(secret: bytes | Keyring, token: str | None, *, now: float,
                 expected_device: str | None = None, required_scope: str | None = None,
                 revoked: RevocationList | None = None,
                 leeway_seconds: float = 60.0) -> Claims:
    """Authenticate ``token`` and return its claims.

    Checks, in order: present; at most :data:`MAX_TOKEN_CHARS` characters; three dot-separated
    parts of canonical unpadded base64url with a 32-byte tag; a known key id; the HMAC tag
    (constant time); claims with exactly the six fields and their types; not in ``revoked``;
    ``iat - leeway <= now < exp + leeway``; bound to ``expected_device`` if given; grants
    ``required_scope`` if given.

    Args:
        secret: the server secret or a :class:`Keyring` (any of its keys verifies, by ``kid``).
        leeway_seconds: tolerated clock skew between issuer and verifier, ≥ 0.

    Raises:
        AuthError: with ``reason`` saying which check failed.
        ConfigError: an invalid secret or leeway (the caller's bug, not the device's).
    """
    ring = _as_keyring(secret)
    if not math.isfinite(leeway_seconds) or leeway_seconds < 0:
        raise ConfigError(f"leeway_seconds must be finite and >= 0, got {leeway_seconds!r}",
                          key="leeway_seconds")
    if token is None or token == "":
        raise AuthError("missing", "no token presented", device_id=expected_device)
    if not isinstance(token, str):
        raise AuthError("malformed", "token is not a string")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError("malformed", f"token is {len(token)} characters, more than "
                                     f"{MAX_TOKEN_CHARS}")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("malformed", "token must have three dot-separated parts")
    kid, payload_text, tag_text = parts
    if not _KID.fullmatch(kid):
        raise AuthError("malformed", "key id is not 1-32 base64url characters")
    payload = _b64decode(payload_text, "payload")
    tag = _b64decode(tag_text, "tag")
    if len(tag) != hashlib.sha256().digest_size:
        raise AuthError("malformed", "tag is not 32 bytes")
    key = ring.keys.get(kid)
    if key is None:
        raise AuthError("bad_signature", "unknown key id (retired, or another server's)")
    if not hmac.compare_digest(tag, _tag(key, f"{kid}.{payload_text}")):
        raise AuthError("bad_signature", "tag does not match")
    claims = _parse_claims(payload, kid)
    if revoked is not None and claims.jti in revoked:
        raise AuthError("revoked", "token has been revoked; enrol again", device_id=claims.sub)
    if now < claims.iat - leeway_seconds:
        raise AuthError("not_yet_valid", f"issued at {claims.iat}, now is {now:.0f} "
                        f"(leeway {leeway_seconds:g} s): check the clock", device_id=claims.sub)
    if now >= claims.exp + leeway_seconds:
        raise AuthError("expired", f"expired at {claims.exp}, now is {now:.0f} "
                        f"(leeway {leeway_seconds:g} s)", device_id=claims.sub)
    if expected_device is not None and not hmac.compare_digest(
            claims.sub.encode("utf-8"), expected_device.encode("utf-8")):
        raise AuthError("wrong_device", f"token is bound to another device than "
                                        f"{expected_device!r}", device_id=expected_device)
    if required_scope is not None and required_scope not in claims.scope:
        raise AuthError("scope", f"token does not grant {required_scope!r} "
                                 f"(grants {list(claims.scope)})", device_id=claims.sub)
    return claims


# --------------------------------------------------------------------------- revocation

@dataclass(frozen=True)
class RevocationList:
    """Revoked token ids, each kept until the token it names has expired.

    Immutable: :meth:`revoke` and :meth:`prune` return new lists. Serialises to JSON
    (:meth:`to_json` / :meth:`from_json`) for the store.
    """

    entries: Mapping[str, int] = field(default_factory=dict)
    """jti → the token's ``exp``."""

    def __post_init__(self) -> None:
        for jti, exp in self.entries.items():
            if not isinstance(jti, str) or not _JTI.fullmatch(jti) or not _is_int(exp):
                raise ConfigError(f"revocation entry {jti!r}: {exp!r} is not a token id "
                                  f"with an integer expiry", key="entries")
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))

    def __contains__(self, jti: object) -> bool:
        return jti in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def revoke(self, jti: str, exp: int) -> RevocationList:
        """A new list that also revokes token ``jti`` (expiring at ``exp``; from its claims)."""
        return RevocationList({**self.entries, jti: exp})

    def prune(self, now: float, leeway_seconds: float = 60.0) -> RevocationList:
        """A new list without the entries whose tokens fail as expired at ``now`` anyway (use
        the same leeway as :func:`verify_token`)."""
        return RevocationList({j: e for j, e in self.entries.items()
                               if now < e + leeway_seconds})

    def to_json(self) -> str:
        return json.dumps({"v": 1, "revoked": dict(sorted(self.entries.items()))},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RevocationList:
        """Parse :meth:`to_json` output.

        Raises:
            ConfigError: the text is not a version-1 revocation list.
        """
        try:
            obj = json.loads(text, object_pairs_hook=_json_pairs,
                             parse_constant=_reject_constant)
        except ValueError as exc:
            raise ConfigError(f"revocation list is not valid JSON: {exc}") from None
        if (not isinstance(obj, dict) or obj.keys() != {"v", "revoked"} or obj["v"] != 1
                or not isinstance(obj["revoked"], dict)):
            raise ConfigError('revocation list must be {"v": 1, "revoked": {jti: exp}}')
        return cls(obj["revoked"])


class RevocationFile:
    """The revocation list a running aggregator enforces, kept in a JSON file that the
    operator changes (``shoal revoke``) without restarting it.

    :meth:`current` re-reads the file at most every ``check_every_s`` seconds (timed with a
    monotonic clock) and takes the new list when its bytes changed. A file that does not
    exist at start is an empty list. Afterwards nothing un-revokes a token by accident: a
    missing, unreadable or malformed file keeps the last good list, with ``last_error``
    saying why (and a warning in the log); to clear the list, write an empty one.

    Raises:
        CredentialFileError: the file exists at construction but is not a revocation list.
    """

    def __init__(self, path: str | os.PathLike[str], *, check_every_s: float = 1.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.check_every_s = check_every_s
        self.last_error: str | None = None
        self._monotonic = monotonic
        self._bytes: bytes | None = None
        self._list = RevocationList()
        self._checked = monotonic()
        try:
            self._bytes = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise CredentialFileError(f"cannot read revocation list {self.path}: {exc}",
                                      self.path) from None
        try:
            self._list = self._parse(self._bytes)
        except ConfigError as exc:
            raise CredentialFileError(f"revocation list {self.path}: {exc}",
                                      self.path) from None

    @staticmethod
    def _parse(data: bytes) -> RevocationList:
        try:
            return RevocationList.from_json(data.decode("utf-8"))
        except (UnicodeDecodeError, RecursionError) as exc:
            raise ConfigError(f"not a revocation list ({type(exc).__name__})") from None

    def _refresh(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            self._failed("missing" if isinstance(exc, FileNotFoundError) else str(exc))
            return
        if data == self._bytes:
            return
        try:
            self._list = self._parse(data)
        except ConfigError as exc:
            self._failed(str(exc))
            return
        self._bytes, self.last_error = data, None

    def _failed(self, why: str) -> None:
        if self._bytes is None and why == "missing":
            return  # never existed: nothing revoked yet
        if why != self.last_error:
            _log.warning("revocation list %s: %s; keeping the last good list (%d tokens)",
                         self.path, why, len(self._list))
        self.last_error = why

    def current(self) -> RevocationList:
        """The list in force. Reloads are paced by a monotonic clock, so a wall clock
        stepped backwards cannot stall them."""
        t = self._monotonic()
        if t - self._checked >= self.check_every_s:
            self._checked = t
            self._refresh()
        return self._list
