"""The operator's key on disk and signatures kept beside model-store versions: `shoal keys`
writes a pair the aggregator signs with and devices verify with; a committed version carries
its model's and plan's signatures, checked here by the device-side verifier (the oracle is
the independent `verify_artifact` over the bytes a device would receive)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from shoal.cli import main
from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.lifecycle.keys import (KEY_FILE, PUBLIC_FILE, KeyFileError, load_signer,
                                  load_trusted_key, write_operator_key)
from shoal.lifecycle.signing import (SignatureRejected, SignedArtifact, artifact_namespace,
                                     model_bytes, plan_bytes, served_namespace,
                                     training_namespace, verify_artifact, version_signatures)
from shoal.lifecycle.store_signing import STORE_ID_FILE, commit_signer, store_id
from shoal.params import ParamSpec
from shoal.store import Checkpoint
from shoal.store.models import ModelStore
from shoal.strategy import ServerState

SCHEMES = ("ed25519", "ml-dsa-65", "hybrid")


def ckpt(scale: float, config=None) -> Checkpoint:
    meta = {} if config is None else {"config": config}
    return Checkpoint(ServerState(params=np.arange(6, dtype=np.float32) * np.float32(scale),
                                  version=1),
                      ParamSpec.from_shapes({"w": (2, 3)}), seed=0, meta=meta)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_shoal_keys_writes_a_pair_that_signs_and_verifies(tmp_path, capsys, scheme):
    assert main(["keys", "--out", str(tmp_path), "--scheme", scheme]) == 0
    out = capsys.readouterr().out
    assert "operator.pub" in out and "--signing-key" not in out
    # the flags it tells the operator about exist
    assert f"--keys {tmp_path}" in out and "--trusted-key" in out
    private, public = tmp_path / KEY_FILE, tmp_path / PUBLIC_FILE
    assert oct(os.stat(private).st_mode & 0o777) == "0o600"
    signer, trusted = load_signer(private), load_trusted_key(public)
    assert trusted == signer.trusted and trusted.scheme == scheme
    params = np.linspace(-1, 1, 50, dtype=np.float32)
    assert verify_artifact(trusted, "model", model_bytes(params),
                           signer.sign_model(params, 7, served_namespace("s")),
                           namespace="served") == 7
    # a second run refuses to replace the pair (devices trust the old public key)
    assert main(["keys", "--out", str(tmp_path), "--scheme", scheme]) == 2
    assert "already exists" in capsys.readouterr().err
    assert load_trusted_key(public) == trusted


def test_the_flags_shoal_keys_names_exist(capsys):
    """Every command and flag the help of `shoal keys` sends the operator to is accepted by
    that command's own parser (the oracle: argparse of serve, launch, models, client)."""
    import re

    from shoal.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["keys", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    named = re.findall(r"`shoal (\w+) (?:\w+ )*?(--[\w-]+)", text)
    assert {c for c, _ in named} == {"serve", "launch", "models", "client"}
    for command, flag in named:
        sub = parser._subparsers._group_actions[0].choices[command]
        assert flag in sub._option_string_actions, (command, flag)


def test_key_files_are_refused_when_exposed_or_malformed(tmp_path):
    private, public = write_operator_key(tmp_path, "ed25519")
    os.chmod(private, 0o640)
    with pytest.raises(KeyFileError, match="readable by its owner only"):
        load_signer(private)
    os.chmod(private, 0o600)
    doc = json.loads(public.read_text())
    for change, phrase in (({"key_id": "0" * 16}, "is not the public key's"),
                           ({"public": doc["public"][:-2]}, "32 bytes"),
                           ({"scheme": "rsa"}, "unknown scheme"),
                           ({"format": "x"}, "not a shoal-trusted-key/1")):
        bad = tmp_path / "bad.pub"
        bad.write_text(json.dumps({**doc, **change}))
        with pytest.raises(KeyFileError, match=phrase):
            load_trusted_key(bad)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_trusted_key(tmp_path / "missing.pub")
    with pytest.raises(KeyFileError, match="not a signing key"):
        load_signer(public)  # the public half is not a signing key
    with pytest.raises(ConfigError, match="unknown signature scheme"):
        write_operator_key(tmp_path / "x", "rsa")


def test_a_commit_keeps_the_signatures_of_its_model_and_plan(tmp_path):
    signer, trusted = (load_signer(p) if i == 0 else load_trusted_key(p)
                       for i, p in enumerate(write_operator_key(tmp_path / "k", "hybrid")))
    config = load_config(None, {}).to_dict()
    c = ckpt(2.0, config)
    with ModelStore(tmp_path) as store:
        store.commit(ckpt(1.0), round=1, metrics={}, now=1.0)  # no signer: unsigned
        v = store.commit(c, round=2, metrics={}, now=2.0, parent=1,
                         sign=commit_signer(signer, c.state.params, store))
        assert store.get(1).signatures == {}
        sid = store_id(store)
    with ModelStore(tmp_path, readonly=True) as store:  # what another process reads back
        v = store.get(v.id)
        model = SignedArtifact.from_json(v.signatures["model"])
        plan = SignedArtifact.from_json(v.signatures["plan"])
        # signed as this store's version 2: its id is kept beside the index
        assert (tmp_path / "models" / STORE_ID_FILE).read_text().strip() == sid
        assert store_id(store) == sid and len(sid) == 32
        assert artifact_namespace(model) == artifact_namespace(plan) == f"served:{sid}"
        assert verify_artifact(trusted, "model", model_bytes(store.load(2).state.params),
                               model, namespace=f"served:{sid}") == 2
        assert verify_artifact(trusted, "plan", plan_bytes(v.plan), plan,
                               namespace="served") == 2
        # the model's signature does not pass for another version's bytes
        with pytest.raises(SignatureRejected) as exc:
            verify_artifact(trusted, "model", model_bytes(store.load(1).state.params), model,
                            namespace="served")
        assert exc.value.reason == "tampered"


def test_signing_a_version_later_replaces_only_its_signatures(tmp_path):
    signer = load_signer(write_operator_key(tmp_path / "k", "ed25519")[0])
    with ModelStore(tmp_path) as store:
        v = store.commit(ckpt(1.0), round=1, metrics={"a": 1.0}, now=1.0, status="production")
        before = store.get(v.id)
        signed = store.sign(v.id, version_signatures(signer, v.id, ckpt(1.0).state.params,
                                                     None, served_namespace("s")))
        assert set(signed.signatures) == {"model"}
        assert (signed.sha256, signed.status, dict(signed.metrics)) == \
            (before.sha256, "production", {"a": 1.0})
        for bad in ({"model": {"header": "x"}}, {"weights": {"header": "x", "signature": "00"}},
                    {"model": {"header": "x", "signature": "not hex"}}):
            with pytest.raises(ConfigError, match="signature"):
                store.sign(v.id, bad)
        assert store.get(v.id).signatures == signed.signatures  # nothing changed


def test_the_device_check_binds_version_series_and_refuses_downgrades_of_a_run():
    """check_signed, the device's whole check (the reviewer's repro): a training version
    does not pass as a served one, a valid signature of another number is refused, and a
    lower version of the run the device holds is an old model replayed."""
    from shoal.lifecycle.signing import Signer
    from shoal.privacy import crypto
    from shoal.transport.device_models import check_signed

    op = Signer(crypto.generate_signing_key("ed25519"))
    run, served = training_namespace("run-a"), served_namespace("0" * 32)
    train_v3 = np.ones(4, np.float32)
    sig = op.sign_model(train_v3, 3, run)

    def reason(*args, **kw):
        with pytest.raises(SignatureRejected) as exc:
            check_signed(op.trusted, "model", *args, **kw)
        return exc.value.reason

    payload = model_bytes(train_v3)
    assert check_signed(op.trusted, "model", payload, 3, sig, namespace="train") == run
    assert reason(payload, 3, sig, namespace="served") == "wrong_namespace"
    assert reason(payload, 3, sig, namespace=served) == "wrong_namespace"
    assert reason(payload, 4, sig, namespace="train") == "wrong_version"
    old = np.zeros(4, np.float32)
    assert reason(model_bytes(old), 2, op.sign_model(old, 2, run), namespace="train",
                  held=(run, 5)) == "downgrade"
    # another run starts again from low numbers; the same number is no downgrade
    assert check_signed(op.trusted, "model", model_bytes(old), 2,
                        op.sign_model(old, 2, training_namespace("run-b")),
                        namespace="train", held=(run, 5)) == training_namespace("run-b")
    assert check_signed(op.trusted, "model", payload, 3, sig, namespace="train",
                        held=(run, 3)) == run
    # without a trusted key nothing is checked
    assert check_signed(None, "model", payload, 9, None, namespace="served") is None
