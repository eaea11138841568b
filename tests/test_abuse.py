"""The aggregator against unauthenticated, abusive and faulty callers, on real loopback gRPC.

Each test is an attack a client could mount for the price of a socket or of one enrolment
token: it must be refused early with its reason, hold nothing the honest devices need, and
leave their round committing the model it would have committed without it (the expected
model is computed here, independently of the server).
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from aggregator_harness import (DEVICES, DIM, encode, get_task, held_stream,  # noqa: E402
                                md, running_aggregator, start_round, upload, upload_header,
                                wait_for_round)
from shoal.transport.proto import shoal_pb2 as pb  # noqa: E402
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc  # noqa: E402
from shoal.transport.server import AggregatorSettings  # noqa: E402

ONE = np.ones(DIM, np.float32)


def _honest_round(service, stub, devices=DEVICES[:3], deltas=None, examples=None):
    """Devices take their task and upload (``ONE`` weighing 10 by default); the round's
    result."""
    t, out = start_round(service)
    for i, d in enumerate(devices):
        task = get_task(stub, d)
        delta = ONE if deltas is None else deltas[i]
        n = 10 if examples is None else examples[i]
        reply = upload(stub, d, task, delta, num_examples=n)
        assert reply.accepted, reply
    t.join(timeout=20)
    assert not t.is_alive() and "error" not in out, out.get("error")
    return out


def _ends_with(future, timeout=5.0):
    """The status code a call ended with (it must end within ``timeout``)."""
    try:
        future.result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise AssertionError(f"the call was still open after {timeout} s") from None
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# -- slots, streams and idle callers ----------------------------------------------------------


def test_unauthenticated_streams_hold_no_upload_slot(tmp_path):
    # every upload slot "taken" by streams without a token that never send a byte: they are
    # refused before anything is read, and honest devices still upload
    settings = AggregatorSettings(max_active_uploads=2, idle_timeout_s=30.0)
    with running_aggregator(tmp_path, settings) as (service, stub):
        release = threading.Event()
        idle = [stub.Upload.future(held_stream(release=release), timeout=30)
                for _ in range(8)]
        try:
            assert {_ends_with(f) for f in idle} == {grpc.StatusCode.UNAUTHENTICATED}
            out = _honest_round(service, stub)
            assert out["record"].committed and out["record"].accepted == 3
        finally:
            release.set()


def test_idle_and_stalled_calls_are_cut_after_the_idle_timeout(tmp_path):
    settings = AggregatorSettings(max_active_uploads=1, idle_timeout_s=0.5)
    with running_aggregator(tmp_path, settings) as (service, stub):
        t, out = start_round(service)
        task = get_task(stub, "dev-a")
        blob = encode(ONE)
        release = threading.Event()
        try:
            t0 = time.monotonic()
            # a token and then silence; a header and then silence (holding the only slot);
            # a unary call whose request never comes
            silent = stub.Upload.future(held_stream(release=release), metadata=md("dev-a"),
                                        timeout=30)
            stalled = stub.Upload.future(
                held_stream([pb.UploadChunk(header=upload_header("dev-b", get_task(
                    stub, "dev-b"), blob))], release), metadata=md("dev-b"), timeout=30)
            raw = grpc.insecure_channel(f"127.0.0.1:{service.port}")
            check_in = raw.stream_unary("/shoal.v1.Aggregator/CheckIn",
                                        request_serializer=lambda b: b,
                                        response_deserializer=lambda b: b)
            unary = check_in.future(held_stream(release=release), metadata=md("dev-c"),
                                    timeout=30)
            codes = {_ends_with(f) for f in (silent, stalled, unary)}
            assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED}
            assert time.monotonic() - t0 < 10.0  # the calls' own deadline is 30 s
            # the slot the stalled upload held is free again
            assert upload(stub, "dev-a", task, ONE).accepted
            raw.close()
        finally:
            release.set()
        for d in ("dev-b", "dev-c"):
            assert upload(stub, d, get_task(stub, d), ONE).accepted
        t.join(timeout=20)
        assert out["record"].committed


def test_the_idle_timeout_is_between_messages_not_for_the_whole_call(tmp_path):
    # the time is kept per message (transport/admission._Watchdog): a sender that stalls
    # after some of its data is cut, one whose every chunk comes within the timeout is not,
    # however long its whole upload takes
    settings = AggregatorSettings(max_active_uploads=2, idle_timeout_s=0.6)
    with running_aggregator(tmp_path, settings) as (service, stub):
        t, out = start_round(service)
        blob = encode(ONE)
        step = -(-len(blob) // 6)
        data = [pb.UploadChunk(data=blob[o:o + step]) for o in range(0, len(blob), step)]
        release = threading.Event()

        def slow(device):
            yield pb.UploadChunk(header=upload_header(device, get_task(stub, device), blob))
            for chunk in data:
                time.sleep(0.3)  # 6 x 0.3 s: three times the timeout in all
                yield chunk

        try:
            t0 = time.monotonic()
            stalled = stub.Upload.future(held_stream(
                [pb.UploadChunk(header=upload_header("dev-a", get_task(stub, "dev-a"), blob)),
                 *data[:2]], release), metadata=md("dev-a"), timeout=30)
            assert stub.Upload(slow("dev-b"), metadata=md("dev-b"), timeout=30).accepted
            assert time.monotonic() - t0 > 1.5
            assert _ends_with(stalled) == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            release.set()
        for d in ("dev-a", "dev-c"):
            assert upload(stub, d, get_task(stub, d), ONE).accepted
        t.join(timeout=20)
        assert out["record"].committed


def test_silent_connections_are_closed_after_the_idle_timeout(tmp_path):
    settings = AggregatorSettings(idle_timeout_s=0.5)
    with running_aggregator(tmp_path, settings) as (service, stub):
        socks = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(20)]
        t0 = time.monotonic()
        for s in socks:
            s.settimeout(5.0)
            while s.recv(4096):  # the server's HTTP/2 settings, then its close
                pass             # (a socket.timeout here fails the test)
            s.close()
        assert time.monotonic() - t0 < 10.0


def test_one_upload_stream_per_device(tmp_path):
    settings = AggregatorSettings(idle_timeout_s=30.0)
    with running_aggregator(tmp_path, settings) as (service, stub):
        t, out = start_round(service)
        task = get_task(stub, "dev-a")
        blob = encode(ONE)
        release = threading.Event()
        first = stub.Upload.future(held_stream(
            [pb.UploadChunk(header=upload_header("dev-a", task, blob))], release),
            metadata=md("dev-a"), timeout=30)
        time.sleep(0.2)  # the first stream's header is in
        try:
            with pytest.raises(grpc.RpcError) as info:
                upload(stub, "dev-a", task, ONE)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "already" in info.value.details()
        finally:
            release.set()
        assert _ends_with(first) == grpc.StatusCode.OK  # refused as truncated, not hung
        for d in DEVICES[:3]:
            assert upload(stub, d, task if d == "dev-a" else get_task(stub, d), ONE).accepted
        t.join(timeout=20)
        assert out["record"].accepted == 3


# -- upload size --------------------------------------------------------------------------------


def test_upload_limit_is_the_model_size_and_oversized_uploads_are_refused_early(tmp_path):
    # no configured limit: an update of this model in the task's codec cannot be larger than
    # the raw float32 payload of DIM values, so one byte more is refused at the header --
    # while the caller is still sending (its stream stays open: the server read no further)
    exact = len(encode(ONE))
    with running_aggregator(tmp_path, AggregatorSettings(idle_timeout_s=30.0)) as (
            service, stub):
        assert service.upload_limit == exact
        t, out = start_round(service)
        task = get_task(stub, "dev-a")
        release = threading.Event()
        try:
            big = encode(ONE) + b"x"
            over = stub.Upload.future(held_stream(
                [pb.UploadChunk(header=upload_header("dev-a", task, big))], release),
                metadata=md("dev-a"), timeout=30)
            reply = over.result(timeout=5)
            assert not reply.accepted and reply.reason == "too_large", reply
            assert f"limit {exact}" in reply.detail
            # a header within the limit, then more data than it declared: refused at the
            # first chunk that goes past it
            good = encode(ONE)
            excess = stub.Upload.future(held_stream(
                [pb.UploadChunk(header=upload_header("dev-a", task, good)),
                 pb.UploadChunk(data=good + b"more")], release),
                metadata=md("dev-a"), timeout=30)
            reply = excess.result(timeout=5)
            assert not reply.accepted and reply.reason == "malformed", reply
        finally:
            release.set()
        for d in DEVICES[:3]:
            assert upload(stub, d, get_task(stub, d) if d != "dev-a" else task, ONE).accepted
        t.join(timeout=20)
        np.testing.assert_allclose(out["state"].params, ONE)


def test_a_configured_upload_limit_only_lowers_the_derived_one(tmp_path):
    exact = len(encode(ONE))
    with running_aggregator(tmp_path, AggregatorSettings(max_update_bytes=100)) as (svc, _):
        assert svc.upload_limit == 100
    with running_aggregator(tmp_path, AggregatorSettings(max_update_bytes=1 << 30)) as (
            svc, _):
        assert svc.upload_limit == exact


# -- evaluation reports -------------------------------------------------------------------------


def test_evaluation_reports_without_an_issued_task_are_refused(tmp_path):
    with running_aggregator(tmp_path, AggregatorSettings()) as (service, stub):
        report = pb.EvaluationResult(device_id="dev-a", round=1, model_version=1,
                                     num_examples=5, metrics={"accuracy": 0.5})
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                stub.ReportEvaluation(report, metadata=md("dev-a"), timeout=5)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "no evaluation task" in info.value.details()
        assert not hasattr(service, "evaluations")  # nothing is kept for it


# -- device claims ------------------------------------------------------------------------------


def test_a_device_claiming_a_huge_example_count_is_capped_at_a_multiple_of_the_median(
        tmp_path):
    # every device declared 10 examples when it said Hello; dev-a then claims 10 million
    caps = {"examples": "10"}
    settings = AggregatorSettings(weight_cap_multiple=4.0)
    with running_aggregator(tmp_path, settings, capabilities=caps) as (service, stub):
        five = np.full(DIM, 5.0, np.float32)
        zero = np.zeros(DIM, np.float32)
        out = _honest_round(service, stub, deltas=[five, zero, zero],
                            examples=[10_000_000, 10, 10])
    cap = 4 * 10  # the independent oracle: min(claim, 4 x median declared size)
    expected = cap * 5.0 / (cap + 10 + 10)
    np.testing.assert_allclose(out["state"].params, np.full(DIM, expected), rtol=1e-6)
    assert out["record"].examples == cap + 20


def test_a_configured_max_weight_caps_every_claim(tmp_path):
    settings = AggregatorSettings(max_weight=15)
    with running_aggregator(tmp_path, settings) as (service, stub):
        five = np.full(DIM, 5.0, np.float32)
        zero = np.zeros(DIM, np.float32)
        out = _honest_round(service, stub, deltas=[five, zero, zero],
                            examples=[10_000_000, 10, 30])
    np.testing.assert_allclose(out["state"].params, np.full(DIM, 15 * 5.0 / (15 + 10 + 15)),
                               rtol=1e-6)


def test_byte_accounting_is_what_the_server_measured_not_what_devices_claim(tmp_path):
    with running_aggregator(tmp_path, AggregatorSettings(chunk_size=64)) as (service, stub):
        t, out = start_round(service)
        claims = {"loss": 0.5, "download_bytes": 9e8, "upload_bytes": 9e8}  # in bounds, false
        served = 0
        for d in DEVICES[:3]:
            task = get_task(stub, d)
            chunks = list(stub.Download(pb.DownloadRequest(version=task.model_version),
                                        metadata=md(d), timeout=5))
            served += sum(len(c.data) for c in chunks)
            assert upload(stub, d, task, ONE, metrics=claims).accepted
        t.join(timeout=20)
    rec = out["record"]
    assert rec.bytes_up == 3 * len(encode(ONE))
    assert rec.bytes_down == served


@pytest.mark.parametrize("metrics, why", [
    ({"loss": 1e300}, "bound"),
    ({f"m{i}": 1.0 for i in range(40)}, "at most"),
    ({"x" * 100: 1.0}, "name"),
])
def test_device_metrics_out_of_bounds_are_refused(tmp_path, metrics, why):
    with running_aggregator(tmp_path, AggregatorSettings()) as (service, stub):
        t, out = start_round(service)
        task = get_task(stub, "dev-a")
        reply = upload(stub, "dev-a", task, ONE, metrics=metrics)
        assert not reply.accepted and reply.reason == "bad_metrics" and why in reply.detail
        for d in DEVICES[:3]:  # nothing changed: dev-a may send a well-formed update
            assert upload(stub, d, task if d == "dev-a" else get_task(stub, d), ONE).accepted
        t.join(timeout=20)
        assert out["record"].train_loss == pytest.approx(0.5)
        # the one device-reported number in the metrics says so in its name
        assert service.metrics.value("shoal_device_reported_train_loss") == 0.5


# -- Hello ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_fields, field", [
    ({"attributes": {"bad name!": "x"}}, "attributes"),
    ({"attributes": {f"a{i}": "x" for i in range(65)}}, "attributes"),
    ({"attributes": {"os": "x" * 300}}, "attributes.os"),
    ({"windows": [pb.Window(start_minute=20_000, end_minute=5)]}, "windows[0]"),
    ({"windows": [pb.Window(start_minute=5, end_minute=5)]}, "windows[0]"),
    ({"capabilities": {"k": "v" * 17_000}}, "capabilities"),
    ({"capabilities": {"examples": "-3"}}, "capabilities.examples"),
    ({"runtime_version": "not a version"}, "runtime_version"),
])
def test_an_invalid_hello_is_invalid_argument_naming_the_field(tmp_path, request_fields,
                                                                field):
    with running_aggregator(tmp_path, AggregatorSettings(), hello=False) as (service, stub):
        with pytest.raises(grpc.RpcError) as info:
            stub.Hello(pb.HelloRequest(device_id="dev-a", **request_fields),
                       metadata=md("dev-a"), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(f"{field}:"), info.value.details()
        # nothing was enrolled, and a valid Hello still works
        assert service.registry.count() == 0
        stub.Hello(pb.HelloRequest(device_id="dev-a"), metadata=md("dev-a"), timeout=5)
        assert service.registry.count() == 1


# -- replays --------------------------------------------------------------------------------------


def test_a_replay_after_its_round_closed_gets_the_original_acceptance(tmp_path):
    # dev-a's round-1 upload is replayed (a retry after a lost reply) while dev-a trains
    # round 2: it is answered with its original acceptance and counted once
    with running_aggregator(tmp_path, AggregatorSettings()) as (service, stub):
        t, out = start_round(service, n_sampled=4, target=4, rounds=2)
        first = {d: get_task(stub, d) for d in DEVICES}
        for d in DEVICES:
            assert upload(stub, d, first[d], ONE).accepted
        wait_for_round(out, 2)
        second = {d: get_task(stub, d) for d in DEVICES}
        assert second["dev-a"].round == first["dev-a"].round + 1
        replay = upload(stub, "dev-a", first["dev-a"], ONE)
        assert replay.accepted, replay
        changed = upload(stub, "dev-a", first["dev-a"], ONE * 2)
        assert not changed.accepted and changed.reason == "duplicate"
        for d in DEVICES:
            assert upload(stub, d, second[d], ONE * 3).accepted
        t.join(timeout=20)
    assert [r.accepted for r in out["records"]] == [4, 4]
    np.testing.assert_allclose(out["state"].params, ONE * 4)


# -- device runtimes ---------------------------------------------------------------------------


def _central_dp(clip: float):
    from shoal.pipeline import Pipeline
    from shoal.privacy import CentralDP, RoundEvent
    from shoal.privacy.stages import BudgetPolicy, CentralDPStage

    stage = CentralDPStage(CentralDP(noise_multiplier=0.5, clip_norm=clip, expected_clients=3),
                           RoundEvent.fixed_size(3, 4, 0.5), BudgetPolicy(0.0, 1e-5),
                           rng_for_step=np.random.default_rng)
    return Pipeline(stages=(stage,))


def test_tasks_that_ask_for_clipping_go_only_to_runtimes_that_clip(tmp_path):
    # dev-a runs shoal-client/2, which does not clip to Task.clip_norm: it is refused the
    # task with the reason, and the round does not wait for it
    with running_aggregator(tmp_path, AggregatorSettings()) as (service, stub):
        stub.Hello(pb.HelloRequest(device_id="dev-a", runtime_version="shoal-client/2"),
                   metadata=md("dev-a"), timeout=5)
        t, out = start_round(service, n_sampled=4, target=3, min_fraction=1.0,
                             deadline_s=30.0, pipeline=_central_dp(2.0))
        for _ in range(2):  # asked again, refused again (and counted once)
            with pytest.raises(grpc.RpcError) as info:
                get_task(stub, "dev-a")
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert info.value.details().startswith("runtime_too_old:")
            assert "shoal-client/3" in info.value.details()
        t0 = time.monotonic()
        for d in DEVICES[1:]:
            task = get_task(stub, d)
            assert task.clip_norm == 2.0
            assert upload(stub, d, task, ONE, num_examples=1).accepted
        t.join(timeout=20)
        assert time.monotonic() - t0 < 20  # committed at its target, not at the deadline
        rec = out["record"]
        assert rec.committed and rec.accepted == 3 and rec.rejected == {"runtime_too_old": 1}


def test_a_restarted_aggregator_knows_the_runtimes_from_its_registry(tmp_path):
    # devices said Hello to an earlier aggregator (shoal-client/3, kept in the registry) and
    # do not say it again: they get clipping tasks; a device never heard of does not
    with running_aggregator(tmp_path, AggregatorSettings(), devices=DEVICES[:3]):
        pass
    with running_aggregator(tmp_path, AggregatorSettings(), hello=False) as (service, stub):
        t, out = start_round(service, n_sampled=4, target=3, pipeline=_central_dp(2.0))
        with pytest.raises(grpc.RpcError) as info:
            get_task(stub, "dev-d")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        for d in DEVICES[:3]:
            assert upload(stub, d, get_task(stub, d), ONE, num_examples=1).accepted
        t.join(timeout=20)
        assert out["record"].committed


# -- the metrics endpoint ------------------------------------------------------------------------


def test_metrics_are_served_without_a_thread_per_connection(tmp_path):
    import urllib.error
    import urllib.request

    from shoal.telemetry import PrometheusObserver

    metrics = PrometheusObserver()
    metrics.call_refused("missing")
    port = metrics.serve_http(0, idle_timeout_s=1.0, max_connections=400)
    try:
        threads = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /metr")  # half a request line, never finished
        # one thread serves them all (a thread per connection would add 301)
        assert threading.active_count() <= threads + 2
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b'shoal_refused_calls_total{reason="missing"} 1.0' in text
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert info.value.code == 404
        t0 = time.monotonic()
        for s in idle + [slow]:  # closed by the server after the idle timeout
            s.settimeout(5.0)
            assert s.recv(1024) == b""
            s.close()
        assert time.monotonic() - t0 < 8.0
    finally:
        metrics.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_oversized_small_calls_are_refused_before_they_are_parsed(tmp_path):
    # a 0.2 MB evaluation report (a map of 10,000 metrics) would parse into tens of MB of
    # objects: refused on its size; so is a Hello beyond what the registry could keep (and
    # anything above the largest message, by gRPC, from its length)
    with running_aggregator(tmp_path, AggregatorSettings()) as (service, stub):
        for entries, code in ((10_000, grpc.StatusCode.INVALID_ARGUMENT),
                              (150_000, grpc.StatusCode.RESOURCE_EXHAUSTED)):
            report = pb.EvaluationResult(device_id="dev-a", round=1, model_version=1,
                                         metrics={f"m{i:07d}": 1.0 for i in range(entries)})
            with pytest.raises(grpc.RpcError) as info:
                stub.ReportEvaluation(report, metadata=md("dev-a"), timeout=10)
            assert info.value.code() == code
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert "ReportEvaluation request of" in info.value.details()
        hello = pb.HelloRequest(device_id="dev-a",
                                capabilities={f"k{i}": "v" * 100 for i in range(1000)})
        with pytest.raises(grpc.RpcError) as info:
            stub.Hello(hello, metadata=md("dev-a"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "larger than the 65536 bytes" in info.value.details()
        # a check-in is a few bytes; an honest one goes through
        assert stub.CheckIn(pb.CheckInRequest(device_id="dev-a"), metadata=md("dev-a"),
                            timeout=5).WhichOneof("reply") == "come_back"


def test_a_message_above_the_chunk_limit_is_refused_before_it_is_buffered(tmp_path):
    # gRPC reads a message's length first: a 3 MiB chunk is refused from it, so its bytes
    # are never held (a 1 MiB chunk, the runtime's largest, is read)
    from shoal.transport.channel import MAX_CHUNK_BYTES
    from shoal.transport.listener import MAX_RECEIVE_BYTES

    assert MAX_CHUNK_BYTES < MAX_RECEIVE_BYTES < MAX_CHUNK_BYTES + (128 << 10)
    with running_aggregator(tmp_path, AggregatorSettings()) as (service, stub):
        task = pb.Task(round=1, model_version=0, upload_key="k")
        header = pb.UploadChunk(header=upload_header("dev-a", task, encode(ONE)))
        with pytest.raises(grpc.RpcError) as info:
            stub.Upload(iter([header, pb.UploadChunk(data=b"\0" * (3 << 20))]),
                        metadata=md("dev-a"), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # read in full, then refused for what it is: more than the header declared
        reply = stub.Upload(iter([header, pb.UploadChunk(data=b"\0" * MAX_CHUNK_BYTES)]),
                            metadata=md("dev-a"), timeout=10)
        assert (reply.accepted, reply.reason) == (False, "malformed")
