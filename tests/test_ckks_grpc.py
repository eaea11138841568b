"""CKKS aggregation over real loopback gRPC: devices encrypt their clipped, weighted updates
under the run's public context, the aggregator adds ciphertexts without the secret key, and a
separate key holder decrypts only the sum.

The oracle is plain FedAvg computed here from the surviving devices' own updates (clipped per
coordinate, weighed by their capped example counts); the committed model must equal it within
CKKS's error, with 0 and 30% of the devices never uploading. Bad uploads (malformed framing,
oversized, another key's id, ciphertexts of other parameters) are refused with a reason and
leave the sum unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("tenseal")

from secure_devices import Vanish, check_in_all, run_devices  # noqa: E402
from shoal.device_ckks import CkksSetup  # noqa: E402
from shoal.policy import SyncPolicy  # noqa: E402
from shoal.privacy.he import CkksParams, KeyHolder, encrypt_update, public_context  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.runner import run_round  # noqa: E402
from shoal.sampling import UniformSampler  # noqa: E402
from shoal.strategy import FedAvg  # noqa: E402
from shoal.telemetry import PrometheusObserver  # noqa: E402
from shoal.transport.auth import Keyring  # noqa: E402
from shoal.transport.carrier import GrpcCarrier  # noqa: E402
from shoal.transport.ckks_wire import pack_ciphertexts  # noqa: E402
from shoal.transport.device_api import TrainResult  # noqa: E402
from shoal.transport.proto import shoal_pb2 as pb  # noqa: E402
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc  # noqa: E402
from shoal.transport.server import AggregatorService, AggregatorSettings, serve  # noqa: E402
from shoal.transport.tokens import issue_token  # noqa: E402

DIM = 5000  # three ciphertexts at N = 4096 (2,048 slots each; the weight rides along)
SECRET = b"c" * 32
CLIP = 2.0
MAX_WEIGHT = 64
#: the committed model's largest error against plain FedAvg: measured 6e-8 here (0 and 30%
#: dropouts), which is the float32 rounding of the model (half an ulp at 2 is 1.2e-7) over
#: CKKS's own error at scale 2^40; the bound is still 6 orders of magnitude below the updates
CKKS_ERROR = 1e-6


def delta_of(i: int) -> np.ndarray:
    return np.random.default_rng(500 + i).uniform(-2.5, 2.5, DIM).astype(np.float32)


def examples_of(i: int) -> int:
    return 5 + 9 * i  # device 7 and up claim more than MAX_WEIGHT: capped


def fedavg(included) -> np.ndarray:
    w = np.array([min(examples_of(i), MAX_WEIGHT) for i in included], float)
    return (w @ np.clip(np.stack([delta_of(i) for i in included]).astype(float), -CLIP, CLIP)
            ) / w.sum()


class KeyService:
    """The key holder as the aggregator sees it: a separate object it can only ask to decrypt
    a sum (it is never handed the secret key); records what it was asked."""

    def __init__(self) -> None:
        self._holder = KeyHolder(CkksParams(), min_clients=2)
        self.asked: list[int] = []

    def public_context(self) -> bytes:
        return self._holder.public_context()

    def decrypt(self, ciphertexts, dim, contributions, task):
        self.asked.append(contributions)
        return self._holder.decrypt_sum(ciphertexts, dim, contributions, task)


def ckks_setup(tmp_path, n, *, deadline_s):
    keys = KeyService()
    setup = CkksSetup(CkksParams(), keys.public_context(), clip=CLIP, max_weight=MAX_WEIGHT,
                      decrypt=keys.decrypt)
    settings = AggregatorSettings(roster_wait_s=5.0, stage_timeout_s=1.0, long_poll_s=0.5,
                                  checkin_interval_s=0.2, idle_retry_s=0.2, rate_per_s=200,
                                  burst=400)
    service = AggregatorService(settings, Keyring.single(SECRET), DIM, "fp",
                                lambda: SQLiteRegistry(tmp_path / "registry.db"),
                                metrics=PrometheusObserver())
    port, stop = serve(service)
    devices = [f"dev-{i}" for i in range(n)]
    for d in devices:
        SQLiteRegistry(tmp_path / "registry.db").enroll(d, now=time.time())
    pool = GrpcCarrier(service, devices, poll_s=0.05, secure=setup)
    policy = SyncPolicy(target=n, deadline_s=deadline_s, min_fraction=0.5, max_attempts=1)
    coord = functools.partial(run_round, FedAvg(), pool, UniformSampler(n), seed=0,
                              policy=policy)
    return keys, setup, service, port, stop, pool, devices, coord


@pytest.mark.parametrize("gone", [(), (1, 4, 8)])  # 0 and 30% check in, never upload
def test_ckks_round_over_grpc_commits_the_survivors_fedavg(tmp_path, gone):
    n = 10
    keys, setup, service, port, stop_server, pool, devices, coord = ckks_setup(
        tmp_path, n, deadline_s=6.0 if gone else 30.0)
    stop = threading.Event()
    try:
        stats: dict = {}

        def result(i):
            if i in gone:  # checked in, downloaded, then vanished: never uploads
                raise Vanish(devices[i])
            return TrainResult(delta_of(i), examples_of(i), {"loss": 0.1})

        threads = run_devices(port, devices, {}, stop, stats, DIM, secret=SECRET,
                              result=result)
        state, rec = coord(FedAvg().init(np.zeros(DIM, np.float32)))
        for t in threads:
            t.join(timeout=20)
    finally:
        stop.set()
        stop_server()
    assert rec.committed, rec
    included = [i for i in range(n) if i not in gone]
    error = float(np.abs(state.params - fedavg(included)).max())
    assert error < CKKS_ERROR, error
    # the oracle can tell the survivors from everyone: the dropouts are not in the sum
    if gone:
        assert np.abs(state.params - fedavg(range(n))).max() > 1e3 * CKKS_ERROR
    assert rec.privacy["ckks_included"] == len(included)
    assert rec.privacy["ckks_dropped"] == len(gone)  # on the roster, not in the sum
    assert keys.asked == [len(included)]  # one decryption, of the sum of the survivors
    per_upload = rec.privacy["ckks_upload_bytes"]
    assert per_upload == pytest.approx(3 * 65676, rel=0.01)
    for i in included:
        assert stats[devices[i]].uploads_accepted == 1, (i, stats[devices[i]])


def _md(d):
    return (("authorization",
             f"Bearer {issue_token(SECRET, d, now=time.time(), ttl_seconds=60)}"),)


def _by_hand(tmp_path, n):
    """A CKKS round of ``n`` devices over gRPC whose devices the test plays by hand: the
    round runs on a thread (its ``(state, rec)`` land in ``out``)."""
    keys, setup, service, port, stop_server, pool, devices, coord = ckks_setup(
        tmp_path, n, deadline_s=30.0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.AggregatorStub(channel)
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(
        zip(("state", "rec"), coord(FedAvg().init(np.zeros(DIM, np.float32))))))
    runner.start()
    return keys, setup, stop_server, pool, devices, channel, stub, runner, out


def _upload(stub, task, d, payload, key_id, *, size=None):
    """``payload`` uploaded by hand as ``d``'s answer to ``task``."""
    header = pb.UploadHeader(device_id=d, round=task.round, base_version=task.model_version,
                             upload_key=task.upload_key, num_examples=1,
                             total_size=len(payload) if size is None else size,
                             sha256=hashlib.sha256(payload).digest(), ckks_key=key_id)
    return stub.Upload(iter([pb.UploadChunk(header=header), pb.UploadChunk(data=payload)]),
                       metadata=_md(d), timeout=10)


def test_bad_ckks_uploads_are_refused_with_a_reason_and_change_nothing(tmp_path):
    n = 3
    keys, setup, stop_server, pool, devices, channel, stub, runner, out = _by_hand(tmp_path, n)
    try:
        tasks = check_in_all(lambda: pool.gateway, stub, devices, _md)
        assert all(t.kind == "ckks" and t.ckks.key_id == setup.key_id for t in tasks.values())
        got = stub.CkksContext(pb.CkksContextRequest(key_id=setup.key_id),
                               metadata=_md("dev-0"), timeout=5)
        ctx = public_context(got.context)  # public: it would refuse a secret key
        assert hashlib.sha256(got.context).digest() == setup.key_id
        with pytest.raises(grpc.RpcError) as err:
            stub.CkksContext(pb.CkksContextRequest(key_id=b"x" * 32), metadata=_md("dev-0"),
                             timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        def upload(d, payload, *, key=setup.key_id, size=None):
            return _upload(stub, tasks[d], d, payload, key, size=size)

        def good(i):
            return pack_ciphertexts(encrypt_update(
                ctx, delta_of(i), min(examples_of(i), MAX_WEIGHT), clip=CLIP, slots=2048))

        g0 = good(0)
        other = KeyHolder(CkksParams(poly_modulus_degree=8192))
        wide = encrypt_update(public_context(other.public_context()), delta_of(0)[:4000], 1,
                              clip=CLIP, slots=2048)
        primes = encrypt_update(public_context(KeyHolder(CkksParams(
            coeff_mod_bit_sizes=(59, 49))).public_context()), delta_of(0), 1, clip=CLIP,
            slots=2048)
        assert upload("dev-0", g0[:-7]).reason == "malformed"  # lengths do not add up
        assert upload("dev-0", pack_ciphertexts([b"x"] * 2)).reason == "wrong_shape"
        assert upload("dev-0", g0, size=10**9).reason == "too_large"  # before a byte is read
        assert upload("dev-0", g0, key=b"k" * 32).reason == "wrong_key"
        # ciphertexts of other parameters: N = 8192 are too large to be this round's; a
        # 59-bit data prime at N = 4096 fits the bound but does not parse under this context
        # (primes of 60 and 40 bits would: SEAL picks the same 60-bit data prime, so such
        # ciphertexts are as undetectable as another key's -- only the key id catches them)
        ours = encrypt_update(ctx, delta_of(0), 1, clip=CLIP, slots=2048)
        assert upload("dev-0", pack_ciphertexts([*wide[:1], *ours[1:]])).reason == "too_large"
        refused = upload("dev-0", pack_ciphertexts([*primes[:1], *ours[1:]]))
        assert refused.reason == "malformed" and "parse" in refused.detail, refused
        # parses, right sizes, but one ciphertext at another scale: it would add to garbage
        # (or, first in the sum, make every honest upload fail)
        ts = pytest.importorskip("tenseal")
        rescaled = bytes(ts.ckks_vector(ctx, [0.0] * 2048, scale=2.0 ** 30).serialize())
        refused = upload("dev-0", pack_ciphertexts([ours[0], rescaled, *ours[2:]]))
        assert refused.reason == "malformed" and "scale" in refused.detail, refused
        tasks["dev-0"], real = tasks["dev-1"], tasks["dev-0"]
        assert upload("dev-0", g0).reason == "bad_key"
        tasks["dev-0"] = real
        assert pool.gateway.session(1).included == set()  # nothing reached the sum
        # the honest uploads commit exactly the honest mean
        for i, d in enumerate(devices):
            assert upload(d, good(i) if i else g0).accepted, d
        assert upload("dev-0", g0).accepted  # a retry: answered, counted once
        runner.join(timeout=20)
    finally:
        with pool.gateway.lock:
            s = pool.gateway.session(1)
            if s is not None:
                s.close("test over")
        runner.join(timeout=20)
        channel.close()
        stop_server()
    assert out["rec"].committed
    assert float(np.abs(out["state"].params - fedavg(range(n))).max()) < CKKS_ERROR
    assert keys.asked == [n]


def test_a_sum_beyond_what_clipped_uploads_can_make_is_not_committed(tmp_path):
    """CKKS cannot check a plaintext's range; the decrypted sum can: one device encrypting
    an unclipped update (values 1,000 x clip) makes the round abandoned, not committed."""
    n = 3
    keys, setup, stop_server, pool, devices, channel, stub, runner, out = _by_hand(tmp_path, n)
    try:
        tasks = check_in_all(lambda: pool.gateway, stub, devices, _md)
        got = stub.CkksContext(pb.CkksContextRequest(key_id=setup.key_id),
                               metadata=_md("dev-0"), timeout=5)
        ctx = public_context(got.context)
        for i, d in enumerate(devices):
            x = delta_of(i) * (1000.0 if i == 0 else 1.0)  # dev-0 does not clip
            payload = pack_ciphertexts(encrypt_update(
                ctx, x, min(examples_of(i), MAX_WEIGHT), clip=1e9 if i == 0 else CLIP,
                slots=2048))
            assert _upload(stub, tasks[d], d, payload, setup.key_id).accepted  # CKKS can't tell
        runner.join(timeout=30)
    finally:
        runner.join(timeout=20)
        channel.close()
        stop_server()
    assert not out["rec"].committed and not out["state"].params.any()


def test_key_service_decrypts_only_sums_in_its_own_process():
    from shoal.errors import PrivacyError
    from shoal.key_service import KeyService

    keys = KeyService(CkksParams())
    try:
        assert keys._child.pid != os.getpid() and keys._child.alive
        ctx = public_context(keys.context)  # public: it refuses a context with a secret key
        a, b = delta_of(0)[:10], delta_of(1)[:10]
        cts = [encrypt_update(ctx, x, 3, clip=CLIP, slots=2048) for x in (a, b)]
        summed = [bytes((ts_vec(ctx, c0) + ts_vec(ctx, c1)).serialize())
                  for c0, c1 in zip(*cts)]
        with pytest.raises(PrivacyError, match="at least 2"):
            keys.decrypt(cts[0], 10, 1, round=(3, 7))  # one device's update is not a sum
        total, weight = keys.decrypt(summed, 10, 2, round=(3, 7))
        expected = 3 * (np.clip(a, -CLIP, CLIP) + np.clip(b, -CLIP, CLIP))
        assert np.abs(total - expected).max() < 1e-6 and round(weight) == 6
        with pytest.raises(PrivacyError, match="already decrypted"):
            # never twice under one round key (the key is the aggregator's: docs/trust.md)
            keys.decrypt(summed, 10, 2, round=(3, 7))
    finally:
        keys.close()
    assert not keys._child.alive


def ts_vec(ctx, blob):
    import tenseal

    return tenseal.ckks_vector_from(ctx, blob)


@pytest.mark.slow
def test_launch_with_ckks_matches_the_simulation(tmp_path, capsys):
    """`shoal launch` with CKKS: client processes encrypt, the aggregator adds, the key
    holder's own process decrypts; the run ends where `shoal run` with CKKS does."""
    from shoal.cli import main

    args = ["--set", "data.dataset=\"synthetic\"", "--clients", "3", "--per-round", "3",
            "--set", "model.name=\"logreg\"", "--set", "deploy.over_selection=1.0",
            "--set", "deploy.min_fraction=1.0", "--set", "deploy.checkin_interval_s=0.3",
            "--set", "secure_aggregation.enabled=true",
            "--set", "secure_aggregation.protocol=\"ckks\"", "--rounds", "2",
            "--out", str(tmp_path / "runs"), "--json", "-q"]
    assert main(["launch", *args, "--dir", str(tmp_path / "work")]) == 0
    launched = json.loads(capsys.readouterr().out)
    assert main(["run", *args]) == 0
    simulated = json.loads(capsys.readouterr().out)
    assert launched["client_processes"] == 3 and launched["client_updates"] == 6
    assert launched["final_loss"] == pytest.approx(simulated["final_loss"], rel=1e-5)
    assert launched["final_accuracy"] == pytest.approx(simulated["final_accuracy"], abs=1e-3)
    # one 2,048-slot ciphertext per device and round (610 parameters and the weight)
    assert launched["bytes_up_per_round"] == pytest.approx(3 * 65676, rel=0.02)


def test_a_deployment_refuses_ckks_rounds_whose_sum_could_overflow():
    from shoal.config import load_config
    from shoal.deploy import check_deployable
    from shoal.errors import ConfigError

    def cfg(per_round, max_weight):
        return load_config(None, {"data.clients": 1000, "sampling.per_round": per_round,
                                  "deploy.over_selection": 1.0,
                                  "secure_aggregation.enabled": True,
                                  "secure_aggregation.protocol": "ckks",
                                  "secure_aggregation.max_weight": max_weight})

    check_deployable(cfg(100, 4096), tls=False)  # 100 x 0.5 x 4096 < 2^18
    with pytest.raises(ConfigError) as exc:
        check_deployable(cfg(200, 4096), tls=False)  # 200 x 2048 > 2^18
    assert exc.value.key == "secure_aggregation.max_weight" and "below 2621" in str(exc.value)
    check_deployable(cfg(200, 2000), tls=False)
