"""The aggregator's call gate without a network: each refusal with its status and reason, and
a valid call let through as the device its token names."""

from __future__ import annotations

import datetime as dt

import pytest

from shoal.observers import CarrierObserver
from shoal.transport.auth import Keyring
from shoal.transport.certs import make_client_cert, make_local_pki
from shoal.transport.gate import CallGate, CallRefused
from shoal.transport.limits import RateLimiter
from shoal.transport.tokens import issue_token

SECRET = b"g" * 32
NOW = 1_800_000_000.0


class Refusals(CarrierObserver):
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def call_refused(self, reason: str) -> None:
        self.reasons.append(reason)


def bearer(device: str, *, now: float = NOW, ttl: int = 600, scope=("checkin", "upload")):
    token = issue_token(SECRET, device, now=now, ttl_seconds=ttl, scope=scope)
    return [("authorization", f"Bearer {token}")]


def gate(**kw) -> tuple[CallGate, Refusals]:
    seen = Refusals()
    return CallGate(Keyring.single(SECRET), RateLimiter(10.0, 3.0), metrics=seen, **kw), seen


def refused(g: CallGate, *args) -> CallRefused:
    with pytest.raises(CallRefused) as info:
        g.check(*args)
    return info.value


def test_a_valid_token_lets_its_device_through():
    g, seen = gate()
    assert g.check(bearer("dev-1"), b"", "dev-1", "upload", NOW) == "dev-1"
    assert g.check(bearer("dev-1"), b"", None, "checkin", NOW) == "dev-1"
    assert seen.reasons == []


@pytest.mark.parametrize("metadata, device, scope, now, reason", [
    ([], "dev-1", "upload", NOW, "missing"),
    ([("authorization", "Basic abc")], "dev-1", "upload", NOW, "missing"),
    ([("authorization", "Bearer not.a.token")], "dev-1", "upload", NOW, "malformed"),
    (bearer("dev-2"), "dev-1", "upload", NOW, "wrong_device"),
    (bearer("dev-1", ttl=60), "dev-1", "upload", NOW + 121, "expired"),  # 60 s of leeway
    (bearer("dev-1", scope=("checkin",)), "dev-1", "upload", NOW, "scope"),
])
def test_a_bad_token_is_unauthenticated_with_its_reason(metadata, device, scope, now, reason):
    g, seen = gate()
    exc = refused(g, metadata, b"", device, scope, now)
    assert (exc.status, exc.reason) == ("unauthenticated", reason)
    assert seen.reasons == [reason]


def test_the_rate_limit_refuses_past_the_burst_and_refills():
    g, seen = gate()
    for _ in range(3):
        g.check(bearer("dev-1"), b"", "dev-1", "checkin", NOW)
    exc = refused(g, bearer("dev-1"), b"", "dev-1", "checkin", NOW)
    assert (exc.status, exc.reason) == ("resource_exhausted", "rate_limited")
    assert "retry in" in str(exc)
    assert g.check(bearer("dev-2"), b"", "dev-2", "checkin", NOW) == "dev-2"  # per device
    assert g.check(bearer("dev-1"), b"", "dev-1", "checkin", NOW + 0.2) == "dev-1"
    assert seen.reasons == ["rate_limited"]


def test_with_mutual_tls_a_token_works_only_with_its_devices_certificate(tmp_path):
    now = dt.datetime.fromtimestamp(NOW, dt.timezone.utc)
    pki = make_local_pki(tmp_path, days=1, now=now)
    mine = make_client_cert(tmp_path, name="dev-1", ca_cert=pki.ca_cert, ca_key=pki.ca_key,
                            now=now)
    other = make_client_cert(tmp_path, name="dev-2", ca_cert=pki.ca_cert, ca_key=pki.ca_key,
                             now=now)
    g, seen = gate(bind_to_certificates=True)
    cert = mine.cert.read_bytes()
    assert g.check(bearer("dev-1"), cert, "dev-1", "upload", NOW) == "dev-1"
    # dev-1's stolen token presented with dev-2's certificate, or with none
    for pem in (other.cert.read_bytes(), b""):
        exc = refused(g, bearer("dev-1"), pem, "dev-1", "upload", NOW)
        assert (exc.status, exc.reason) == ("permission_denied", "identity")
    assert seen.reasons == ["identity", "identity"]


def test_a_flood_of_refused_calls_is_counted_in_full_but_logged_within_a_budget(caplog):
    g, seen = gate()
    with caplog.at_level("WARNING", logger="shoal.aggregator"):
        for i in range(1000):  # forged calls, all in the same second
            with pytest.raises(CallRefused):
                g.authenticate([("authorization", "Bearer forged.token.x")], NOW)
        assert len(seen.reasons) == 1000  # every refusal is counted
        assert len(caplog.records) == 10  # the burst, then at most one a second
        with pytest.raises(CallRefused):
            g.authenticate([], NOW + 5)  # another reason: its own budget
        with pytest.raises(CallRefused):
            g.authenticate([("authorization", "Bearer forged.token.x")], NOW + 5)
    fields = [r.fields for r in caplog.records]
    assert [f["reason"] for f in fields[-2:]] == ["missing", "malformed"]
    assert fields[-1]["suppressed"] == 990  # the lines left out, accounted for


def test_a_token_seen_before_is_still_refused_once_revoked_expired_or_its_key_retired():
    # the gate remembers authenticated tokens; what changes after that must still refuse
    from shoal.transport.revocation import RevocationList
    from shoal.transport.tokens import VerifiedTokens, verify_token
    token = issue_token(SECRET, "dev-1", now=NOW, ttl_seconds=60)
    jti = verify_token(SECRET, token, now=NOW).jti
    tokens = VerifiedTokens(Keyring.single(SECRET), max_entries=2)
    assert tokens.verify(token, now=NOW, expected_device="dev-1").sub == "dev-1"
    with pytest.raises(Exception, match="revoked"):
        tokens.verify(token, now=NOW, revoked=RevocationList().revoke(jti, int(NOW) + 60))
    with pytest.raises(Exception, match="expired"):
        tokens.verify(token, now=NOW + 121)
    with pytest.raises(Exception, match="another device"):
        tokens.verify(token, now=NOW, expected_device="dev-2")
    tokens.keyring = Keyring.single(b"h" * 32)  # the token's key retired
    with pytest.raises(Exception, match="unknown key id"):
        tokens.verify(token, now=NOW)
    # a token with a forged tag is refused every time, however often a valid twin was seen
    tokens.keyring = Keyring.single(SECRET)
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BA")
    for _ in range(2):
        assert tokens.verify(token, now=NOW).sub == "dev-1"
        with pytest.raises(Exception, match="tag|canonical"):
            tokens.verify(forged, now=NOW)


def test_the_gate_refuses_a_revoked_token_on_its_next_call(tmp_path):
    from shoal.transport.revocation import RevocationFile, RevocationList
    from shoal.transport.tokens import verify_token
    path = tmp_path / "revoked.json"
    path.write_text(RevocationList().to_json())
    g, seen = gate(revocations=RevocationFile(path, check_every_s=0.0))
    metadata = bearer("dev-1")
    assert g.authenticate(metadata, NOW) == "dev-1"
    jti = verify_token(SECRET, metadata[0][1][len("Bearer "):], now=NOW).jti
    path.write_text(RevocationList().revoke(jti, int(NOW) + 600).to_json())
    with pytest.raises(CallRefused) as info:
        g.authenticate(metadata, NOW)
    assert info.value.reason == "revoked" and seen.reasons == ["revoked"]
