"""The gRPC aggregator on real loopback sockets, driven by the real coordinator.

Devices here are raw gRPC stubs, so every byte a device could send is under the test's
control: good rounds, and every kind of bad input, which must be refused with its reason
while the round and the model stay intact.
"""

from __future__ import annotations

import hashlib
import struct
import time
import zlib

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from aggregator_harness import (DEVICES, DIM, SECRET, download, encode,  # noqa: E402
                                get_task, md, running_aggregator, start_round, upload)
from shoal.codec import Chain, to_bytes  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.telemetry import PrometheusObserver  # noqa: E402
from shoal.transport.auth import Keyring  # noqa: E402
from shoal.transport.proto import shoal_pb2 as pb  # noqa: E402
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc  # noqa: E402
from shoal.transport.server import AggregatorService, AggregatorSettings, serve  # noqa: E402


@pytest.fixture()
def aggregator(tmp_path):
    # no upload limit given: it derives from the model (a DIM-value float32 payload)
    with running_aggregator(tmp_path, AggregatorSettings(chunk_size=64)) as running:
        yield running


def test_a_round_over_grpc_commits_the_weighted_mean(aggregator):
    service, stub = aggregator
    t, out = start_round(service)
    deltas, replies = {}, []
    for i, d in enumerate(DEVICES[:3]):
        task = get_task(stub, d)
        params = download(stub, d, task.model_version)
        assert np.array_equal(params, np.zeros(DIM, np.float32))
        deltas[d] = np.full(DIM, float(i + 1), np.float32)
        replies.append(upload(stub, d, task, deltas[d], num_examples=(i + 1) * 10))
        assert replies[-1].accepted
    t.join(timeout=15)
    # while the round was open, an accepted upload's reply said when to check in next, as
    # a check-in would have (pace steering: 0.5-1.5 x checkin_interval_s from the reply)
    interval = AggregatorSettings().checkin_interval_s
    for reply in replies[:2]:
        assert reply.come_back.reason == "already_reported"
        assert 0.5 * interval - 1 <= reply.come_back.at - time.time() <= 1.5 * interval
    rec = out["record"]
    assert rec.committed and rec.accepted == 3
    w = np.array([10, 20, 30.0])
    np.testing.assert_allclose(out["state"].params, (w @ np.array([1, 2, 3.0])) / w.sum())
    # the over-selected fourth device is told the round is over
    late = stub.CheckIn(pb.CheckInRequest(device_id="dev-d"), metadata=md("dev-d"), timeout=5)
    assert late.WhichOneof("reply") == "come_back"
    assert service.metrics.value("shoal_updates_total", result="accepted", reason="") == 3
    # the registry saw every device and recorded who took part
    registry = SQLiteRegistry(service.registry_path)
    assert registry.count() == 4
    assert sorted(d.participation for d in registry.list()) == [0, 1, 1, 1]


@pytest.mark.parametrize("fault, reason", [
    ("nan", "non_finite"), ("short", "wrong_shape"), ("long", "too_large"),
    ("corrupted", "malformed"), ("truncated", "truncated"), ("stale", "stale"),
    ("past_round", "wrong_round"), ("bad_key", "bad_key"), ("huge_norm", "norm_too_large"),
    ("too_large", "too_large"), ("garbage", "malformed"),
])
def test_bad_uploads_are_refused_with_their_reason_and_change_nothing(aggregator, fault,
                                                                       reason):
    service, stub = aggregator
    t, out = start_round(service)
    task = get_task(stub, "dev-a")
    good = np.ones(DIM, np.float32)
    kw: dict = {}
    delta = good
    if fault == "nan":
        # shoal's encoder refuses NaN, so forge the payload: a sentinel value swapped for NaN
        # and the CRC recomputed -- what a hostile or broken client could send
        marked = good.copy()
        marked[3] = 12345.678
        blob = bytearray(to_bytes(Chain([]).encode(marked, np.random.default_rng(0))))
        at = bytes(blob).find(np.float32(12345.678).tobytes())
        blob[at:at + 4] = np.float32(np.nan).tobytes()
        blob[-4:] = struct.pack("<I", zlib.crc32(bytes(blob[:-4])))
        kw["blob"] = bytes(blob)
    elif fault == "short":
        delta = good[:-1]
    elif fault == "long":
        delta = np.ones(DIM + 1, np.float32)
    elif fault == "corrupted":
        # one byte flipped after encoding (and a SHA-256 of what is sent): the codec frame's
        # CRC-32 is the payload's integrity check
        blob = bytearray(to_bytes(Chain([]).encode(good, np.random.default_rng(0))))
        blob[100] ^= 0x01
        kw.update(blob=bytes(blob))
    elif fault == "truncated":
        blob = to_bytes(Chain([]).encode(good, np.random.default_rng(0)))
        kw.update(blob=blob[:-10], total=len(blob), sha=hashlib.sha256(blob).digest())
    elif fault == "stale":
        kw["header_overrides"] = {"base_version": task.model_version + 5}
    elif fault == "past_round":
        kw["header_overrides"] = {"round": task.round - 1}
    elif fault == "bad_key":
        kw["header_overrides"] = {"upload_key": "0" * 32}
    elif fault == "huge_norm":
        delta = np.full(DIM, 1e3, np.float32)
    elif fault == "too_large":
        kw["header_overrides"] = {"total_size": 1 << 20}
    elif fault == "garbage":
        blob = b"not a shoal payload" * 5
        kw.update(blob=blob)
    reply = upload(stub, "dev-a", task, delta, **kw)
    assert not reply.accepted and reply.reason == reason, reply
    # nothing changed: the same device can still deliver its real update
    assert upload(stub, "dev-a", task, good).accepted
    for d in ("dev-b", "dev-c"):
        tk = get_task(stub, d)
        assert upload(stub, d, tk, good).accepted
    t.join(timeout=15)
    np.testing.assert_allclose(out["state"].params, good)
    assert service.metrics.value("shoal_updates_total", result="rejected",
                                 reason=reason) == 1


def test_replayed_upload_is_answered_once_and_counted_once(aggregator):
    service, stub = aggregator
    t, out = start_round(service)
    tasks = {d: get_task(stub, d) for d in DEVICES[:3]}
    one = np.ones(DIM, np.float32)
    assert upload(stub, "dev-a", tasks["dev-a"], one).accepted
    assert upload(stub, "dev-a", tasks["dev-a"], one).accepted  # a retry: same answer
    changed = upload(stub, "dev-a", tasks["dev-a"], one * 2)    # same key, other payload
    assert not changed.accepted and changed.reason == "duplicate"
    # the header's SHA-256 is the device's fingerprint of its upload (the CRC-32 checks the
    # bytes): another payload declaring the first one's is answered as the first, and not
    # counted (a device can only misdescribe its own retry)
    claimed = hashlib.sha256(encode(one)).digest()
    assert upload(stub, "dev-a", tasks["dev-a"], one * 3, sha=claimed).accepted
    assert not upload(stub, "dev-a", tasks["dev-a"], one, sha=b"\1" * 32).accepted
    for d in ("dev-b", "dev-c"):
        assert upload(stub, d, tasks[d], one).accepted
    t.join(timeout=15)
    assert out["record"].accepted == 3
    np.testing.assert_allclose(out["state"].params, one)  # the first dev-a update only


@pytest.mark.parametrize("case", ["missing", "forged", "expired", "other_device"])
def test_unauthenticated_calls_are_refused_and_counted(aggregator, case):
    service, stub = aggregator
    if case == "missing":
        metadata = ()
    elif case == "forged":
        metadata = md("dev-a", secret=b"x" * 32)
    elif case == "expired":
        metadata = md("dev-a", ttl=10, now=time.time() - 3600)
    else:
        metadata = md("dev-b")
    with pytest.raises(grpc.RpcError) as info:
        stub.CheckIn(pb.CheckInRequest(device_id="dev-a"), metadata=metadata, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    refused = [m for m in service.metrics.registry.collect()
               if m.name == "shoal_refused_calls"]
    assert sum(s.value for m in refused for s in m.samples if s.name.endswith("_total")) == 1


def test_a_round_without_enough_reports_is_abandoned(tmp_path):
    with running_aggregator(tmp_path, AggregatorSettings(), hello=False) as (service, stub):
        t, out = start_round(service, deadline_s=0.5, min_fraction=1.0)
        task = get_task(stub, "dev-a")
        assert upload(stub, "dev-a", task, np.ones(DIM, np.float32)).accepted
        t.join(timeout=15)
        rec = out["record"]
        # the deadline passed with 1 of the 3 required updates: the policy abandons it
        assert not rec.committed and rec.closed_by == "deadline" and rec.accepted == 1
        assert rec.rejected.get("timed_out") == 3
        assert np.all(out["state"].params == 0)  # the model did not move


def test_tls_and_metrics_endpoint(tmp_path):
    import datetime as dt
    import urllib.request

    from shoal.transport.certs import make_local_pki

    pki = make_local_pki(tmp_path / "pki", days=1, now=dt.datetime.now(dt.timezone.utc))
    service = AggregatorService(AggregatorSettings(), Keyring.single(SECRET), DIM, "fp",
                                lambda: SQLiteRegistry(tmp_path / "r.db"),
                                metrics=PrometheusObserver())
    port, stop = serve(service, tls=(pki.server_cert.read_bytes(), pki.server_key.read_bytes()))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
        channel = grpc.secure_channel(f"localhost:{port}", creds)
        stub = pb_grpc.AggregatorStub(channel)
        reply = stub.Hello(pb.HelloRequest(device_id="dev-a"), metadata=md("dev-a"), timeout=5)
        assert reply.server_id == "shoal"
        plain = grpc.insecure_channel(f"127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError):
            pb_grpc.AggregatorStub(plain).Hello(pb.HelloRequest(device_id="dev-a"),
                                                metadata=md("dev-a"), timeout=2)
        mport = service.metrics.serve_http(0)
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
        assert b"shoal_updates_total" in text and b"shoal_rounds_total" in text
        channel.close()
        plain.close()
    finally:
        service.metrics.close()
        stop()


def test_malformed_protobuf_is_refused_by_the_transport(aggregator):
    service, stub = aggregator
    port_channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    raw = port_channel.unary_unary("/shoal.v1.Aggregator/CheckIn",
                                   request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\xff\xff\xff\xff not a protobuf", metadata=md("dev-a"), timeout=5)
    assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT,
                                 grpc.StatusCode.UNKNOWN)
    # the service is unharmed
    assert stub.CheckIn(pb.CheckInRequest(device_id="dev-a"), metadata=md("dev-a"),
                        timeout=5).WhichOneof("reply") == "come_back"
    port_channel.close()


def test_structured_logs_are_json_lines(aggregator):
    import io
    import json
    import logging

    from shoal.telemetry import configure_json_logging
    from shoal.telemetry.logs import LogObserver

    service, stub = aggregator
    buf = io.StringIO()
    configure_json_logging(buf)
    try:
        t, out = start_round(service, observers=[LogObserver()])
        task = get_task(stub, "dev-a")
        upload(stub, "dev-a", task, np.ones(DIM, np.float32),
               header_overrides={"upload_key": "0" * 32})
        with pytest.raises(grpc.RpcError):
            stub.CheckIn(pb.CheckInRequest(device_id="dev-b"), metadata=(), timeout=5)
        for d in DEVICES[:3]:
            tk = get_task(stub, d)
            upload(stub, d, tk, np.ones(DIM, np.float32))
        t.join(timeout=15)
    finally:
        logging.getLogger("shoal").handlers[:] = []
        logging.getLogger("shoal").propagate = True
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    kinds = {e.get("event") for e in events}
    assert {"upload_refused", "auth_refused", "version_committed"} <= kinds
    refused = next(e for e in events if e.get("event") == "upload_refused")
    assert refused["reason"] == "bad_key" and refused["device"] == "dev-a"
    closed = next(e for e in events if e.get("event") == "version_committed")
    assert closed["version"] == 1 and closed["accepted"] == 3
    assert closed["closed_by"] == "target_reached"


def test_registry_sampler_applies_a_selection_strategy(tmp_path):
    from shoal.deploy import RegistrySampler
    from shoal.selection import FairnessAware

    path = tmp_path / "reg.db"
    reg = SQLiteRegistry(path)
    for i, d in enumerate(DEVICES):
        reg.enroll(d, now=1.0)
        for r in range(i):  # dev-a never took part, dev-d three times
            reg.record_outcome(d, r, "accepted", now=2.0)
    sampler = RegistrySampler(FairnessAware(mode="least"), 2, tuple(sorted(DEVICES)),
                              lambda: SQLiteRegistry(path), clock=lambda: 3.0)
    picked = sampler.sample(4, np.random.default_rng(0))
    assert [sorted(DEVICES)[i] for i in picked] == ["dev-a", "dev-b"]


def test_bdp_probing_is_the_operator_s_choice_and_uploads_go_through_either_way(tmp_path):
    from shoal.config import load_config
    from shoal.deploy import settings_from_config
    from shoal.transport.listener import server_options

    # off by default: a fixed 64 KiB window bounds what a waiting upload buffers
    assert settings_from_config(load_config(None)).bdp_probe is False
    assert ("grpc.http2.bdp_probe", 0) in server_options(20.0)
    on = settings_from_config(load_config(None, {"deploy.bdp_probe": True}))
    assert on.bdp_probe is True and ("grpc.http2.bdp_probe", 1) in server_options(20.0, True)
    with running_aggregator(tmp_path, on) as (service, stub):
        t, out = start_round(service)
        for d in DEVICES[:3]:
            assert upload(stub, d, get_task(stub, d), np.full(DIM, 2.0, np.float32)).accepted
        t.join(timeout=15)
        np.testing.assert_allclose(out["state"].params, 2.0)
