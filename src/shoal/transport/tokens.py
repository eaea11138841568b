"""Device tokens: issue and verify (HMAC-SHA256 over strict claims). Pure and stdlib-only:
no sockets, no clocks (``now`` is an argument, Unix seconds).

A token is ``kid "." b64url(claims) "." b64url(HMAC-SHA256(key[kid], domain || kid "." claims))``
with claims exactly ``{"v": 1, "sub", "iat", "exp", "jti", "scope"}`` — RFC 7519 names, but not
JWT: one algorithm, no ``alg`` header to confuse, no library. HMAC rather than Ed25519 because
the aggregator fleet both issues and verifies; devices never verify tokens, so public
verifiability buys nothing, while an HMAC costs ~3 µs against ~250 µs for an Ed25519
verification (this 2-core machine). The price: every verifier holds the issuing secret; edge
aggregators outside that trust would need Ed25519 behind the same ``kid`` scheme.

Verification parses nothing untrusted beyond a fixed-shape envelope before authenticating it:
size (> 2 KiB refused before decoding), shape, canonical base64url, key id, constant-time tag
comparison, and only then strict JSON. Each refusal is an
:class:`~shoal.transport.auth.AuthError` whose ``reason`` tells the device what to do. The keys
are a :class:`~shoal.transport.auth.Keyring`; revoked token ids a
:class:`~shoal.transport.revocation.RevocationList`. See ``docs/security.md``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.errors import ConfigError, int_at_least
from shoal.transport.auth import AuthError, Keyring, b64url, is_key_id

if TYPE_CHECKING:
    from shoal.transport.revocation import RevocationList

__all__ = ["KNOWN_SCOPES", "MAX_TOKEN_CHARS", "Claims", "VerifiedTokens", "admit_claims",
           "issue_token", "verify_token"]

KNOWN_SCOPES = frozenset({"checkin", "upload"})
"""Scopes a token may grant."""
DEFAULT_SCOPE = ("checkin", "upload")
MAX_TOKEN_CHARS = 2048
"""Tokens longer than this are refused before any decoding."""
MAX_DEVICE_ID_CHARS = 128

_DOMAIN = b"shoal-device-token-v1\x00"
_FIELDS = frozenset({"v", "sub", "iat", "exp", "jti", "scope"})
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_JTI = re.compile(r"[A-Za-z0-9_-]{22}")
_MAX_TIME = 2**53  # integers JSON round-trips exactly everywhere


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


def _as_keyring(secret: bytes | Keyring) -> Keyring:
    return secret if isinstance(secret, Keyring) else Keyring.single(secret)


def _b64decode(text: str, what: str) -> bytes:
    """Strict unpadded base64url: alphabet, length and canonical trailing bits."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise AuthError("malformed", f"{what} is not unpadded base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(raw) != text:
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
              "jti": b64url(secrets.token_bytes(16)), "scope": list(scope)}
    payload = b64url(json.dumps(claims, sort_keys=True, separators=(",", ":"),
                                ensure_ascii=False).encode("utf-8"))
    signed = f"{ring.active_kid}.{payload}"
    return f"{signed}.{b64url(_tag(ring.keys[ring.active_kid], signed))}"


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json(text: str) -> Any:
    """:func:`json.loads` refusing duplicate keys and ``NaN``/``Infinity`` (``ValueError``)."""
    return json.loads(text, object_pairs_hook=_json_pairs, parse_constant=_reject_constant)


def is_token_id(jti: object) -> bool:
    """Whether ``jti`` has the shape of a token id (22 base64url characters)."""
    return isinstance(jti, str) and _JTI.fullmatch(jti) is not None


def is_int(x: object) -> bool:
    """Whether ``x`` is an ``int`` and not a ``bool``."""
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_claims(raw: bytes, kid: str) -> Claims:
    try:
        obj = strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise AuthError("malformed", "claims are not a JSON object") from None
    if not isinstance(obj, dict):
        raise AuthError("malformed", "claims are not a JSON object")
    if obj.keys() != _FIELDS:
        extra, missing = sorted(obj.keys() - _FIELDS), sorted(_FIELDS - obj.keys())
        raise AuthError("malformed", f"claims have extra fields {extra} / missing {missing}")
    v, sub, iat, exp, jti, scope = (obj[k] for k in ("v", "sub", "iat", "exp", "jti", "scope"))
    if not is_int(v) or v != 1:
        raise AuthError("malformed", f"unsupported token version {v!r}")
    if (not isinstance(sub, str) or not 1 <= len(sub) <= MAX_DEVICE_ID_CHARS
            or not sub.isprintable()):
        raise AuthError("malformed", "claim 'sub' is not a valid device id")
    if not (is_int(iat) and is_int(exp) and 0 <= iat < exp <= _MAX_TIME):
        raise AuthError("malformed", "claims 'iat'/'exp' must be integers, 0 <= iat < exp")
    if not is_token_id(jti):
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
    _check_leeway(leeway_seconds)
    if token is None or token == "":
        raise AuthError("missing", "no token presented", device_id=expected_device)
    return admit_claims(_authentic(ring, token), now=now, expected_device=expected_device,
                        required_scope=required_scope, revoked=revoked,
                        leeway_seconds=leeway_seconds)


def _check_leeway(leeway_seconds: float) -> None:
    if not math.isfinite(leeway_seconds) or leeway_seconds < 0:
        raise ConfigError(f"leeway_seconds must be finite and >= 0, got {leeway_seconds!r}",
                          key="leeway_seconds")


def _authentic(ring: Keyring, token: object) -> Claims:
    """The claims of a present ``token`` whose envelope, key id and HMAC tag check out (what
    depends on the token's bytes and the keyring only; nothing about time or revocation)."""
    if not isinstance(token, str):
        raise AuthError("malformed", "token is not a string")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError("malformed", f"token is {len(token)} characters, more than "
                                     f"{MAX_TOKEN_CHARS}")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("malformed", "token must have three dot-separated parts")
    kid, payload_text, tag_text = parts
    if not is_key_id(kid):
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
    return _parse_claims(payload, kid)


def admit_claims(claims: Claims, *, now: float, expected_device: str | None = None,
                 required_scope: str | None = None, revoked: RevocationList | None = None,
                 leeway_seconds: float = 60.0) -> Claims:
    """The checks of :func:`verify_token` after authentication, which change with time and
    the revocation list: not revoked, within its validity (± leeway), bound to
    ``expected_device``, granting ``required_scope``.

    Raises:
        AuthError: with ``reason`` saying which check failed.
    """
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


class VerifiedTokens:
    """:func:`verify_token` for a server that sees the same tokens again and again: a bounded
    LRU map from a token's text to its authenticated claims spares the base64 decoding, the
    HMAC and the JSON parse of a token already authenticated. Only authentication is cached:
    revocation, expiry, device and scope are checked on every call (:func:`admit_claims`), a
    token whose key left the keyring is refused, and a refused token is never cached.

    Args:
        keyring: the keys that verify.
        max_entries: tokens remembered (least recently used dropped first), ≥ 1.
        leeway_seconds: tolerated clock skew, ≥ 0.
    """

    def __init__(self, keyring: Keyring, max_entries: int = 4096,
                 leeway_seconds: float = 60.0) -> None:
        _check_leeway(leeway_seconds)
        self.keyring, self.leeway_seconds = keyring, float(leeway_seconds)
        self.max_entries = int_at_least(max_entries, "max_entries", 1)
        self._known: OrderedDict[str, tuple[Claims, bytes]] = OrderedDict()

    def verify(self, token: str | None, *, now: float, expected_device: str | None = None,
               required_scope: str | None = None,
               revoked: RevocationList | None = None) -> Claims:
        """As :func:`verify_token` with this cache's keyring and leeway.

        Raises:
            AuthError: with ``reason`` saying which check failed.
        """
        if token is None or token == "":
            raise AuthError("missing", "no token presented", device_id=expected_device)
        known = self._known.get(token) if isinstance(token, str) else None
        if known is not None and self.keyring.keys.get(known[0].kid) == known[1]:
            self._known.move_to_end(token)
            claims = known[0]
        else:
            claims = _authentic(self.keyring, token)
            self._known[token] = (claims, self.keyring.keys[claims.kid])
            if len(self._known) > self.max_entries:
                self._known.popitem(last=False)
        return admit_claims(claims, now=now, expected_device=expected_device,
                            required_scope=required_scope, revoked=revoked,
                            leeway_seconds=self.leeway_seconds)
