"""Secure aggregation over real loopback gRPC: the coordinator's device pool drives a
``SecAggDeviceRound`` and real ``DeviceClient`` runtimes (threads) run the client machines.

The oracle is computed here from the devices' own updates: the committed model must equal the
weighted mean of the clipped updates of exactly the included devices, within one
quantization step, while devices vanish at chosen stages. Bad secure-aggregation calls are
refused with their reason and leave the round intact.
"""

from __future__ import annotations

import functools

import hashlib
import threading
import time

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from shoal.codec import Chain, to_bytes  # noqa: E402
from shoal.runner import run_round
from shoal.sampling import UniformSampler  # noqa: E402
from shoal.privacy.secagg_rounds import SecAggAggregation  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.strategy import FedAvg  # noqa: E402
from shoal.transport.auth import Keyring  # noqa: E402
from shoal.transport.tokens import issue_token  # noqa: E402
from shoal.transport.device_api import TrainResult  # noqa: E402
from shoal.transport.proto import shoal_pb2 as pb  # noqa: E402
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc  # noqa: E402
from shoal.policy import SyncPolicy  # noqa: E402
from shoal.telemetry import PrometheusObserver  # noqa: E402
from shoal.transport.carrier import GrpcCarrier  # noqa: E402
from secure_devices import check_in_all, run_devices  # noqa: E402
from shoal.transport.server import AggregatorService, AggregatorSettings, serve  # noqa: E402

DIM = 300
SECRET = b"s" * 32
CLIP = 2.0


def delta_of(i: int) -> np.ndarray:
    return np.random.default_rng(100 + i).uniform(-2.5, 2.5, DIM).astype(np.float32)


def examples_of(i: int) -> int:
    return 5 + 3 * i


def secure_setup(tmp_path, n, *, target, min_fraction=0.5, stage_timeout_s=1.5,
                 deadline_s=8.0):
    """A secure aggregator, its carrier and the round's policy (the round's deadline bounds
    the whole protocol: input collection ends ``stage_timeout_s`` before it)."""
    settings = AggregatorSettings(roster_wait_s=5.0, stage_timeout_s=stage_timeout_s,
                                  long_poll_s=0.5, checkin_interval_s=0.2, idle_retry_s=0.2,
                                  rate_per_s=200, burst=400)
    service = AggregatorService(settings, Keyring.single(SECRET), DIM, "fp",
                                lambda: SQLiteRegistry(tmp_path / "registry.db"),
                                metrics=PrometheusObserver())
    port, stop = serve(service)
    secure = SecAggAggregation(clip=CLIP, value_bits=18, max_weight=64, neighbours=-1,
                               threshold=0, dropout=0.0, corrupt_rate=0.05,
                               rng_for_round=np.random.default_rng)
    devices = [f"dev-{i}" for i in range(n)]
    pool = GrpcCarrier(service, devices, poll_s=0.05, secure=secure)
    pool.policy = SyncPolicy(target=target, deadline_s=deadline_s, min_fraction=min_fraction,
                             max_attempts=1)
    return service, port, stop, pool, devices


@pytest.mark.parametrize("vanish", [
    {},
    {"dev-1": "share_keys", "dev-4": "advertise_keys"},  # masks of dev-1 are reconstructed
    {"dev-2": "masked_input"},  # its input is in, its unmasking shares never come
])
def test_secure_round_over_grpc_sums_exactly_the_included_devices(tmp_path, vanish):
    n = 6
    service, port, stop_server, pool, devices = secure_setup(tmp_path, n, target=n)
    stop = threading.Event()
    try:
        for d in devices:  # register them (Hello) before the round samples
            SQLiteRegistry(tmp_path / "registry.db").enroll(d, now=time.time())
        stats: dict = {}
        threads = run_devices(port, devices, vanish, stop, stats, result=lambda i: TrainResult(
            delta_of(i), examples_of(i), {"loss": 0.1}), secret=SECRET)
        coord = functools.partial(run_round, FedAvg(), pool, UniformSampler(n), seed=0,
                                  policy=pool.policy)
        state, rec = coord(FedAvg().init(np.zeros(DIM, np.float32)))
        for t in threads:
            t.join(timeout=20)
    finally:
        stop.set()
        stop_server()
    assert rec.committed, rec
    gone_before_input = {d for d, s in vanish.items() if s in ("advertise_keys", "share_keys")}
    included = [i for i, d in enumerate(devices) if d not in gone_before_input]
    assert rec.accepted == len(included)
    assert rec.privacy["secagg_included"] == len(included)
    assert rec.privacy["secagg_dropped"] == len(gone_before_input)
    w = np.array([min(examples_of(i), 64) for i in included], float)
    expected = (w @ np.clip(np.stack([delta_of(i) for i in included]), -CLIP, CLIP)) / w.sum()
    step = 2 * CLIP / (2**18 - 1)
    np.testing.assert_allclose(state.params, expected, atol=step, rtol=0)
    # and it is not the sum over everyone: the test can tell the difference
    everyone = np.clip(np.stack([delta_of(i) for i in range(n)]), -CLIP, CLIP).mean(0)
    if gone_before_input:
        assert np.abs(state.params - everyone).max() > 100 * step
    assert rec.bytes_up > DIM and rec.bytes_down > DIM
    for d in devices:
        if d not in vanish:
            assert stats[d].secagg == {"done": 1}, (d, stats[d])


def test_too_many_vanishing_devices_abort_the_round_and_keep_the_model(tmp_path):
    n = 5
    service, port, stop_server, pool, devices = secure_setup(tmp_path, n, target=n,
                                                             min_fraction=0.8)
    stop = threading.Event()
    try:
        for d in devices:
            SQLiteRegistry(tmp_path / "registry.db").enroll(d, now=time.time())
        vanish = {"dev-0": "share_keys", "dev-3": "share_keys"}
        stats: dict = {}
        threads = run_devices(port, devices, vanish, stop, stats, result=lambda i: TrainResult(
            delta_of(i), examples_of(i), {"loss": 0.1}), secret=SECRET)
        coord = functools.partial(run_round, FedAvg(), pool, UniformSampler(n), seed=0,
                                  policy=pool.policy)
        start = FedAvg().init(np.ones(DIM, np.float32))
        state, rec = coord(start)
        for t in threads:
            t.join(timeout=20)
    finally:
        stop.set()
        stop_server()
    assert not rec.committed and rec.rejected.get("round_abandoned") == 1
    np.testing.assert_array_equal(state.params, start.params)
    for d in ("dev-1", "dev-2", "dev-4"):
        assert stats[d].secagg == {"aborted": 1}


def _md(d):
    return (("authorization", f"Bearer {issue_token(SECRET, d, now=time.time(), ttl_seconds=60)}"),)


def test_bad_secagg_calls_are_refused_with_a_reason(tmp_path):
    n = 4
    service, port, stop_server, pool, devices = secure_setup(tmp_path, n, target=n,
                                                             stage_timeout_s=3.0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.AggregatorStub(channel)
    coord = functools.partial(run_round, FedAvg(), pool, UniformSampler(n), seed=0,
                                  policy=pool.policy)
    out = {}
    runner = threading.Thread(target=lambda: out.update(
        rec=coord(FedAvg().init(np.zeros(DIM, np.float32)))[1]))
    try:
        runner.start()
        tasks = check_in_all(lambda: pool.gateway, stub, devices, _md)
        assert all(t.kind == "secagg" for t in tasks.values())

        def call(d, task, *chunks_after, metadata=None, **body):
            header = pb.SecAggHeader(device_id=d, round=task.round,
                                     base_version=task.model_version,
                                     upload_key=task.upload_key, **(body or {"poll": True}))
            parts = [pb.SecAggChunk(header=header), *chunks_after]
            return stub.SecAgg(iter(parts), metadata=metadata or _md(d), timeout=10)

        t0 = tasks["dev-0"]
        setup = call("dev-0", t0)
        assert setup.WhichOneof("reply") == "setup" and setup.setup.client_id == 0
        assert call("dev-0", t0, keys=pb.SecAggKeys(enc_public=b"short", mask_public=b"x")
                    ).refused.reason == "protocol"
        wrong_key = pb.Task(round=t0.round, model_version=t0.model_version, upload_key="0" * 32)
        assert call("dev-0", wrong_key).refused.reason == "bad_key"
        masked = pb.SecAggMaskedHeader(session=setup.setup.session, total_size=4, sha256=b"")
        assert call("dev-0", t0, pb.SecAggChunk(data=b"abcd"), masked=masked
                    ).refused.reason == "checksum"
        huge = pb.SecAggMaskedHeader(session=setup.setup.session, total_size=10**9)
        assert call("dev-0", t0, masked=huge).refused.reason == "too_large"
        # someone else's token cannot speak for dev-0
        with pytest.raises(grpc.RpcError) as err:
            call("dev-0", t0, metadata=_md("dev-1"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # a plain (unmasked) upload is refused: this round only takes masked inputs
        blob = to_bytes(Chain([]).encode(delta_of(0), np.random.default_rng(0)))
        plain = pb.UploadHeader(device_id="dev-0", round=t0.round,
                                base_version=t0.model_version, upload_key=t0.upload_key,
                                num_examples=1, total_size=len(blob),
                                sha256=hashlib.sha256(blob).digest())
        reply = stub.Upload(iter([pb.UploadChunk(header=plain), pb.UploadChunk(data=blob)]),
                            metadata=_md("dev-0"), timeout=5)
        assert not reply.accepted and reply.reason == "wrong_task"
        for reason in ("protocol", "bad_key", "checksum", "too_large"):
            assert service.metrics.value("shoal_updates_total", result="rejected",
                                         reason=reason) == 1, reason
        # none of it disturbed the round: dev-0 still gets its setup
        assert call("dev-0", t0).WhichOneof("reply") == "setup"
    finally:
        with pool.gateway.lock:  # stop the round: the carrier reports it abandoned
            pool.gateway.session(1).close("test over")
        runner.join(timeout=20)
        channel.close()
        stop_server()
    assert not out["rec"].committed
