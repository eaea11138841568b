"""Mutual TLS (cross-silo) on real loopback sockets.

With a client CA the aggregator refuses, at the TLS handshake, any connection without a
client certificate that CA signed; and it refuses every call whose token is for another
device than the one the certificate names, so a stolen token is useless without its owner's
private key. Refused calls change nothing: the registry stays as it was.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest

grpc = pytest.importorskip("grpc")

from shoal.errors import ConfigError  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.transport.auth import Keyring  # noqa: E402
from shoal.transport.tokens import issue_token  # noqa: E402
from shoal.transport.certs import make_client_cert, make_local_pki  # noqa: E402
from shoal.transport.channel import make_channel  # noqa: E402
from shoal.transport.proto import shoal_pb2 as pb  # noqa: E402
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc  # noqa: E402
from shoal.telemetry import PrometheusObserver  # noqa: E402
from shoal.transport.server import AggregatorService, AggregatorSettings, serve  # noqa: E402

SECRET = b"m" * 32
NOW = dt.datetime.now(dt.timezone.utc)


def md(device: str):
    token = issue_token(SECRET, device, now=time.time(), ttl_seconds=600)
    return (("authorization", f"Bearer {token}"),)


def hello(channel, device: str):
    return pb_grpc.AggregatorStub(channel).Hello(pb.HelloRequest(device_id=device),
                                                 metadata=md(device), timeout=5)


def enrolled(path) -> set[str]:
    reg = SQLiteRegistry(path)
    try:
        return {d.device_id for d in reg.list()}
    finally:
        reg.close()


@pytest.fixture()
def silo(tmp_path):
    pki = make_local_pki(tmp_path / "pki", days=1, now=NOW)
    certs = {name: make_client_cert(tmp_path / "pki", name=name, ca_cert=pki.ca_cert,
                                    ca_key=pki.ca_key, days=1, now=NOW)
             for name in ("hospital-a", "hospital-b")}
    other = make_local_pki(tmp_path / "other", days=1, now=NOW)  # a CA the server does not trust
    rogue = make_client_cert(tmp_path / "other", name="hospital-a", ca_cert=other.ca_cert,
                             ca_key=other.ca_key, days=1, now=NOW)
    service = AggregatorService(AggregatorSettings(), Keyring.single(SECRET), 10, "fp",
                                lambda: SQLiteRegistry(tmp_path / "r.db"),
                                metrics=PrometheusObserver())
    port, stop = serve(service, tls=(pki.server_cert.read_bytes(), pki.server_key.read_bytes()),
                       client_ca=pki.ca_cert.read_bytes())
    channels = []

    def connect(paths=None):
        pair = None if paths is None else (paths.cert.read_bytes(), paths.key.read_bytes())
        ch = make_channel(f"localhost:{port}", pki.ca_cert.read_bytes(), pair)
        channels.append(ch)
        return ch

    try:
        yield {"connect": connect, "certs": certs, "rogue": rogue, "service": service,
               "registry": tmp_path / "r.db", "pki": tmp_path / "pki"}
    finally:
        for ch in channels:
            ch.close()
        stop()


def test_a_silo_with_its_certificate_and_token_is_served(silo):
    reply = hello(silo["connect"](silo["certs"]["hospital-a"]), "hospital-a")
    assert reply.server_id == "shoal"
    assert enrolled(silo["registry"]) == {"hospital-a"}


@pytest.mark.parametrize("case", ["no_certificate", "untrusted_ca"])
def test_a_connection_without_a_trusted_client_certificate_fails_the_handshake(silo, case):
    channel = silo["connect"](None if case == "no_certificate" else silo["rogue"])
    with pytest.raises(grpc.RpcError) as info:
        hello(channel, "hospital-a")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert enrolled(silo["registry"]) == set()


def test_a_token_for_another_silo_is_refused_and_changes_nothing(silo):
    hello(silo["connect"](silo["certs"]["hospital-a"]), "hospital-a")
    # hospital-b's certificate with hospital-a's (stolen) token
    with pytest.raises(grpc.RpcError) as info:
        hello(silo["connect"](silo["certs"]["hospital-b"]), "hospital-a")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "identity" in info.value.details() and "hospital-b" in info.value.details()
    assert silo["service"].metrics.value("shoal_refused_calls_total",
                                         reason="identity") == 1
    assert enrolled(silo["registry"]) == {"hospital-a"}


def _forged(tmp_path, pki_dir, subject):
    """A client certificate with ``subject``, signed by the trusted CA (as a CA the operator
    does not control might issue it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from shoal.transport.certs import ClientCertPaths, _leaf

    ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    signer = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(subject, key, ca, signer, now=NOW, days=1,
                 usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    out = ClientCertPaths(cert=tmp_path / "forged.pem", key=tmp_path / "forged.key")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return out


@pytest.mark.parametrize("case", ["nul", "two_cns", "multi_valued_rdn", "no_cn"])
def test_ambiguous_certificate_names_are_refused(silo, tmp_path, case):
    """gRPC reports the first CN, cut at a NUL; the aggregator reads the certificate itself
    and accepts exactly one valid device name, so none of these passes as hospital-a."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    def cn(v):
        return x509.NameAttribute(NameOID.COMMON_NAME, v)

    subject = {
        "nul": x509.Name([cn("hospital-a\x00.evil.example")]),
        "two_cns": x509.Name([cn("hospital-a"), cn("hospital-b")]),
        "multi_valued_rdn": x509.Name([x509.RelativeDistinguishedName(
            [cn("hospital-a"), cn("hospital-b")])]),
        "no_cn": x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hospital-a")]),
    }[case]
    forged = _forged(tmp_path, silo["pki"], subject)
    with pytest.raises(grpc.RpcError) as info:
        hello(silo["connect"](forged), "hospital-a")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no single valid device name" in info.value.details()
    assert enrolled(silo["registry"]) == set()


def test_mutual_tls_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="needs TLS"):
        make_channel("localhost:1", None, (b"cert", b"key"))
    service = AggregatorService(AggregatorSettings(), Keyring.single(SECRET), 10, "fp",
                                lambda: None)
    with pytest.raises(ConfigError, match="client CA"):
        serve(service, client_ca=b"ca")
