"""Serving over real gRPC on loopback: a device fetches the production model and its training
plan (GetModel, GetPlan), verifies them with the operator's public key, and refuses -- with a
Decline the server hears, and keeping the model it had -- a model that was tampered with,
one signed by another key, and one that is unsigned. Oracles: the store's own checkpoint and
plan, and the key pair written by `shoal keys`."""

from __future__ import annotations

import logging

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from aggregator_harness import DIM, SECRET, token  # noqa: E402
from shoal.config import load_config  # noqa: E402
from shoal.lifecycle.keys import load_signer, load_trusted_key, write_operator_key  # noqa: E402
from shoal.lifecycle.signing import (SignatureRejected, served_namespace,  # noqa: E402
                                     training_namespace, version_signatures)
from shoal.lifecycle.store_signing import commit_signer, sign_version, store_id  # noqa: E402
from shoal.params import ParamSpec  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.store import Checkpoint  # noqa: E402
from shoal.store.models import ModelStore  # noqa: E402
from shoal.strategy import ServerState  # noqa: E402
from shoal.transport.auth import Keyring  # noqa: E402
from shoal.transport.client import DeviceClient  # noqa: E402
from shoal.transport.device_api import TrainResult, TransportError  # noqa: E402
from shoal.transport.server import AggregatorService, AggregatorSettings, serve  # noqa: E402
from shoal.transport.serving import ModelServing  # noqa: E402

DEVICE = "dev-a"


def params(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def commit(store: ModelStore, p: np.ndarray, *, production: bool, plan: bool = True,
           signer=None):
    """Commit ``p``, signed at commit time by ``signer`` (as an aggregator holding the key
    does), or unsigned."""
    meta = {"config": load_config(None, {}).to_dict()} if plan else {}
    ckpt = Checkpoint(ServerState(params=p, version=1), ParamSpec.from_shapes({"w": (DIM,)}),
                      seed=0, meta=meta)
    parent = store.latest()
    return store.commit(ckpt, round=1, metrics={}, now=1.0,
                        parent=parent.id if parent else None,
                        status="production" if production else "candidate",
                        sign=None if signer is None else commit_signer(signer, p, store))


class Aggregator:
    """A real aggregator on a free loopback port serving ``store``'s signatures by
    ``signer``'s key (and signing training downloads with it)."""

    def __init__(self, tmp_path, store, signer):
        self.service = AggregatorService(
            AggregatorSettings(), Keyring.single(SECRET), DIM, "fp",
            lambda: SQLiteRegistry(tmp_path / "registry.db"),
            serving=ModelServing(store, key=signer.trusted), signer=signer)
        self.port, self.stop = serve(self.service)

    def client(self, trusted) -> DeviceClient:
        def train(p, settings, round):  # never asked to train here
            return TrainResult(np.zeros_like(p), 1)

        return DeviceClient(f"127.0.0.1:{self.port}", token(DEVICE), DEVICE,
                            root_certificates=None, train=train, trusted_key=trusted,
                            max_retries=2, sleep=lambda s: None)


@pytest.fixture
def keys(tmp_path):
    operator = write_operator_key(tmp_path / "operator", "hybrid")
    other = write_operator_key(tmp_path / "other", "hybrid")
    return (load_signer(operator[0]), load_trusted_key(operator[1]),
            load_signer(other[0]))


def test_a_device_fetches_verifies_and_keeps_the_served_model_and_plan(tmp_path, keys):
    signer, trusted, _ = keys
    with ModelStore(tmp_path / "models") as store:
        v1 = commit(store, params(1), production=True, signer=signer)
        agg = Aggregator(tmp_path, store, signer)
        try:
            with agg.client(trusted) as device:
                version, got = device.fetch_served_model()
                assert version == v1.id
                np.testing.assert_array_equal(got, store.load(v1.id).state.params)
                plan_version, plan = device.fetch_plan()
                assert plan_version == v1.id and plan == dict(store.get(v1.id).plan)
                down = device.stats.bytes_down
                assert device.fetch_served_model()[0] == v1.id  # not modified: no model bytes
                assert device.stats.bytes_down - down < 100
                # a new production: the device moves to it (full or delta), verified
                v2 = commit(store, params(2), production=True, signer=signer)
                version, got = device.fetch_served_model()
                assert version == v2.id
                np.testing.assert_array_equal(got, store.load(v2.id).state.params)
                assert device.stats.served_versions == [v1.id, v2.id]
                assert device.stats.signature_rejections == 0
            # the signatures made at commit time are what was served
            assert set(store.get(v2.id).signatures) == {"model", "plan"}
        finally:
            agg.stop()


@pytest.mark.parametrize("attack", ["tampered", "other_key", "unsigned", "training_version",
                                    "other_store"])
def test_a_device_refuses_a_bad_signature_declines_and_keeps_its_model(tmp_path, keys, caplog,
                                                                        attack):
    """Each attack on the served model is refused with its reason. Signatures bind the
    series: the operator's valid signature of a training run's version 2, or of version 2
    of another store, stored beside this store's version 2 is ``wrong_namespace``."""
    signer, trusted, other = keys
    with ModelStore(tmp_path / "models") as store:
        good = commit(store, params(1), production=True, signer=signer)
        agg = Aggregator(tmp_path, store, signer)
        try:
            with agg.client(trusted) as device:
                assert device.fetch_served_model()[0] == good.id
                bad = commit(store, params(2), production=True, plan=False)
                if attack == "tampered":  # the operator's signature of other bytes
                    store.sign(bad.id, version_signatures(
                        signer, bad.id, params(3), None, served_namespace(store_id(store))))
                elif attack in ("training_version", "other_store"):
                    namespace = training_namespace(agg.service.run_id) \
                        if attack == "training_version" else served_namespace("f" * 32)
                    store.sign(bad.id, {"model": signer.sign_model(params(2), bad.id,
                                                                   namespace).to_json()})
                else:  # the same server now serves another key's signatures, or none
                    if attack == "other_key":
                        sign_version(store, other, bad.id)
                    agg.service.serving = ModelServing(
                        store, key=other.trusted if attack == "other_key" else None)
                caplog.set_level(logging.WARNING, logger="shoal.aggregator")
                with pytest.raises(SignatureRejected) as exc:
                    device.fetch_served_model()
                want = {"tampered": "tampered", "other_key": "wrong_key",
                        "unsigned": "unsigned", "training_version": "wrong_namespace",
                        "other_store": "wrong_namespace"}[attack]
                assert exc.value.reason == want
                # the device keeps the model it had, and says so to the server
                held_version, held = device.served_model
                assert held_version == good.id
                np.testing.assert_array_equal(held, store.load(good.id).state.params)
                assert device.stats.signature_rejections == 1
                assert bad.id not in device.stats.served_versions
                declines = [r for r in caplog.records if "declined" in r.getMessage()]
                assert declines and "signature_rejected" in declines[-1].getMessage()
        finally:
            agg.stop()


def test_a_plan_signed_by_another_key_is_refused_and_without_a_plan_none_is_served(
        tmp_path, keys):
    signer, trusted, other = keys
    with ModelStore(tmp_path / "models") as store:
        commit(store, params(1), production=True, signer=other)
        agg = Aggregator(tmp_path, store, other)
        try:
            with agg.client(trusted) as device:
                with pytest.raises(SignatureRejected) as exc:
                    device.fetch_plan()
                assert exc.value.reason == "wrong_key" and device.served_plan is None
            commit(store, params(2), production=True, plan=False, signer=other)
            with agg.client(trusted) as device:
                with pytest.raises(TransportError, match="NOT_FOUND"):
                    device.fetch_plan()
        finally:
            agg.stop()


@pytest.mark.parametrize("signed_by", ["operator", "other"])
def test_a_training_download_is_verified_too(tmp_path, keys, caplog, signed_by):
    """A trusted device trains from a training model its operator signed; one signed by
    another key is refused before training, and the task declined (the round does not wait
    for it)."""
    from aggregator_harness import start_round

    signer, trusted, other = keys
    with ModelStore(tmp_path / "models") as store:
        agg = Aggregator(tmp_path, store, signer)
        agg.service.signer = signer if signed_by == "operator" else other
        trained = []

        def train(p, settings, round):
            trained.append(round)
            return TrainResult(np.full_like(p, 0.5), 3)

        try:
            t, out = start_round(agg.service, n_sampled=1, target=1, min_fraction=1.0,
                                 deadline_s=10.0, devices=[DEVICE])
            caplog.set_level(logging.WARNING, logger="shoal.aggregator")
            with DeviceClient(f"127.0.0.1:{agg.port}", token(DEVICE), DEVICE,
                              root_certificates=None, train=train, trusted_key=trusted,
                              max_retries=2, min_wait_s=0.05) as device:
                stats = device.run(max_rounds=1)
            t.join(timeout=20)
        finally:
            agg.stop()
    if signed_by == "operator":
        assert trained and stats.uploads_accepted == 1 and stats.signature_rejections == 0
        assert out["record"].committed
    else:
        assert not trained and stats.tasks_abandoned == 1 and stats.signature_rejections == 1
        assert any("signature_rejected" in r.getMessage() for r in caplog.records)
        assert not out["record"].committed  # the only device declined: nothing to commit


def test_serving_never_signs_an_unsigned_version_is_not_served_until_the_operator_signs_it(
        tmp_path, keys, capsys):
    """The aggregator holds only the public key: a version committed without a signature is
    answered NOT_FOUND (naming the command that signs it) and the store is left as it was;
    `shoal models sign` with the operator's key makes it servable, and the device verifies
    it against the key pair `shoal keys` wrote (the oracle)."""
    from shoal.cli import main

    signer, trusted, _ = keys
    with ModelStore(tmp_path / "models") as store:
        v1 = commit(store, params(1), production=True)  # committed unsigned
        agg = Aggregator(tmp_path, store, signer)
        try:
            with agg.client(trusted) as device:
                with pytest.raises(TransportError, match="NOT_FOUND") as exc:
                    device.fetch_served_model()
                assert "not signed by the operator's key" in str(exc.value)
                assert f"sign {v1.id} --keys" in str(exc.value)
                with pytest.raises(TransportError, match="NOT_FOUND"):
                    device.fetch_plan()
                assert store.get(v1.id).signatures == {}  # serving wrote nothing
                assert device.served_model is None
                assert main(["models", "--store", str(tmp_path / "models"), "sign",
                             f"v{v1.id}", "--keys", str(tmp_path / "operator")]) == 0
                assert "signed (model, plan)" in capsys.readouterr().out
                version, got = device.fetch_served_model()
                assert version == v1.id
                np.testing.assert_array_equal(got, params(1))
                assert device.fetch_plan()[0] == v1.id
                assert device.stats.signature_rejections == 0
        finally:
            agg.stop()


def test_the_same_bytes_signed_as_another_version_are_refused_as_wrong_version(
        tmp_path, keys):
    """GetModel streams store version 2 whose bytes equal version 1's and whose stored
    signature is version 1's (valid, same store, same bytes): only the number differs, and
    the device refuses it (``wrong_version``) and installs nothing."""
    signer, trusted, _ = keys
    with ModelStore(tmp_path / "models") as store:
        v1 = commit(store, params(1), production=True, signer=signer)
        v2 = commit(store, params(1), production=True, plan=False)
        store.sign(v2.id, {"model": store.get(v1.id).signatures["model"]})
        agg = Aggregator(tmp_path, store, signer)
        try:
            with agg.client(trusted) as device:
                with pytest.raises(SignatureRejected) as exc:
                    device.fetch_served_model()
                assert exc.value.reason == "wrong_version"
                assert device.served_model is None and device.stats.served_versions == []
        finally:
            agg.stop()


def test_a_training_download_older_than_the_held_version_of_the_run_is_refused(
        tmp_path, keys):
    """Over the real Download call: the device holds training version 2 of this run; the
    server's genuine, signed version 1 of the same run is an old model replayed
    (``downgrade``); the device keeps version 2."""
    from shoal.transport.device_api import TaskAbandoned
    from shoal.transport.proto import shoal_pb2 as pb

    signer, trusted, _ = keys
    with ModelStore(tmp_path / "models") as store:
        agg = Aggregator(tmp_path, store, signer)
        agg.service.publish(1, params(1))
        agg.service.publish(2, params(2))  # the publisher keeps version 1 as well
        try:
            with agg.client(trusted) as device:
                models = device._models
                task = pb.Task(task_id=1, round=1, model_version=2)
                np.testing.assert_array_equal(models.for_task(2, task), params(2))
                with pytest.raises(TaskAbandoned, match="older than version 2 held"):
                    models.for_task(1, pb.Task(task_id=2, round=2, model_version=1))
                assert models.training_version == 2
                assert models.training_namespace == training_namespace(agg.service.run_id)
                assert device.stats.signature_rejections == 1
        finally:
            agg.stop()


def test_a_lower_served_version_is_accepted_after_a_rollback(tmp_path, keys):
    """What is *not* refused (docs/lifecycle.md): served versions may go down -- a rollback
    serves an older version of the same store, and the device installs it."""
    signer, trusted, _ = keys
    with ModelStore(tmp_path / "models") as store:
        v1 = commit(store, params(1), production=True, signer=signer)
        v2 = commit(store, params(2), production=True, signer=signer)
        agg = Aggregator(tmp_path, store, signer)
        try:
            with agg.client(trusted) as device:
                assert device.fetch_served_model()[0] == v2.id
                store.rollback(v1.id, now=2.0, reason="regression")
                version, got = device.fetch_served_model()
                assert version == v1.id
                np.testing.assert_array_equal(got, params(1))
        finally:
            agg.stop()


def test_serving_runs_off_the_event_loop(tmp_path, keys):
    """GetModel and GetPlan answer from a worker thread: no asyncio loop runs in the
    thread that reads the store (the oracle: asyncio.get_running_loop raises there)."""
    import asyncio

    signer, trusted, _ = keys
    on_loop = []

    class Recording(ModelServing):
        def model(self, device_id, have):
            on_loop.append(_loop_running(asyncio))
            return super().model(device_id, have)

        def plan(self, device_id, have):
            on_loop.append(_loop_running(asyncio))
            return super().plan(device_id, have)

    with ModelStore(tmp_path / "models") as store:
        commit(store, params(1), production=True, signer=signer)
        agg = Aggregator(tmp_path, store, signer)
        agg.service.serving = Recording(store, key=signer.trusted)
        try:
            with agg.client(trusted) as device:
                device.fetch_served_model()
                device.fetch_plan()
        finally:
            agg.stop()
    assert on_loop == [False, False]


def _loop_running(asyncio) -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
