"""Local PKI for TLS and mutual TLS (shoal.transport.certs), checked with `cryptography`'s own
verification, the `openssl` command line when present, and real TLS handshakes through the
stdlib `ssl` module over a loopback socket pair."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.errors import ConfigError
from shoal.transport.auth import CredentialFileError
from shoal.transport.certs import load_pem_check, make_client_cert, make_local_pki

# The handshake tests use the real clock, so the certificates are issued for the real now.
NOW = dt.datetime.now(dt.timezone.utc)
HOSTS = ["aggregator.example", "*.edge.example", "10.0.0.5"]


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_local_pki(tmp_path_factory.mktemp("pki"), hostnames=HOSTS, days=30, now=NOW)


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    return make_local_pki(tmp_path_factory.mktemp("other"), days=30, now=NOW)


@pytest.fixture(scope="module")
def client(pki, tmp_path_factory):
    return make_client_cert(tmp_path_factory.mktemp("client"), name="hospital-a",
                            ca_cert=pki.ca_cert, ca_key=pki.ca_key, days=10, now=NOW)


# --------------------------------------------------------------------------- generation

def test_server_cert_is_issued_by_the_ca(pki, other_pki):
    ca, server = load(pki.ca_cert), load(pki.server_cert)
    server.verify_directly_issued_by(ca)  # raises if not
    ca.verify_directly_issued_by(ca)      # self-signed
    with pytest.raises(Exception):
        server.verify_directly_issued_by(load(other_pki.ca_cert))
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)
    assert server.public_key().curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_server_sans_and_validity(pki):
    server = load(pki.server_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "localhost", "aggregator.example", "*.edge.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.5")]
    assert server.not_valid_after_utc - server.not_valid_before_utc == dt.timedelta(
        days=30, minutes=5)
    assert server.not_valid_before_utc <= NOW < server.not_valid_after_utc


def test_file_modes(pki, client):
    for key in (pki.ca_key, pki.server_key, client.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for cert in (pki.ca_cert, pki.server_cert, client.cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert
    assert sorted(p.name for p in pki.ca_cert.parent.iterdir()) == [
        "ca.key", "ca.pem", "server.key", "server.pem"]  # no temporary files left


def test_refuses_to_overwrite_and_validates_inputs(pki, tmp_path):
    with pytest.raises(CredentialFileError, match="already exists") as info:
        make_local_pki(pki.ca_cert.parent, now=NOW)
    assert info.value.path == str(pki.ca_cert)
    with pytest.raises(ConfigError, match="hostname"):
        make_local_pki(tmp_path, hostnames=["bad host"], now=NOW)
    with pytest.raises(ConfigError, match="timezone"):
        make_local_pki(tmp_path, now=dt.datetime(2026, 1, 1))
    with pytest.raises(ConfigError, match="days"):
        make_local_pki(tmp_path, days=0, now=NOW)
    assert not any(tmp_path.iterdir())  # a refusal writes nothing


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command line not installed")
def test_openssl_agrees(pki, client):
    openssl = shutil.which("openssl")
    for cert, purpose in ((pki.server_cert, "sslserver"), (client.cert, "sslclient")):
        out = subprocess.run([openssl, "verify", "-purpose", purpose, "-CAfile",
                              str(pki.ca_cert), str(cert)], capture_output=True, text=True,
                             timeout=10)
        assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr
    wrong = subprocess.run([openssl, "verify", "-purpose", "sslserver", "-CAfile",
                            str(pki.ca_cert), str(client.cert)], capture_output=True,
                           timeout=10)
    assert wrong.returncode != 0  # a client certificate cannot serve


def test_client_cert(pki, client):
    cert = load(client.cert)
    cert.verify_directly_issued_by(load(pki.ca_cert))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hospital-a"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(
        days=10, minutes=5)
    # Validity is capped at the CA's.
    long = make_client_cert(client.cert.parent, name="long", ca_cert=pki.ca_cert,
                            ca_key=pki.ca_key, days=365, now=NOW)
    assert load(long.cert).not_valid_after_utc == load(pki.ca_cert).not_valid_after_utc


def test_client_cert_needs_a_ca(pki, tmp_path):
    with pytest.raises(CredentialFileError, match="not a CA") as info:
        make_client_cert(tmp_path, name="x", ca_cert=pki.server_cert, ca_key=pki.server_key,
                         now=NOW)
    assert info.value.path == str(pki.server_cert)
    with pytest.raises(ConfigError, match="client name"):
        make_client_cert(tmp_path, name="../evil", ca_cert=pki.ca_cert, ca_key=pki.ca_key,
                         now=NOW)


# --------------------------------------------------------------------------- checks

def test_load_pem_check_describes_a_good_pair(pki):
    info = load_pem_check(pki.server_cert, pki.server_key, now=NOW, ca_path=pki.ca_cert)
    assert "localhost" in info.dns_names and "::1" in info.ip_addresses and not info.is_ca
    assert info.sha256_fingerprint == load(pki.server_cert).fingerprint(hashes.SHA256()).hex()
    assert load_pem_check(pki.ca_cert, pki.ca_key, now=NOW).is_ca


def test_mismatched_key_is_rejected_naming_the_file(pki, other_pki):
    with pytest.raises(CredentialFileError) as info:
        load_pem_check(pki.server_cert, other_pki.server_key, now=NOW)
    assert info.value.path == str(other_pki.server_key)
    assert str(other_pki.server_key) in str(info.value) and "does not match" in str(info.value)


def test_expiry_and_not_yet_valid(pki):
    later = NOW + dt.timedelta(days=31)
    with pytest.raises(CredentialFileError, match="expired") as info:
        load_pem_check(pki.server_cert, pki.server_key, now=later)
    assert info.value.path == str(pki.server_cert)
    with pytest.raises(CredentialFileError, match="not valid until"):
        load_pem_check(pki.server_cert, pki.server_key, now=NOW - dt.timedelta(hours=1))


def test_wrong_ca_and_chain_file(pki, other_pki, tmp_path):
    with pytest.raises(CredentialFileError, match="not issued by the CA") as info:
        load_pem_check(pki.server_cert, pki.server_key, now=NOW, ca_path=other_pki.ca_cert)
    assert info.value.path == str(pki.server_cert)
    # A full chain file (leaf then CA) verifies against the CA.
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pki.server_cert.read_bytes() + pki.ca_cert.read_bytes())
    assert load_pem_check(chain, pki.server_key, now=NOW, ca_path=pki.ca_cert).dns_names
    wrong = tmp_path / "wrong-chain.pem"
    wrong.write_bytes(pki.server_cert.read_bytes() + other_pki.ca_cert.read_bytes())
    with pytest.raises(CredentialFileError, match="next certificate"):
        load_pem_check(wrong, pki.server_key, now=NOW, ca_path=other_pki.ca_cert)


def test_bad_files_are_named(pki, tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(CredentialFileError, match="does not exist") as info:
        load_pem_check(missing, pki.server_key, now=NOW)
    assert info.value.path == str(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    with pytest.raises(CredentialFileError, match="not a PEM certificate"):
        load_pem_check(garbage, pki.server_key, now=NOW)
    os.chmod(garbage, 0o600)
    with pytest.raises(CredentialFileError, match="not a PEM private key") as info:
        load_pem_check(pki.server_cert, garbage, now=NOW)
    assert info.value.path == str(garbage)

    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")))
    os.chmod(encrypted, 0o600)
    with pytest.raises(CredentialFileError, match="encrypted"):
        load_pem_check(pki.server_cert, encrypted, now=NOW)

    loose = tmp_path / "loose.key"
    loose.write_bytes(pki.server_key.read_bytes())
    os.chmod(loose, 0o644)
    with pytest.raises(CredentialFileError, match="chmod 600") as info:
        load_pem_check(pki.server_cert, loose, now=NOW)
    assert info.value.path == str(loose)
    assert load_pem_check(pki.server_cert, loose, now=NOW, strict_permissions=False)


# --------------------------------------------------------------------------- real TLS

def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              server_hostname: str = "localhost") -> tuple[object, object]:
    """Run both ends of a TLS handshake over a socket pair and exchange one message; return
    (server outcome, client outcome): the peer certificate / echoed bytes, or the exception."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                peer = s.getpeercert()
                s.sendall(s.recv(5))
                result["server"] = peer
        except (ssl.SSLError, OSError) as exc:
            result["server"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_hostname) as c:
            c.sendall(b"hello")
            got = c.recv(5)
            result["client"] = got if got else ConnectionError("closed")
    except (ssl.SSLError, OSError) as exc:
        result["client"] = exc
    thread.join(timeout=10)
    assert not thread.is_alive(), "handshake did not finish in time"
    a.close()
    b.close()
    return result["server"], result["client"]


def server_context(pki, *, require_client: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki.ca_cert)
    return ctx


def client_context(ca, cert=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


def test_tls_handshake_with_generated_certificates(pki):
    server, client = handshake(server_context(pki), client_context(pki.ca_cert))
    assert client == b"hello"
    for name in ("127.0.0.1", "aggregator.example", "x.edge.example"):
        assert handshake(server_context(pki), client_context(pki.ca_cert), name)[1] == b"hello"


def test_tls_handshake_refuses_wrong_name_or_ca(pki, other_pki):
    _, client = handshake(server_context(pki), client_context(pki.ca_cert), "evil.example")
    assert isinstance(client, ssl.SSLCertVerificationError)
    _, client = handshake(server_context(pki), client_context(other_pki.ca_cert))
    assert isinstance(client, ssl.SSLCertVerificationError)


def test_mutual_tls(pki, other_pki, client, tmp_path):
    server, echoed = handshake(server_context(pki, require_client=True),
                               client_context(pki.ca_cert, client))
    assert echoed == b"hello"
    assert dict(x[0] for x in server["subject"])["commonName"] == "hospital-a"
    # Without a client certificate, or with one from another CA, the server refuses.
    server, _ = handshake(server_context(pki, require_client=True),
                          client_context(pki.ca_cert))
    assert isinstance(server, ssl.SSLError)
    stranger = make_client_cert(tmp_path, name="stranger", ca_cert=other_pki.ca_cert,
                                ca_key=other_pki.ca_key, now=NOW)
    server, _ = handshake(server_context(pki, require_client=True),
                          client_context(pki.ca_cert, stranger))
    assert isinstance(server, ssl.SSLError)


def test_public_api():
    import shoal.transport.certs as certs

    assert sorted(certs.__all__) == sorted([
        "DEFAULT_HOSTNAMES", "PkiPaths", "ClientCertPaths", "CertInfo", "make_local_pki",
        "make_client_cert", "load_pem_check", "client_identity", "load_client_ca"])
    for name in certs.__all__:
        assert hasattr(certs, name)
