"""Device authentication for the gRPC deployment: the keys that sign device tokens, and the
errors of a refused credential. Pure and stdlib-only: no sockets, no clocks.

:class:`Keyring` rotates keys (one issues, older ones verify); :func:`load_or_create_secret`
keeps the server's token secret in a private file. Tokens themselves are
:mod:`shoal.transport.tokens`, revocation :mod:`shoal.transport.revocation`. The rate limiter
lives in :mod:`shoal.transport.limits` and is re-exported here. See ``docs/security.md``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TypeGuard

from shoal.errors import ConfigError, ShoalError
from shoal.store.atomic import fsync_dir
from shoal.transport.limits import RateLimiter

__all__ = [
    "AUTH_REASONS", "SECRET_BYTES", "AuthError", "CredentialFileError",
    "Keyring", "key_id", "load_or_create_secret", "RateLimiter",
]

AUTH_REASONS = frozenset({"missing", "malformed", "bad_signature", "expired", "not_yet_valid",
                          "wrong_device", "revoked", "scope"})
"""Every value :attr:`AuthError.reason` takes."""
SECRET_BYTES = 32
"""Length of generated secrets; shorter secrets are refused."""

_KID = re.compile(r"[A-Za-z0-9_-]{1,32}")


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
    return b64url(hashlib.sha256(b"shoal-kid\x00" + secret).digest()[:6])


def b64url(raw: bytes) -> str:
    """Unpadded base64url of ``raw`` (the encoding of key ids and of every token part)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _check_secret(secret: object, what: str) -> bytes:
    if not isinstance(secret, bytes | bytearray) or len(secret) < SECRET_BYTES:
        raise ConfigError(f"{what} must be at least {SECRET_BYTES} bytes", key=what)
    return bytes(secret)


def is_key_id(kid: object) -> TypeGuard[str]:
    """Whether ``kid`` is a valid key id: 1-32 characters of ``[A-Za-z0-9_-]``."""
    return isinstance(kid, str) and _KID.fullmatch(kid) is not None


def _check_kid(kid: object) -> str:
    if not is_key_id(kid):
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
