"""Device tokens, key rotation, revocation and rate limiting (shoal.transport.auth, .tokens,
.revocation). Tokens are also built by hand here, with hmac/base64/json directly, as an
independent statement of the wire format."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.errors import ConfigError, ShoalError
from shoal.transport.auth import (
    AUTH_REASONS,
    AuthError,
    CredentialFileError,
    Keyring,
    RateLimiter,
    key_id,
    load_or_create_secret,
)
from shoal.transport.revocation import RevocationList
from shoal.transport.tokens import MAX_TOKEN_CHARS, Claims, issue_token, verify_token

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
NOW = 1_700_000_000.75
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(claims: object, *, secret: bytes = SECRET, kid: str | None = None,
          raw_json: str | None = None) -> str:
    """A correctly MAC'ed token around arbitrary claims, built from the format spec alone."""
    kid = key_id(secret) if kid is None else kid
    text = raw_json if raw_json is not None else json.dumps(claims)
    signed = f"{kid}.{b64(text.encode())}"
    tag = hmac.new(secret, b"shoal-device-token-v1\x00" + signed.encode(), hashlib.sha256)
    return f"{signed}.{b64(tag.digest())}"


def good_claims(**over: object) -> dict:
    claims = {"v": 1, "sub": "dev-1", "iat": 1000, "exp": 2000,
              "jti": b64(bytes(16)), "scope": ["checkin", "upload"]}
    claims.update(over)
    return claims


def reason(token: object, **kw: object) -> str:
    kw.setdefault("now", 1500)
    kw.setdefault("secret", SECRET)
    with pytest.raises(AuthError) as info:
        verify_token(kw.pop("secret"), token, **kw)  # type: ignore[arg-type]
    assert info.value.reason in AUTH_REASONS
    assert isinstance(info.value, ShoalError)
    return info.value.reason


@pytest.fixture()
def token() -> str:
    return issue_token(SECRET, "dev-1", now=NOW, ttl_seconds=3600)


# --------------------------------------------------------------------------- tokens

def test_round_trip_and_wire_format(token):
    claims = verify_token(SECRET, token, now=NOW + 10, expected_device="dev-1",
                          required_scope="upload")
    assert claims.sub == "dev-1"
    assert claims.iat == 1_700_000_000 and claims.exp == 1_700_003_600
    assert claims.scope == ("checkin", "upload") and claims.v == 1
    assert claims.kid == key_id(SECRET)
    kid, payload, tag = token.split(".")
    # Independent decoding of the envelope.
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert set(body) == {"v", "sub", "iat", "exp", "jti", "scope"}
    assert len(base64.urlsafe_b64decode(body["jti"] + "==")) == 16
    expected = hmac.new(SECRET, b"shoal-device-token-v1\x00" + f"{kid}.{payload}".encode(),
                        hashlib.sha256).digest()
    assert b64(expected) == tag
    # A hand-built token with the same claims verifies too.
    assert verify_token(SECRET, forge(body), now=NOW) == claims


def test_tokens_have_fresh_ids(token):
    other = issue_token(SECRET, "dev-1", now=NOW, ttl_seconds=3600)
    assert verify_token(SECRET, other, now=NOW).jti != verify_token(SECRET, token, now=NOW).jti


def test_every_single_character_change_is_refused(token):
    for i, ch in enumerate(token):
        for repl in {B64URL[(B64URL.find(ch) + 1) % 64], "."} - {ch}:
            mutated = token[:i] + repl + token[i + 1:]
            assert reason(mutated, now=NOW) in {"malformed", "bad_signature"}, (i, repl)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_mutations_never_accepted_unless_identical(data):
    token = issue_token(SECRET, "dev-1", now=NOW, ttl_seconds=3600)
    ops = data.draw(st.lists(st.tuples(
        st.sampled_from(["replace", "insert", "delete"]),
        st.integers(0, len(token)),
        st.text(alphabet=B64URL + ".=+/ é\x00", min_size=1, max_size=3)), min_size=1,
        max_size=3))
    mutated = token
    for op, pos, text in ops:
        pos = min(pos, len(mutated))
        if op == "replace":
            mutated = mutated[:pos] + text + mutated[pos + len(text):]
        elif op == "insert":
            mutated = mutated[:pos] + text + mutated[pos:]
        else:
            mutated = mutated[:pos] + mutated[pos + len(text):]
    if mutated == token:
        assert verify_token(SECRET, mutated, now=NOW).sub == "dev-1"
    else:
        assert reason(mutated, now=NOW) in {"missing", "malformed", "bad_signature"}


def test_truncations_are_refused(token):
    assert reason(token[:0], now=NOW) == "missing"
    for n in range(1, len(token)):
        assert reason(token[:n], now=NOW) in {"malformed", "bad_signature"}, n


def test_missing_and_non_string_tokens():
    assert reason(None) == "missing"
    assert reason("") == "missing"
    assert reason(b"abc.def.ghi") == "malformed"
    assert reason("a.b") == "malformed"
    assert reason("a.b.c.d") == "malformed"


def test_wrong_secret_and_unknown_key_id(token):
    assert reason(token, secret=OTHER, now=NOW) == "bad_signature"
    assert reason(forge(good_claims(), kid="nosuchkey")) == "bad_signature"


def test_oversized_token_refused_before_decoding():
    valid = forge(good_claims(sub="d" * 128))
    assert len(valid) < MAX_TOKEN_CHARS
    huge = "k." + "A" * MAX_TOKEN_CHARS + ".A"
    with pytest.raises(AuthError, match=f"more than {MAX_TOKEN_CHARS}") as info:
        verify_token(SECRET, huge, now=1500)
    assert info.value.reason == "malformed"
    # Even a correctly MAC'ed token is refused once it is too long.
    big = forge(good_claims(), raw_json=json.dumps(good_claims()) + " " * 2000)
    assert len(big) > MAX_TOKEN_CHARS
    assert reason(big) == "malformed"


def test_non_canonical_base64_refused(token):
    kid, payload, tag = token.split(".")
    # 32 bytes -> 43 characters; the last one carries 2 unused bits. Setting them decodes to
    # the same bytes, so only the canonical check can catch it.
    last = B64URL.index(tag[-1])
    twin = tag[:-1] + B64URL[last ^ 1]
    assert base64.urlsafe_b64decode(twin + "=") == base64.urlsafe_b64decode(tag + "=")
    with pytest.raises(AuthError, match="canonical") as info:
        verify_token(SECRET, f"{kid}.{payload}.{twin}", now=NOW)
    assert info.value.reason == "malformed"
    for bad in (f"{kid}.{payload}.{tag}=", f"{kid}.{payload}=.{tag}",
                f"{kid}.{payload.replace('-', '+').replace('_', '/')}x.{tag}",
                f"{kid}.{payload} .{tag}", f"{kid}.{payload}.{tag}A"):
        assert reason(bad, now=NOW) == "malformed", bad


@pytest.mark.parametrize("claims", [
    good_claims(extra=1),
    {k: v for k, v in good_claims().items() if k != "jti"},
    good_claims(v=2),
    good_claims(v=True),
    good_claims(sub=""),
    good_claims(sub=7),
    good_claims(sub="a\nb"),
    good_claims(iat="1000"),
    good_claims(exp=2000.5),
    good_claims(iat=True),
    good_claims(exp=1000),
    good_claims(iat=-1),
    good_claims(jti="short"),
    good_claims(scope="checkin"),
    good_claims(scope=[]),
    good_claims(scope=["admin"]),
    good_claims(scope=["upload", "upload"]),
    [1, 2, 3],
    "claims",
])
def test_authenticated_but_ill_formed_claims_are_malformed(claims):
    assert reason(forge(claims)) == "malformed"


@pytest.mark.parametrize("raw", [
    '{"v":1,"v":1,"sub":"dev-1","iat":1000,"exp":2000,"jti":"AAAAAAAAAAAAAAAAAAAAAA",'
    '"scope":["upload"]}',
    '{"v":1,"sub":"dev-1","iat":1000,"exp":NaN,"jti":"AAAAAAAAAAAAAAAAAAAAAA",'
    '"scope":["upload"]}',
    "not json",
])
def test_duplicate_keys_nan_and_garbage_json_are_malformed(raw):
    assert reason(forge(None, raw_json=raw)) == "malformed"


def test_validity_window_with_leeway_boundaries():
    t = forge(good_claims(iat=1000, exp=1060))
    assert reason(t, now=989.99, leeway_seconds=10) == "not_yet_valid"
    assert verify_token(SECRET, t, now=990, leeway_seconds=10).iat == 1000
    assert verify_token(SECRET, t, now=1069.99, leeway_seconds=10).exp == 1060
    assert reason(t, now=1070, leeway_seconds=10) == "expired"
    assert reason(t, now=999.5, leeway_seconds=0) == "not_yet_valid"
    assert reason(t, now=1060, leeway_seconds=0) == "expired"
    with pytest.raises(ConfigError, match="leeway_seconds"):
        verify_token(SECRET, t, now=1000, leeway_seconds=-1)


def test_wrong_device_and_scope(token):
    assert reason(token, now=NOW, expected_device="dev-2") == "wrong_device"
    narrow = issue_token(SECRET, "dev-1", now=NOW, ttl_seconds=60, scope=["checkin"])
    assert verify_token(SECRET, narrow, now=NOW, required_scope="checkin").scope == ("checkin",)
    with pytest.raises(AuthError) as info:
        verify_token(SECRET, narrow, now=NOW, required_scope="upload")
    assert info.value.reason == "scope" and info.value.device_id == "dev-1"


def test_revocation_list(token):
    claims = verify_token(SECRET, token, now=NOW)
    other = issue_token(SECRET, "dev-2", now=NOW, ttl_seconds=10)
    revoked = RevocationList().revoke(claims.jti, claims.exp)
    assert len(RevocationList()) == 0 and claims.jti in revoked
    assert reason(token, now=NOW, revoked=revoked) == "revoked"
    assert verify_token(SECRET, other, now=NOW, revoked=revoked).sub == "dev-2"
    # Serialisation round trip, and pruning once the token would be expired anyway.
    assert RevocationList.from_json(revoked.to_json()) == revoked
    assert claims.jti in revoked.prune(claims.exp + 59, leeway_seconds=60)
    assert len(revoked.prune(claims.exp + 60, leeway_seconds=60)) == 0
    for bad in ("[]", '{"v": 2, "revoked": {}}', '{"v": 1, "revoked": {"x": 1}}', "{"):
        with pytest.raises(ConfigError):
            RevocationList.from_json(bad)


def test_issue_validates_its_arguments():
    with pytest.raises(ConfigError, match="32 bytes"):
        issue_token(b"short", "dev", now=NOW, ttl_seconds=1)
    for bad in ("", "x" * 129, "a\tb", 5):
        with pytest.raises(ConfigError, match="device id"):
            issue_token(SECRET, bad, now=NOW, ttl_seconds=1)  # type: ignore[arg-type]
    for ttl in (0, -5, 1.5, True):
        with pytest.raises(ConfigError, match="ttl_seconds"):
            issue_token(SECRET, "dev", now=NOW, ttl_seconds=ttl)  # type: ignore[arg-type]
    for scope in ([], ["admin"], ["upload", "upload"]):
        with pytest.raises(ConfigError, match="scope"):
            issue_token(SECRET, "dev", now=NOW, ttl_seconds=1, scope=scope)


# --------------------------------------------------------------------------- rotation

def test_key_rotation():
    ring1 = Keyring.single(SECRET, "k1")
    old = issue_token(ring1, "dev-1", now=NOW, ttl_seconds=3600)
    ring2 = ring1.rotate(OTHER, "k2")
    new = issue_token(ring2, "dev-1", now=NOW, ttl_seconds=3600)
    assert old.split(".")[0] == "k1" and new.split(".")[0] == "k2"  # only the active key issues
    assert verify_token(ring2, old, now=NOW).kid == "k1"
    assert verify_token(ring2, new, now=NOW).kid == "k2"
    assert reason(new, secret=ring1, now=NOW) == "bad_signature"
    # Relabelling a token with another (known) key id breaks its tag: the kid is authenticated.
    assert reason("k2." + old.split(".", 1)[1], secret=ring2, now=NOW) == "bad_signature"
    ring3 = ring2.retire("k1")
    assert reason(old, secret=ring3, now=NOW) == "bad_signature"
    assert verify_token(ring3, new, now=NOW).sub == "dev-1"
    with pytest.raises(ConfigError, match="active"):
        ring3.retire("k2")
    with pytest.raises(ConfigError, match="already"):
        ring2.rotate(OTHER, "k1")
    with pytest.raises(ConfigError, match="not in the keyring"):
        Keyring("k9", {"k1": SECRET})


def test_plain_secret_matches_single_keyring(token):
    assert verify_token(Keyring.single(SECRET), token, now=NOW).kid == key_id(SECRET)
    assert key_id(SECRET) != key_id(OTHER) and len(key_id(SECRET)) == 8


# --------------------------------------------------------------------------- secret file

def test_load_or_create_secret(tmp_path):
    path = tmp_path / "keys" / "token.secret"
    secret = load_or_create_secret(path)
    assert len(secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == secret.hex()
    assert load_or_create_secret(path) == secret
    assert [p.name for p in path.parent.iterdir()] == ["token.secret"]  # no temp file left
    assert load_or_create_secret(tmp_path / "other") != secret

    os.chmod(path, 0o644)
    with pytest.raises(CredentialFileError, match="chmod 600") as info:
        load_or_create_secret(path)
    assert info.value.path == str(path)
    os.chmod(path, 0o600)
    path.write_text("not hex\n")
    with pytest.raises(CredentialFileError, match="hexadecimal") as info:
        load_or_create_secret(path)
    assert info.value.path == str(path)


# --------------------------------------------------------------------------- rate limits

def test_rate_limiter_burst_then_rate_exactly():
    rl = RateLimiter(rate_per_s=2, burst=3)
    assert [rl.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.retry_after("a", 0.0) == 0.5
    assert not rl.allow("a", 0.25)       # half a token
    assert rl.retry_after("a", 0.25) == 0.25
    assert rl.allow("a", 0.5) and not rl.allow("a", 0.5)
    assert rl.allow("b", 0.5)            # keys are independent
    # Saturating demand over [0, T] admits burst + rate*T requests.
    rl = RateLimiter(rate_per_s=2, burst=3)
    admitted = sum(rl.allow("a", i * 0.125) for i in range(81))  # t = 0 .. 10 s
    assert admitted == 3 + 2 * 10
    # A long idle refills to burst, no more.
    assert [rl.allow("a", 1000.0) for _ in range(4)] == [True, True, True, False]


def test_rate_limiter_clock_going_backwards_refills_nothing():
    rl = RateLimiter(rate_per_s=1, burst=1)
    assert rl.allow("a", 100.0) and not rl.allow("a", 50.0) and not rl.allow("a", 100.5)
    assert rl.allow("a", 101.0)


def test_rate_limiter_memory_is_bounded():
    rl = RateLimiter(rate_per_s=1, burst=2, max_keys=100)
    for i in range(1000):
        rl.allow(f"dev-{i}", 0.0)
    assert len(rl) == 100
    # LRU: the most recent key keeps its debt; the oldest was forgotten (fresh burst).
    assert rl.allow("dev-999", 0.0) and not rl.allow("dev-999", 0.0)
    assert rl.allow("dev-0", 0.0) and rl.allow("dev-0", 0.0)
    # Buckets idle for burst/rate seconds are full, hence dropped without changing decisions.
    rl.allow("fresh", 2.0)
    assert len(rl) == 1
    assert rl.allow("fresh", 2.0) and not rl.allow("fresh", 2.0)


def test_rate_limiter_validates_config():
    for kw in ({"rate_per_s": 0, "burst": 1}, {"rate_per_s": float("inf"), "burst": 1},
               {"rate_per_s": 1, "burst": 0.5}, {"rate_per_s": 1, "burst": 1, "max_keys": 0}):
        with pytest.raises(ConfigError):
            RateLimiter(**kw)


def test_claims_is_a_frozen_value():
    c = Claims(sub="d", iat=0, exp=1, jti="A" * 22, scope=("upload",), kid="k")
    with pytest.raises(AttributeError):
        c.sub = "x"  # type: ignore[misc]


def test_public_api():
    import shoal.transport.auth as auth
    import shoal.transport.revocation as revocation
    import shoal.transport.tokens as tokens

    expected = {
        auth: ["AUTH_REASONS", "SECRET_BYTES", "AuthError", "CredentialFileError", "Keyring",
               "key_id", "load_or_create_secret", "RateLimiter"],
        tokens: ["KNOWN_SCOPES", "MAX_TOKEN_CHARS", "Claims", "VerifiedTokens", "admit_claims",
                 "issue_token", "verify_token"],
        revocation: ["RevocationList", "RevocationFile"],
    }
    for module, names in expected.items():
        assert sorted(module.__all__) == sorted(names)
        for name in module.__all__:
            assert hasattr(module, name)
    assert issubclass(CredentialFileError, ConfigError)


def test_load_or_create_secret_race_keeps_the_winners_secret(tmp_path, monkeypatch):
    import shoal.transport.auth as auth

    path = tmp_path / "token.secret"
    winner = bytes(range(100, 132))
    real_link = os.link

    def link_after_another_process(src, dst):
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, winner.hex().encode() + b"\n")
        os.close(fd)
        return real_link(src, dst)  # raises FileExistsError, as in a real race

    monkeypatch.setattr(auth.os, "link", link_after_another_process)
    assert load_or_create_secret(path) == winner
    assert [p.name for p in tmp_path.iterdir()] == ["token.secret"]
