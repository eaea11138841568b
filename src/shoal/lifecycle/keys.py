"""The operator's signing key on disk, and the public key devices are provisioned with.

``shoal keys`` writes a pair of small JSON files (:func:`write_operator_key`):

* ``operator.key`` (mode 0600, for the aggregator only)::

      {"format": "shoal-signing-key/1", "scheme": "hybrid", "private": "<hex>"}

* ``operator.pub`` (give it to every device at enrolment, beside the CA certificate)::

      {"format": "shoal-trusted-key/1", "scheme": "hybrid", "public": "<hex>",
       "key_id": "<16 hex digits>"}

The aggregator signs models and plans with :func:`load_signer`; a device verifies them with
:func:`load_trusted_key` (:mod:`shoal.lifecycle.signing`). A private key readable by group or
others is refused, as the token secret is, and so is any file that is not exactly one of these
documents (wrong format, unknown scheme, a key of the wrong length, a key id that does not
match the public key).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from shoal.errors import ConfigError, ProtocolError
from shoal.lifecycle.signing import Signer, TrustedKey, key_id
from shoal.privacy import crypto
from shoal.store.atomic import fsync_dir, replace_atomically

__all__ = ["KEY_FILE", "PUBLIC_FILE", "KeyFileError", "load_signer", "load_trusted_key",
           "write_operator_key"]

KEY_FILE = "operator.key"
PUBLIC_FILE = "operator.pub"
_PRIVATE_FORMAT = "shoal-signing-key/1"
_PUBLIC_FORMAT = "shoal-trusted-key/1"
_MAX_BYTES = 16 << 10  # a hybrid public key in hex is ~4 KB


class KeyFileError(ConfigError):
    """A signing-key or trusted-key file is missing, unreadable, malformed or too widely
    readable.

    Attributes:
        path: the offending file.
    """

    def __init__(self, message: str, path: str | os.PathLike[str]) -> None:
        super().__init__(message, key="signing_key")
        self.path = str(path)


def write_operator_key(directory: str | Path, scheme: str, *, overwrite: bool = False
                       ) -> tuple[Path, Path]:
    """Make a fresh operator key pair of ``scheme`` (``ed25519``, ``ml-dsa-65`` or
    ``hybrid``) from the operating system's CSPRNG and write it into ``directory``.

    Returns:
        ``(private key file, public key file)``.

    Raises:
        ConfigError: unknown scheme, or a file exists and ``overwrite`` is false (nothing
            is written).
    """
    if scheme not in crypto.SIGNATURE_SCHEMES:
        raise ConfigError(f"unknown signature scheme {scheme!r}; choose one of "
                          f"{sorted(crypto.SIGNATURE_SCHEMES)}", key="scheme")
    directory = Path(directory)
    private, public = directory / KEY_FILE, directory / PUBLIC_FILE
    for path in (private, public):
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} already exists; pass --overwrite to replace it "
                              f"(devices provisioned with the old public key will then "
                              f"refuse everything signed with the new one)", key="out")
    key = crypto.generate_signing_key(scheme)
    replace_atomically(private, _document(_PRIVATE_FORMAT, scheme, private=key.private.hex()),
                       mode=0o600)
    replace_atomically(public, _document(_PUBLIC_FORMAT, scheme, public=key.public.hex(),
                                         key_id=key_id(key.public)), mode=0o644)
    fsync_dir(directory)
    return private, public


def _document(fmt: str, scheme: str, **fields: str) -> bytes:
    return (json.dumps({"format": fmt, "scheme": scheme, **fields}, indent=1,
                       sort_keys=True) + "\n").encode()


def _read(path: Path, fmt: str, field: str, *, private: bool) -> tuple[str, bytes, dict]:
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist (make one with `shoal keys`)",
                           path) from None
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be read: {exc}", path) from None
    try:
        if len(text) > _MAX_BYTES:
            raise ValueError("too large")
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != fmt:
            raise ValueError(f"not a {fmt} document")
        scheme = doc["scheme"]
        if scheme not in crypto.SIGNATURE_SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}")
        raw = bytes.fromhex(doc[field])
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"key file {path} is not a {'signing' if private else 'trusted'} "
                           f"key written by `shoal keys`: {exc}", path) from None
    # checked once the file is known to be a signing key: a public key handed over by
    # mistake is named as such, not as too widely readable
    if private and os.name == "posix" and mode & 0o077:
        raise KeyFileError(f"signing key {path} has permissions {stat.S_IMODE(mode):04o}; "
                           f"it must be readable by its owner only (chmod 600 {path})", path)
    return scheme, raw, doc


def load_signer(path: str | Path) -> Signer:
    """The operator's :class:`~shoal.lifecycle.signing.Signer` from ``operator.key``.

    Raises:
        KeyFileError: missing, readable by group or others, or malformed.
    """
    path = Path(path)
    scheme, raw, _ = _read(path, _PRIVATE_FORMAT, "private", private=True)
    try:
        return Signer(crypto.signing_key_from_private(scheme, raw))
    except ProtocolError as exc:
        raise KeyFileError(f"key file {path}: {exc}", path) from None


def load_trusted_key(path: str | Path) -> TrustedKey:
    """The :class:`~shoal.lifecycle.signing.TrustedKey` a device verifies with, from
    ``operator.pub``.

    Raises:
        KeyFileError: missing or malformed, a public key of the wrong length for its
            scheme, or a ``key_id`` that is not the public key's.
    """
    path = Path(path)
    scheme, raw, doc = _read(path, _PUBLIC_FORMAT, "public", private=False)
    length = crypto.SIGNATURE_SCHEMES[scheme][1]
    if len(raw) != length:
        raise KeyFileError(f"key file {path}: a {scheme} public key is {length} bytes, got "
                           f"{len(raw)}", path)
    trusted = TrustedKey(scheme, raw)
    if doc.get("key_id", trusted.id) != trusted.id:
        raise KeyFileError(f"key file {path}: key_id {doc['key_id']!r} is not the public "
                           f"key's ({trusted.id})", path)
    return trusted
