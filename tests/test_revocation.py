"""Token revocation in a running aggregator: `shoal revoke` adds a token to the list, the
aggregator re-reads the list and refuses that token (reason "revoked") while every other
device keeps working; a broken list never lets revoked tokens back in."""

from __future__ import annotations

import time

import pytest

grpc = pytest.importorskip("grpc")

from shoal.cli import main  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.transport.auth import CredentialFileError, Keyring, load_or_create_secret  # noqa: E402
from shoal.transport.revocation import RevocationFile, RevocationList  # noqa: E402
from shoal.transport.tokens import issue_token  # noqa: E402
from shoal.transport.proto import shoal_pb2 as pb  # noqa: E402
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc  # noqa: E402
from shoal.telemetry import PrometheusObserver  # noqa: E402
from shoal.transport.server import AggregatorService, AggregatorSettings, serve  # noqa: E402


def test_a_revoked_token_is_refused_by_the_running_aggregator(tmp_path, capsys):
    secret = load_or_create_secret(tmp_path / "secret")
    listed = tmp_path / "revoked.json"
    tokens = {d: issue_token(secret, d, now=time.time(), ttl_seconds=600)
              for d in ("dev-a", "dev-b")}
    (tmp_path / "dev-a.token").write_text(tokens["dev-a"] + "\n")
    service = AggregatorService(AggregatorSettings(), Keyring.single(secret), 10, "fp",
                                lambda: SQLiteRegistry(tmp_path / "r.db"),
                                revocations=RevocationFile(listed, check_every_s=0.0),
                                metrics=PrometheusObserver())
    port, stop = serve(service)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.AggregatorStub(channel)

    def hello(device):
        return stub.Hello(pb.HelloRequest(device_id=device), timeout=5,
                          metadata=(("authorization", f"Bearer {tokens[device]}"),))

    try:
        assert hello("dev-a").server_id == "shoal"
        assert main(["revoke", str(tmp_path / "dev-a.token"), "--secret",
                     str(tmp_path / "secret"), "--list", str(listed)]) == 0
        assert "revoked a token of 'dev-a'" in capsys.readouterr().out
        with pytest.raises(grpc.RpcError) as info:
            hello("dev-a")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.details().startswith("revoked")
        assert service.metrics.value("shoal_refused_calls_total", reason="revoked") == 1
        assert hello("dev-b").server_id == "shoal"  # nobody else is affected
        # a broken replacement keeps the last good list: dev-a stays refused
        listed.write_text("{not json")
        with pytest.raises(grpc.RpcError) as info:
            hello("dev-a")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.details().startswith("revoked")
        assert service.revocations.last_error is not None
        listed.unlink()  # a deleted list does not let it back in either
        with pytest.raises(grpc.RpcError) as info:
            hello("dev-a")
        assert info.value.details().startswith("revoked")
    finally:
        channel.close()
        stop()


def test_revocation_file_checks(tmp_path):
    path = tmp_path / "revoked.json"
    assert len(RevocationFile(path).current()) == 0  # missing at start: nothing revoked
    path.write_text("[]")
    with pytest.raises(CredentialFileError, match="revocation list"):
        RevocationFile(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(CredentialFileError, match="revocation list"):
        RevocationFile(path)
    jti = "A" * 22
    path.write_text(RevocationList().revoke(jti, 2**40).to_json())
    clock = [0.0]
    watched = RevocationFile(path, check_every_s=60.0, monotonic=lambda: clock[0])
    assert jti in watched.current()
    path.write_text(RevocationList().to_json())
    clock[0] = 30.0
    assert jti in watched.current()  # not looked at again before check_every_s
    clock[0] = 61.0
    assert jti not in watched.current()  # an explicit empty list un-revokes
    # nothing else does: a deleted, unreadable or malformed file keeps the last good list
    path.write_text(RevocationList().revoke(jti, 2**40).to_json())
    clock[0] = 130.0
    assert jti in watched.current() and watched.last_error is None
    for broken in (None, "{not json", "[" * 100_000):
        if broken is None:
            path.unlink()
        else:
            path.write_text(broken)
        clock[0] += 61.0
        assert jti in watched.current()
        assert watched.last_error is not None


def test_revoke_refuses_a_foreign_token_and_writes_nothing(tmp_path, capsys):
    load_or_create_secret(tmp_path / "secret")
    other = issue_token(b"x" * 32, "dev-a", now=time.time(), ttl_seconds=600)
    (tmp_path / "t").write_text(other)
    assert main(["revoke", str(tmp_path / "t"), "--secret", str(tmp_path / "secret"),
                 "--list", str(tmp_path / "revoked.json")]) == 2
    assert "is not a token of this aggregator (bad_signature" in capsys.readouterr().err
    assert not (tmp_path / "revoked.json").exists()


def test_revoke_accepts_tokens_not_yet_valid_and_keeps_earlier_entries(tmp_path, capsys):
    secret = load_or_create_secret(tmp_path / "secret")
    listed = tmp_path / "agg" / "revoked.json"
    now = time.time()
    for name, iat in (("early", now), ("future", now + 3600)):  # the second is not valid yet
        (tmp_path / name).write_text(issue_token(secret, name, now=iat, ttl_seconds=7200))
        assert main(["revoke", str(tmp_path / name), "--secret", str(tmp_path / "secret"),
                     "--list", str(listed)]) == 0
    assert len(RevocationFile(listed).current()) == 2
    assert main(["revoke", "not-a-file-but-a-token", "--secret", str(tmp_path / "secret"),
                 "--list", str(listed)]) == 2
    assert "not the token itself" in capsys.readouterr().err


def test_revoke_by_device_uses_the_enrolment_record(tmp_path, capsys):
    """A stolen token nobody kept can still be revoked: `shoal enroll` records token ids
    (never tokens) next to the secret, and `shoal revoke --device` revokes them all."""
    secret_file, listed = tmp_path / "agg" / "secret", tmp_path / "agg" / "revoked.json"
    for _ in range(2):  # two enrolments of the same device: both tokens get revoked
        assert main(["enroll", "phone-1", "--secret", str(secret_file)]) == 0
    assert main(["enroll", "phone-2", "--secret", str(secret_file)]) == 0
    printed = capsys.readouterr().out.split()
    log = (tmp_path / "agg" / "enrolled.jsonl").read_text()
    assert all(token not in log for token in printed)  # ids only, no bearer tokens
    assert oct((tmp_path / "agg" / "enrolled.jsonl").stat().st_mode & 0o777) == "0o600"
    assert main(["revoke", "--device", "phone-1", "--secret", str(secret_file),
                 "--list", str(listed)]) == 0
    revoked = RevocationFile(listed).current()
    assert len(revoked) == 2
    secret = load_or_create_secret(secret_file)
    from shoal.transport.auth import AuthError
    from shoal.transport.tokens import verify_token

    outcomes = []
    for token in printed:
        try:
            outcomes.append(verify_token(secret, token, now=time.time(), revoked=revoked).sub)
        except AuthError as exc:
            outcomes.append(exc.reason)
    assert outcomes == ["revoked", "revoked", "phone-2"]
    assert main(["revoke", "--device", "phone-9", "--secret", str(secret_file),
                 "--list", str(listed)]) == 2
    assert "no token of 'phone-9' is recorded" in capsys.readouterr().err
