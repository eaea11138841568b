"""Signed models and plans: Ed25519, ML-DSA-65 and hybrid signatures; a device refuses
anything unsigned, tampered or signed by another key and keeps what it had."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey

from shoal.errors import ProtocolError
from shoal.lifecycle.signing import (SignatureRejected, SignedArtifact, Signer, TrustedKey,
                                     model_bytes, plan_bytes, served_namespace,
                                     training_namespace, verify_artifact)
from shoal.privacy import crypto

SCHEMES = ("ed25519", "ml-dsa-65", "hybrid")


def test_ed25519_matches_rfc8032_test_vector_1():
    # RFC 8032 section 7.1, TEST 1 (empty message): with an empty context our primitive is
    # plain Ed25519
    sk = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    key = crypto.signing_key_from_private("ed25519", sk)
    assert key.public.hex() == \
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert crypto.sign("ed25519", sk, b"", b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc6"
        "1e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


def test_ml_dsa_65_keys_and_signatures_check_out_against_the_library():
    seed = bytes(range(32))
    key = crypto.signing_key_from_private("ml-dsa-65", seed)
    # FIPS 204 sizes; key generation from a seed is deterministic
    assert len(key.public) == 1952
    assert key.public == MLDSA65PrivateKey.from_seed_bytes(seed).public_key() \
        .public_bytes_raw()
    sig = crypto.sign("ml-dsa-65", seed, b"model", b"ctx")
    assert len(sig) == 3309
    # the library's own verifier on the framed message and context
    from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PublicKey
    MLDSA65PublicKey.from_public_bytes(key.public).verify(sig, b"ctx\0model", b"ctx")
    # hedged signing: two signatures differ, both verify
    assert crypto.sign("ml-dsa-65", seed, b"model", b"ctx") != sig


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_verifies_its_own_and_refuses_tampering(scheme):
    key = crypto.generate_signing_key(scheme)
    other = crypto.generate_signing_key(scheme)
    sig = crypto.sign(scheme, key.private, b"payload", b"ctx")
    assert crypto.verify_signature(scheme, key.public, b"payload", sig, b"ctx")
    assert not crypto.verify_signature(scheme, key.public, b"payloae", sig, b"ctx")
    assert not crypto.verify_signature(scheme, key.public, b"payload", sig, b"ctz")
    assert not crypto.verify_signature(scheme, other.public, b"payload", sig, b"ctx")
    assert not crypto.verify_signature(scheme, key.public, b"payload", sig[:-1], b"ctx")
    for i in (0, len(sig) // 2, len(sig) - 1):  # one flipped bit anywhere
        bad = bytearray(sig)
        bad[i] ^= 1
        assert not crypto.verify_signature(scheme, key.public, b"payload", bytes(bad), b"ctx")


def test_hybrid_needs_both_halves():
    key = crypto.generate_signing_key("hybrid")
    sig = crypto.sign("hybrid", key.private, b"m", b"c")
    ed = crypto.sign("ed25519", key.private[:32], b"m", b"c")
    assert sig[:64] == ed  # Ed25519 is deterministic: the first half is exactly it
    Ed25519PublicKey.from_public_bytes(key.public[:32]).verify(sig[:64], b"c\0m")
    other = crypto.generate_signing_key("ml-dsa-65")
    forged = ed + crypto.sign("ml-dsa-65", other.private, b"m", b"c")
    assert not crypto.verify_signature("hybrid", key.public, b"m", forged, b"c")


def test_bad_keys_and_schemes_are_protocol_errors():
    with pytest.raises(ProtocolError, match="unknown signature scheme"):
        crypto.generate_signing_key("rsa")
    with pytest.raises(ProtocolError, match="32 bytes"):
        crypto.signing_key_from_private("ed25519", b"short")
    with pytest.raises(ProtocolError, match="public key"):
        crypto.verify_signature("ml-dsa-65", b"x" * 32, b"m", b"s", b"c")


SERVED = served_namespace("s1")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_device_accepts_a_signed_model_and_refuses_everything_else(scheme):
    operator = Signer(crypto.generate_signing_key(scheme))
    intruder = Signer(crypto.generate_signing_key(scheme))
    good = np.arange(10, dtype=np.float32)

    def check(value, signed, namespace=SERVED):
        return verify_artifact(operator.trusted, "model", model_bytes(value), signed,
                               namespace=namespace)

    assert check(good, operator.sign_model(good, 3, SERVED)) == 3
    newer = good + 1

    def refused(value, signed, reason, namespace=SERVED):
        with pytest.raises(SignatureRejected) as info:
            check(value, signed, namespace)
        assert info.value.reason == reason

    refused(newer, None, "unsigned")
    refused(newer, intruder.sign_model(newer, 4, SERVED), "wrong_key")
    tampered = newer.copy()
    tampered[5] += 1e-3
    refused(tampered, operator.sign_model(newer, 4, SERVED), "tampered")
    sig = operator.sign_model(newer, 4, SERVED)
    refused(newer, SignedArtifact(sig.header, bytes(len(sig.signature))), "bad_signature")
    # a header edited to claim another version or series breaks the signature
    forged = sig.header.replace(b'"version":4', b'"version":9')
    refused(newer, SignedArtifact(forged, sig.signature), "bad_signature")
    forged = sig.header.replace(b'"served:s1"', b'"train:s1"')
    refused(newer, SignedArtifact(forged, sig.signature), "bad_signature")
    refused(newer, SignedArtifact(b"not json", sig.signature), "malformed")
    plan_sig = operator.sign_plan({"lr": 0.1}, 4, SERVED)
    refused(newer, plan_sig, "wrong_kind")
    # the series and the namespace are part of what is signed
    train = operator.sign_model(newer, 4, training_namespace("run7"))
    refused(newer, train, "wrong_namespace", "served")
    refused(newer, train, "wrong_namespace", SERVED)
    refused(newer, sig, "wrong_namespace", served_namespace("another-store"))
    assert check(newer, train, "train") == 4
    assert check(newer, sig, "served") == 4 and check(newer, sig) == 4


def test_no_downgrade_from_hybrid_and_plans_are_signed_as_canonical_json():
    hybrid = Signer(crypto.generate_signing_key("hybrid"))
    ed = Signer(crypto.signing_key_from_private("ed25519", hybrid.key.private[:32]))
    plan = {"model": {"name": "mlp2nn"}, "client": {"lr": 0.05, "epochs": 1}}
    # the same Ed25519 key alone does not pass a device that trusts the hybrid key
    with pytest.raises(SignatureRejected) as info:
        verify_artifact(hybrid.trusted, "plan", plan_bytes(plan), ed.sign_plan(plan, 1, SERVED),
                        namespace="served")
    assert info.value.reason == "scheme"
    signed = hybrid.sign_plan(plan, 2, SERVED)
    reordered = json.loads(json.dumps({"client": plan["client"], "model": plan["model"]}))
    assert verify_artifact(hybrid.trusted, "plan", plan_bytes(reordered), signed,
                           namespace=SERVED) == 2
    changed = {**plan, "client": {"lr": 0.5, "epochs": 1}}
    with pytest.raises(SignatureRejected, match="do not match"):
        verify_artifact(hybrid.trusted, "plan", plan_bytes(changed), signed, namespace=SERVED)
    assert TrustedKey("hybrid", hybrid.key.public).id == hybrid.trusted.id
