"""TLS certificates for ``shoal certs``: a local certificate authority, server and client
(mutual-TLS) certificates, and checks for certificates users bring themselves.

This is shoal's second module that imports ``cryptography`` (the first,
:mod:`shoal.privacy.crypto`, wraps the secure-aggregation primitives): X.509 is a transport
concern with its own API surface (``cryptography.x509``), and keeping it out of the SecAgg
module keeps that one small enough to audit in the trust boundary.

Choices, following the CA/Browser Forum baseline profile where it applies to a private PKI:
ECDSA P-256 keys with SHA-256 signatures (what every TLS stack and gRPC's BoringSSL accept);
a CA with ``BasicConstraints(ca=True, path_length=0)`` and ``keyCertSign``/``cRLSign`` only;
leaf certificates with ``digitalSignature``, the matching extended key usage (server or client
authentication), subject and authority key identifiers; server names only in the
subjectAltName (``localhost``, ``127.0.0.1``, ``::1`` and the user's names — clients ignore the
common name). Validity starts five minutes before ``now`` to absorb clock skew and never
outlasts the CA. Keys are unencrypted PKCS#8 PEM, written with mode 0600; every file is written
atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.errors import ConfigError
from shoal.store.atomic import fsync_dir, replace_atomically
from shoal.transport.auth import CredentialFileError

__all__ = [
    "DEFAULT_HOSTNAMES",
    "PkiPaths",
    "ClientCertPaths",
    "CertInfo",
    "make_local_pki",
    "make_client_cert",
    "load_pem_check",
    "client_identity",
    "load_client_ca",
]

DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1", "::1")
"""Names every generated server certificate covers."""
_SKEW = dt.timedelta(minutes=5)
_MAX_DAYS = 3650
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class PkiPaths:
    """Files written by :func:`make_local_pki`. ``ca_key`` signs client certificates; keep it
    offline once they are issued."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    ca_key: Path


@dataclass(frozen=True)
class ClientCertPaths:
    """Files written by :func:`make_client_cert`."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertInfo:
    """What :func:`load_pem_check` found in a valid certificate/key pair."""

    cert_path: Path
    key_path: Path
    subject: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    sha256_fingerprint: str
    """Hex SHA-256 of the certificate's DER encoding (what ``openssl x509 -fingerprint
    -sha256`` prints, without colons)."""


# --------------------------------------------------------------------------- generation

def _check_now(now: dt.datetime) -> dt.datetime:
    if not isinstance(now, dt.datetime) or now.tzinfo is None:
        raise ConfigError(f"now must be a timezone-aware datetime, got {now!r}", key="now")
    return now.astimezone(dt.timezone.utc)


def _check_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= _MAX_DAYS:
        raise ConfigError(f"days must be an integer in [1, {_MAX_DAYS}], got {days!r}",
                          key="days")
    return days


def _san_entries(hostnames: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in (*DEFAULT_HOSTNAMES, *hostnames):
        if not isinstance(raw, str):
            raise ConfigError(f"hostname {raw!r} is not a string", key="hostnames")
        name = raw.strip().lower()
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            if len(name) > 253 or not _DNS_NAME.fullmatch(name):
                raise ConfigError(f"hostname {raw!r} is neither an IP address nor a DNS name",
                                  key="hostnames") from None
            entry: x509.GeneralName = x509.DNSName(name)
            canonical = name
        else:
            entry, canonical = x509.IPAddress(ip), str(ip)
        if canonical not in seen:
            seen.add(canonical)
            names.append(entry)
    return names


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _leaf(subject: x509.Name, key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
          ca_key: ec.EllipticCurvePrivateKey, *, now: dt.datetime, days: int,
          usage: x509.ObjectIdentifier,
          sans: Sequence[x509.GeneralName] = ()) -> x509.Certificate:
    not_after = min(now + dt.timedelta(days=days), ca.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _refuse_overwrite(paths: Iterable[Path], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise CredentialFileError(
                f"{path} already exists; pass overwrite=True (--overwrite) to replace it "
                f"(a replaced CA invalidates every certificate it issued)", path)


def make_local_pki(out_dir: str | os.PathLike[str], *, hostnames: Iterable[str] = (),
                   days: int = 365, now: dt.datetime, overwrite: bool = False) -> PkiPaths:
    """Create a self-signed CA and a server certificate signed by it, for local use.

    Writes ``ca.pem``, ``ca.key``, ``server.pem`` and ``server.key`` into ``out_dir`` (keys
    mode 0600, certificates 0644). The server certificate's subjectAltName covers
    :data:`DEFAULT_HOSTNAMES` and ``hostnames`` (DNS names, ``*.`` wildcards or IP addresses).

    Args:
        days: validity of both certificates from ``now``, 1-3650.
        now: a timezone-aware datetime (the caller's clock).
        overwrite: replace existing files; otherwise refuse.

    Raises:
        ConfigError: an invalid hostname, ``days`` or ``now``.
        CredentialFileError: a target file exists and ``overwrite`` is false.
    """
    now, days = _check_now(now), _check_days(days)
    sans = _san_entries(hostnames)
    out = Path(out_dir)
    paths = PkiPaths(ca_cert=out / "ca.pem", server_cert=out / "server.pem",
                     server_key=out / "server.key", ca_key=out / "ca.key")
    _refuse_overwrite((paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key),
                      overwrite)

    ca_key = _new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "shoal local CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = _new_key()
    server_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "shoal aggregator")])
    server = _leaf(server_name, server_key, ca, ca_key, now=now, days=days,
                   usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans)

    replace_atomically(paths.ca_key, _key_pem(ca_key), mode=0o600)
    replace_atomically(paths.ca_cert, _cert_pem(ca), mode=0o644)
    replace_atomically(paths.server_key, _key_pem(server_key), mode=0o600)
    replace_atomically(paths.server_cert, _cert_pem(server), mode=0o644)
    fsync_dir(out)
    return paths


def make_client_cert(out_dir: str | os.PathLike[str], *, name: str,
                     ca_cert: str | os.PathLike[str], ca_key: str | os.PathLike[str],
                     days: int = 365, now: dt.datetime,
                     overwrite: bool = False) -> ClientCertPaths:
    """Issue a client certificate for mutual TLS (a cross-silo participant), signed by the CA
    of :func:`make_local_pki`.

    Writes ``client-<name>.pem`` and ``client-<name>.key`` (mode 0600) into ``out_dir``. The
    subject's common name is ``name``, which the server reads as the silo's identity; the
    extended key usage is client authentication only. Validity is capped at the CA's.

    Raises:
        ConfigError: ``name`` is not 1-64 characters of ``[A-Za-z0-9._-]``, or bad days/now.
        CredentialFileError: the CA pair fails :func:`load_pem_check` or is not a CA, or a
            target exists and ``overwrite`` is false.
    """
    now, days = _check_now(now), _check_days(days)
    if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name):
        raise ConfigError(f"client name {name!r} must be 1-64 characters of [A-Za-z0-9._-]",
                          key="name")
    info = load_pem_check(ca_cert, ca_key, now=now)
    if not info.is_ca:
        raise CredentialFileError(f"{ca_cert} is not a CA certificate (basicConstraints)",
                                  ca_cert)
    ca = x509.load_pem_x509_certificates(Path(ca_cert).read_bytes())[0]
    signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise CredentialFileError(f"{ca_key} is not an ECDSA key", ca_key)
    out = Path(out_dir)
    paths = ClientCertPaths(cert=out / f"client-{name}.pem", key=out / f"client-{name}.key")
    _refuse_overwrite((paths.cert, paths.key), overwrite)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = _leaf(subject, key, ca, signer, now=now, days=days,
                 usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    replace_atomically(paths.key, _key_pem(key), mode=0o600)
    replace_atomically(paths.cert, _cert_pem(cert), mode=0o644)
    fsync_dir(out)
    return paths


# --------------------------------------------------------------------------- checks

def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CredentialFileError(f"{what} {path} does not exist", path) from None
    except OSError as exc:
        raise CredentialFileError(f"cannot read {what} {path}: {exc}", path) from None


def _load_certs(path: Path, what: str) -> list[x509.Certificate]:
    data = _read(path, what)  # outside the try: CredentialFileError is a ValueError too
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CredentialFileError(f"{what} {path} is not a PEM certificate", path) from None
    return certs


def _check_validity(cert: x509.Certificate, path: Path, now: dt.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise CredentialFileError(f"{what} {path} is not valid until "
                                  f"{cert.not_valid_before_utc.isoformat()}", path)
    if now >= cert.not_valid_after_utc:
        raise CredentialFileError(f"{what} {path} expired on "
                                  f"{cert.not_valid_after_utc.isoformat()}", path)


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def load_pem_check(cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str], *,
                   now: dt.datetime, ca_path: str | os.PathLike[str] | None = None,
                   strict_permissions: bool = True) -> CertInfo:
    """Check a certificate/key pair before serving with it, and describe it.

    ``cert_path`` holds the certificate, optionally followed by its intermediates (leaf
    first). Checks: both files parse (an encrypted key is refused: the server must start
    unattended); the key is readable by its owner only if ``strict_permissions`` (POSIX; turn
    off for secret mounts such as Kubernetes' default 0644); the key's public key equals the
    certificate's; the certificate is valid at ``now``; with ``ca_path``, every certificate in
    the file is signed by the next and the last by a certificate in ``ca_path``, itself valid.

    Raises:
        CredentialFileError: naming the offending file (``.path``) and what is wrong with it.
        ConfigError: ``now`` is not timezone-aware.
    """
    now = _check_now(now)
    cert_path, key_path = Path(cert_path), Path(key_path)
    chain = _load_certs(cert_path, "certificate file")
    leaf = chain[0]

    key_bytes = _read(key_path, "private key file")
    if strict_permissions and os.name == "posix":
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise CredentialFileError(
                f"private key file {key_path} has permissions {mode:04o}; it must be readable "
                f"by its owner only (chmod 600 {key_path})", key_path)
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except TypeError:
        raise CredentialFileError(f"private key file {key_path} is encrypted; give an "
                                  f"unencrypted key (mode 0600)", key_path) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CredentialFileError(f"private key file {key_path} is not a PEM private key",
                                  key_path) from None
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise CredentialFileError(f"private key file {key_path} does not match the "
                                  f"certificate in {cert_path}", key_path)
    _check_validity(leaf, cert_path, now, "certificate")

    if ca_path is not None:
        ca_path = Path(ca_path)
        roots = _load_certs(ca_path, "CA file")
        for child, parent in zip(chain, chain[1:]):
            if not _issued_by(child, parent):
                raise CredentialFileError(
                    f"certificate file {cert_path}: {child.subject.rfc4514_string()} is not "
                    f"issued by the next certificate in the file", cert_path)
        top = chain[-1]
        root = next((r for r in roots if r == top or _issued_by(top, r)), None)
        if root is None:
            raise CredentialFileError(f"certificate file {cert_path} is not issued by the CA "
                                      f"in {ca_path}", cert_path)
        _check_validity(root, ca_path, now, "CA certificate")

    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    try:
        is_ca = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    der = leaf.public_bytes(serialization.Encoding.DER)
    return CertInfo(cert_path=cert_path, key_path=key_path,
                    subject=leaf.subject.rfc4514_string(), dns_names=dns, ip_addresses=ips,
                    not_before=leaf.not_valid_before_utc, not_after=leaf.not_valid_after_utc,
                    is_ca=is_ca, sha256_fingerprint=hashlib.sha256(der).hexdigest())


# --------------------------------------------------------------------------- mutual TLS

def client_identity(cert_pem: bytes) -> str | None:
    """The device id a client certificate names, or ``None`` if it names none unambiguously.

    The id is the subject's common name, accepted only when the subject holds exactly one
    common-name attribute, in an RDN of its own, that is a valid device name
    (``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``, what :func:`make_client_cert` issues). Several CNs
    (tools disagree on which one counts), a multi-valued RDN, or a name with a NUL or other
    characters (TLS stacks that hand out C strings cut it short) yield ``None``.
    """
    try:
        subject = x509.load_pem_x509_certificate(cert_pem).subject
    except ValueError:
        return None
    found = [(rdn, attr) for rdn in subject.rdns for attr in rdn
             if attr.oid == NameOID.COMMON_NAME]
    if len(found) != 1 or len(found[0][0]) != 1:
        return None
    name = found[0][1].value
    if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name):
        return None
    return name


def load_client_ca(path: str | os.PathLike[str], *, now: dt.datetime) -> bytes:
    """Read and check a client-CA file for mutual TLS; returns its PEM bytes.

    Every certificate in it must parse, be a CA (basicConstraints) and be valid at ``now``:
    a wrong file would otherwise start a server that refuses every handshake silently.

    Raises:
        CredentialFileError: naming the file and what is wrong with it.
    """
    now, path = _check_now(now), Path(path)
    certs = _load_certs(path, "client CA file")
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise CredentialFileError(f"client CA file {path}: "
                                      f"{cert.subject.rfc4514_string()} is not a CA "
                                      f"certificate (basicConstraints)", path)
        _check_validity(cert, path, now, "client CA certificate")
    return _read(path, "client CA file")
