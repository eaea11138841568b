"""The device client runtime against a small fake aggregator on real loopback gRPC.

The fake server implements just enough of ``AggregatorServicer`` (scripted check-in replies, a
chunked model download, a recording upload, injectable failures); every expectation is computed
independently here (the payload bytes, the backoff bounds, the simulator's own updates).
"""

from __future__ import annotations

import functools

import datetime as dt
import hashlib
import random
import threading
from concurrent import futures

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
from shoal.codec import Chain, from_bytes, to_bytes  # noqa: E402
from shoal.errors import ConfigError  # noqa: E402
from shoal.transport.channel import backoff_delay  # noqa: E402
from shoal.transport.client import RUNTIME_VERSION, DeviceClient  # noqa: E402
from shoal.transport.device_api import (  # noqa: E402
    ClientStats,
    CredentialsRejected,
    TrainResult,
    TransportError,
)
from shoal.transport.proto import shoal_pb2 as pb  # noqa: E402
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc  # noqa: E402
from shoal.transport.reference import fmnist_evaluate_fn, fmnist_train_fn  # noqa: E402

D = 1000
TOKEN = "kid.claims.tag"
NOW = 1_000_000.0
MODEL = np.linspace(-1.0, 1.0, D, dtype=np.float32)
PAYLOAD = to_bytes(Chain([]).encode(MODEL, np.random.default_rng(0)))
OTHER_PAYLOAD = to_bytes(Chain([]).encode(MODEL + 1, np.random.default_rng(0)))
DELTA = np.arange(D, dtype=np.float32) / 7.0
SERVE_CHUNK = 1024  # ~4 KB payload -> 4 chunks


def _task(round_=3, version=7, kind="train", settings=None):
    return pb.CheckInReply(task=pb.Task(round=round_, model_version=version, upload_key="uk-1",
                                        deadline=NOW + 600, settings=settings or {"lr": 0.1},
                                        kind=kind))


class FakeAggregator(pb_grpc.AggregatorServicer):
    """Scripted replies, recorded requests, injected failures (per-method counters)."""

    def __init__(self, replies, *, fail=None, bad=(), fail_code=None, upload_replies=(),
                 abort=None, fail_with=grpc.StatusCode.UNAVAILABLE):
        self.replies = list(replies)
        self.abort = dict(abort or {})         # method -> status code it always answers
        self.fail = dict(fail or {})           # method -> remaining `fail_with` answers
        self.fail_with = fail_with             # a status code, or "crash" (an exception)
        self.fail_code = fail_code             # abort every call with this code
        self.bad = list(bad)                   # how the next downloads are spoiled
        self.upload_replies = list(upload_replies)
        self.lock = threading.Lock()
        self.hellos, self.check_ins, self.downloads = [], [], []
        self.uploads, self.upload_attempts, self.evaluations, self.tokens = [], [], [], []
        self.heartbeats: list = []

    def _enter(self, method, context):
        with self.lock:
            self.tokens.append(dict(context.invocation_metadata()).get("authorization"))
            if self.fail_code is not None:
                context.abort(self.fail_code, "token expired")
            if method in self.abort:
                context.abort(self.abort[method], f"{method} refused")
            if self.fail.get(method, 0) > 0:
                self.fail[method] -= 1
                if self.fail_with == "crash":  # gRPC answers an uncaught exception UNKNOWN
                    raise RuntimeError("injected server bug")
                context.abort(self.fail_with, "injected outage")

    def Hello(self, request, context):
        self._enter("Hello", context)
        self.hellos.append(request)
        return pb.HelloReply(server_id="fake", model_version=7, server_time=NOW)

    def CheckIn(self, request, context):
        self._enter("CheckIn", context)
        self.check_ins.append(request)
        if not self.replies:
            return pb.CheckInReply(come_back=pb.ComeBack(at=NOW + 60, reason="round_closed"))
        return self.replies.pop(0)

    def Download(self, request, context):
        self.downloads.append(request)  # every attempt, refused ones included
        self._enter("Download", context)
        with self.lock:
            bad = self.bad.pop(0) if self.bad else None
        # "other_model": a well-formed payload (valid codec CRC) that is not the one whose
        # sha256 the first chunk announces -- only the checksum can catch it.
        data = OTHER_PAYLOAD if bad == "other_model" else PAYLOAD
        digest = hashlib.sha256(PAYLOAD).digest()
        chunks = [pb.ModelChunk(version=request.version, total_size=len(data),
                                sha256=digest if off == 0 else b"", offset=off,
                                data=data[off:off + SERVE_CHUNK])
                  for off in range(0, len(data), SERVE_CHUNK)]
        if bad == "swapped":
            chunks[1], chunks[2] = chunks[2], chunks[1]
        elif bad == "truncated":
            chunks.pop()
        elif bad == "overlong":
            chunks.append(pb.ModelChunk(offset=len(data), data=b"x"))
        elif bad == "wrong_version":
            chunks[0].version += 1
        yield from chunks

    def Upload(self, request_iterator, context):
        chunks = list(request_iterator)  # consume first, so a failure follows a full send
        header = chunks[0].header
        self.upload_attempts.append(header.idempotency_key)
        self._enter("Upload", context)
        data = b"".join(c.data for c in chunks[1:])
        self.uploads.append((header, data, [len(c.data) for c in chunks[1:]]))
        if self.upload_replies:
            return self.upload_replies.pop(0)
        return pb.UploadReply(accepted=True)

    def ReportEvaluation(self, request, context):
        self._enter("ReportEvaluation", context)
        self.evaluations.append(request)
        return pb.Ack()

    def Heartbeat(self, request, context):
        self._enter("Heartbeat", context)
        self.heartbeats.append(request)
        return pb.HeartbeatReply(keep_going=True)


@pytest.fixture()
def serve():
    started = []

    def start(servicer, credentials=None):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_AggregatorServicer_to_server(servicer, server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        started.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in started:
        server.stop(grace=None)


class Recorder:
    """A fake sleep: records the waits, never sleeps."""

    def __init__(self):
        self.waits = []

    def __call__(self, seconds):
        self.waits.append(seconds)


class ToyTrain:
    def __init__(self):
        self.calls = []

    def __call__(self, params, settings, round):
        self.calls.append((params.copy(), dict(settings), round, params.flags.writeable))
        return TrainResult(DELTA, 42, {"loss": 0.25})


def _client(target, train, sleep, *, seed=7, **kw):
    kw.setdefault("root_certificates", None)
    return DeviceClient(target, TOKEN, "dev-1", train=train, clock=lambda: NOW, sleep=sleep,
                        rng=random.Random(seed), chunk_size=1500, timeout_s=10,
                        transfer_timeout_s=10, **kw)


def test_round_trip_downloads_trains_and_uploads_exactly(serve):
    agg = FakeAggregator([_task()])
    train, sleep = ToyTrain(), Recorder()
    with _client(serve(agg), train, sleep, attributes={"os": "linux"}, examples=42,
                 windows=[(60, 120)]) as client:
        stats = client.run(max_rounds=1)
    # Hello carried attributes, windows, the declared size and the runtime version
    (hello,) = agg.hellos
    assert hello.device_id == "dev-1" and dict(hello.attributes) == {"os": "linux"}
    assert hello.capabilities["examples"] == "42" and hello.runtime_version == RUNTIME_VERSION
    assert [(w.start_minute, w.end_minute) for w in hello.windows] == [(60, 120)]
    assert agg.check_ins[0].held_version == 0
    # trained once on exactly the served model, read-only, with the task's settings and round
    ((params, settings, round_, writeable),) = train.calls
    np.testing.assert_array_equal(params, MODEL)
    assert settings == {"lr": 0.1} and round_ == 3 and not writeable
    # the server got exactly the delta, in chunks of chunk_size, with the header filled in
    ((header, data, sizes),) = agg.uploads
    np.testing.assert_array_equal(from_bytes(data, max_elements=D), DELTA)
    assert sizes == [1500] * (len(data) // 1500) + [len(data) % 1500]
    assert (header.device_id, header.round, header.base_version, header.upload_key) == \
        ("dev-1", 3, 7, "uk-1")
    assert header.num_examples == 42 and dict(header.metrics) == {"loss": 0.25}
    assert header.total_size == len(data) and header.sha256 == hashlib.sha256(data).digest()
    assert len(header.idempotency_key) == 32
    assert set(agg.tokens) == {f"Bearer {TOKEN}"}
    assert stats == ClientStats(rounds_trained=1, uploads_accepted=1, rejections={},
                                reconnects=0, bytes_up=len(data), bytes_down=len(PAYLOAD),
                                check_ins=1, downloads=1)
    assert sleep.waits == []


def test_a_task_that_asks_for_heartbeats_gets_them_while_the_device_trains(serve):
    """Task.heartbeat_s: the runtime calls Heartbeat that often from the task's start to its
    upload (a training that takes 0.5 s, beats every 0.1 s), then stops; a task that does
    not ask gets none."""
    import time

    agg = FakeAggregator([_task(), _task(round_=4)])
    agg.replies[0].task.heartbeat_s = 0.1

    def slow(params, settings, round):
        if round == 3:
            time.sleep(0.5)
        return TrainResult(DELTA, 42, {"loss": 0.25})

    with _client(serve(agg), slow, Recorder()) as client:
        stats = client.run(max_rounds=2)
    beats = [(h.device_id, h.round) for h in agg.heartbeats]
    # ~4 due in 0.5 s (fewer if the machine starves the thread), none for round 4
    assert 2 <= len(beats) <= 8 and set(beats) == {("dev-1", 3)}
    assert stats.heartbeats == len(beats) and stats.uploads_accepted == 2
    assert set(agg.tokens) == {f"Bearer {TOKEN}"}  # authenticated like every call


def test_same_version_is_not_downloaded_twice(serve):
    agg = FakeAggregator([_task(round_=3), _task(round_=4)])
    with _client(serve(agg), ToyTrain(), Recorder()) as client:
        stats = client.run(max_rounds=2)
    assert len(agg.downloads) == 1 and stats.cache_hits == 1
    assert [c.held_version for c in agg.check_ins] == [0, 7]
    assert [h.round for h, _, _ in agg.uploads] == [3, 4]


def test_corrupted_download_is_refused_and_retried(serve):
    assert len(OTHER_PAYLOAD) == len(PAYLOAD)
    agg = FakeAggregator([_task()], bad=["other_model"])
    train, sleep = ToyTrain(), Recorder()
    with _client(serve(agg), train, sleep) as client:
        stats = client.run(max_rounds=1)
    assert len(agg.downloads) == 2 and stats.download_errors == 1 and stats.downloads == 1
    assert len(train.calls) == 1  # only on the good copy
    np.testing.assert_array_equal(train.calls[0][0], MODEL)
    assert len(sleep.waits) == 1 and 0 <= sleep.waits[0] <= 0.5
    assert stats.bytes_down == 2 * len(PAYLOAD)


@pytest.mark.parametrize("bad", ["other_model", "swapped", "truncated", "overlong",
                                 "wrong_version"])
def test_spoiled_download_is_never_trained_on(serve, bad):
    agg = FakeAggregator([_task()], bad=[bad] * 3)
    train = ToyTrain()
    with _client(serve(agg), train, Recorder(), max_download_attempts=3) as client:
        stats = client.run(max_rounds=1)
    assert train.calls == [] and agg.uploads == [] and client.held_version == 0
    assert stats.download_errors == 3 and stats.tasks_abandoned == 1 and len(agg.downloads) == 3


def test_model_above_max_model_bytes_is_refused_before_allocation(serve):
    agg = FakeAggregator([_task()])
    train = ToyTrain()
    with _client(serve(agg), train, Recorder(), max_model_bytes=len(PAYLOAD) - 1,
                 max_download_attempts=1) as client:
        stats = client.run(max_rounds=1)
    assert train.calls == [] and stats.download_errors == 1 and stats.tasks_abandoned == 1
    # refused at the first chunk: the rest of the stream was cancelled, not read
    assert stats.bytes_down <= SERVE_CHUNK


def test_unavailable_twice_then_backoff_and_same_idempotency_key(serve):
    agg = FakeAggregator([_task()], fail={"Upload": 2})
    sleep = Recorder()
    with _client(serve(agg), ToyTrain(), sleep, seed=11) as client:
        stats = client.run(max_rounds=1)
    assert stats.reconnects == 2 and stats.uploads_accepted == 1
    keys = agg.upload_attempts
    assert len(keys) == 3 and len(set(keys)) == 1  # the retries reuse the key
    assert len(agg.uploads) == 1
    # full jitter: the n-th wait is uniform on [0, 0.5 * 2**n]; same draws as Random(11)
    ref = random.Random(11)
    expected = [ref.uniform(0, 0.5), ref.uniform(0, 1.0)]
    assert sleep.waits == pytest.approx(expected)
    assert 0 <= sleep.waits[0] <= 0.5 and 0 <= sleep.waits[1] <= 1.0


@pytest.mark.parametrize("fault", [grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                                   grpc.StatusCode.UNAVAILABLE,
                                   grpc.StatusCode.RESOURCE_EXHAUSTED, "crash"])
def test_transient_server_faults_are_retried_with_backoff_not_fatal(serve, fault):
    # what a busy, restarting or buggy aggregator answers: the device keeps going (a check-in
    # outside any task, and an upload within one), waiting full-jitter backoffs in between
    agg = FakeAggregator([_task()], fail={"CheckIn": 2, "Upload": 1}, fail_with=fault)
    sleep = Recorder()
    with _client(serve(agg), ToyTrain(), sleep, seed=13) as client:
        stats = client.run(max_rounds=1)
    assert stats.reconnects == 3 and stats.uploads_accepted == 1 and len(agg.uploads) == 1
    assert len(set(agg.upload_attempts)) == 1  # the retried upload kept its key
    ref = random.Random(13)
    assert sleep.waits == pytest.approx([ref.uniform(0, 0.5), ref.uniform(0, 1.0),
                                         ref.uniform(0, 0.5)])


def test_rejection_is_counted_not_retried_but_empty_reason_is_retried(serve):
    agg = FakeAggregator([_task(round_=3), _task(round_=4)], upload_replies=[
        pb.UploadReply(accepted=False, reason="late", detail="deadline passed"),
        pb.UploadReply(accepted=False, reason="", detail="store unavailable"),
        pb.UploadReply(accepted=True)])
    sleep = Recorder()
    with _client(serve(agg), ToyTrain(), sleep) as client:
        stats = client.run(max_rounds=2)
    rounds = [h.round for h, _, _ in agg.uploads]
    keys = [h.idempotency_key for h, _, _ in agg.uploads]
    assert rounds == [3, 4, 4]  # the "late" one was sent once, the reasonless one twice
    assert keys[1] == keys[2] != keys[0]
    assert stats.rejections == {"late": 1} and stats.uploads_accepted == 1
    assert stats.rounds_trained == 2 and stats.reconnects == 1 and len(sleep.waits) == 1


def test_vanished_version_abandons_the_task_and_checks_in_again(serve):
    agg = FakeAggregator([_task(), _task(round_=4)], abort={"Download": grpc.StatusCode.NOT_FOUND})
    sleep = Recorder()
    with _client(serve(agg), ToyTrain(), sleep) as client:
        stats = client.run(max_rounds=2)
    assert stats.tasks_abandoned == 2 and stats.check_ins == 2 and agg.uploads == []
    assert len(agg.downloads) == 2 and sleep.waits == []  # NOT_FOUND is not retried


def test_non_finite_update_is_never_uploaded(serve):
    agg = FakeAggregator([_task()])

    def diverged(params, settings, round):
        return TrainResult(np.full(D, np.nan, dtype=np.float32), 10, {})

    with _client(serve(agg), diverged, Recorder()) as client:
        stats = client.run(max_rounds=1)
    assert agg.uploads == [] and stats.tasks_abandoned == 1 and stats.rounds_trained == 0


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match=r"client\.chunk_size must be in \[1, ") as info:
        DeviceClient("127.0.0.1:1", TOKEN, "d", root_certificates=None, train=ToyTrain(),
                     chunk_size=0)
    assert info.value.key == "client.chunk_size"


def test_backoff_resets_after_success(serve):
    agg = FakeAggregator([_task()], fail={"CheckIn": 1, "Upload": 1})
    sleep = Recorder()
    with _client(serve(agg), ToyTrain(), sleep, seed=3) as client:
        client.run(max_rounds=1)
    ref = random.Random(3)
    assert sleep.waits == pytest.approx([ref.uniform(0, 0.5), ref.uniform(0, 0.5)])


def test_backoff_delay_grows_exponentially_and_is_capped():
    rng = random.Random(0)
    draws = np.array([[backoff_delay(n, rng, cap_s=30.0) for n in range(10)]
                      for _ in range(400)])
    bounds = np.minimum(30.0, 0.5 * 2.0 ** np.arange(10))
    assert (draws >= 0).all() and (draws <= bounds).all()
    # mean of uniform(0, b) is b/2: the growth is exponential until the cap
    np.testing.assert_allclose(draws.mean(0), bounds / 2, rtol=0.15)


def test_unreachable_server_retries_then_gives_up():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleep = Recorder()
    with _client(f"127.0.0.1:{port}", ToyTrain(), sleep, max_retries=3, seed=5) as client:
        with pytest.raises(TransportError, match="Hello still failing after 3 retries"):
            client.run(max_rounds=1)
        assert client.stats.reconnects == 3
    ref = random.Random(5)
    assert sleep.waits == pytest.approx([ref.uniform(0, b) for b in (0.5, 1.0, 2.0)])


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.PERMISSION_DENIED])
def test_refused_credentials_raise_at_once(serve, code):
    agg = FakeAggregator([_task()], fail_code=code)
    sleep = Recorder()
    with _client(serve(agg), ToyTrain(), sleep) as client:
        with pytest.raises(CredentialsRejected, match="retrying will not help") as info:
            client.run(max_rounds=1)
    assert info.value.code == code.name and info.value.device_id == "dev-1"
    assert "token expired" in str(info.value) and TOKEN not in str(info.value)
    assert sleep.waits == [] and len(agg.tokens) == 1  # no retry


def test_come_back_waits_until_at(serve):
    agg = FakeAggregator([pb.CheckInReply(come_back=pb.ComeBack(at=NOW + 123.5,
                                                                reason="not_selected")),
                          _task()])
    sleep = Recorder()
    with _client(serve(agg), ToyTrain(), sleep) as client:
        stats = client.run(max_rounds=1)
    assert sleep.waits == [pytest.approx(123.5)]
    assert stats.come_backs == 1 and stats.check_ins == 2 and stats.uploads_accepted == 1


def test_an_upload_reply_that_says_when_to_come_back_is_waited_for(serve):
    # pace steering in the upload's reply: the device waits as told instead of checking in
    # right away; after its last task it does not wait at all
    steered = pb.UploadReply(accepted=True, come_back=pb.ComeBack(at=NOW + 42.0,
                                                                  reason="already_reported"))
    agg = FakeAggregator([_task(round_=3), _task(round_=4)],
                         upload_replies=[steered, steered])
    sleep = Recorder()
    with _client(serve(agg), ToyTrain(), sleep) as client:
        stats = client.run(max_rounds=2)
    assert sleep.waits == [pytest.approx(42.0)]
    assert stats.check_ins == 2 and stats.come_backs == 0 and stats.uploads_accepted == 2


def test_an_upload_reply_without_a_come_back_means_check_in_at_once(serve):
    # an aggregator that does not steer (or an older one): the next check-in follows at once
    agg = FakeAggregator([_task(round_=3), _task(round_=4)])
    sleep = Recorder()
    with _client(serve(agg), ToyTrain(), sleep) as client:
        stats = client.run(max_rounds=2)
    assert sleep.waits == [] and stats.check_ins == 2 and stats.uploads_accepted == 2


def test_come_back_is_capped_and_corrected_for_clock_skew(serve):
    agg = FakeAggregator([pb.CheckInReply(come_back=pb.ComeBack(at=NOW + 10_000)),
                          pb.CheckInReply(come_back=pb.ComeBack(at=NOW + 50)), _task()])
    sleep = Recorder()
    # the device's clock is 20 s ahead of the server's: it must wait 50 s, not 30 s
    client = DeviceClient(serve(agg), TOKEN, "dev-1", root_certificates=None, train=ToyTrain(),
                          clock=lambda: NOW + 20, sleep=sleep, max_wait_s=300)
    with client:
        client.run(max_rounds=1)
    assert sleep.waits == [pytest.approx(300), pytest.approx(50)]


def test_stop_event_ends_a_come_back_wait(serve):
    agg = FakeAggregator([])  # always "come back in 60 s"
    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    client = DeviceClient(serve(agg), TOKEN, "dev-1", root_certificates=None, train=ToyTrain(),
                          clock=lambda: NOW)  # real, interruptible waits
    timer.start()
    with client:
        stats = client.run(stop=stop)
    assert stats.come_backs == 1 and stats.rounds_trained == 0


def test_evaluate_task_reports_evaluation(serve):
    agg = FakeAggregator([_task(round_=5, kind="evaluate")])
    seen = []

    def evaluate(params):
        seen.append(params.copy())
        return 17, {"accuracy": 0.5}

    train = ToyTrain()
    with _client(serve(agg), train, Recorder(), evaluate=evaluate) as client:
        stats = client.run(max_rounds=1)
    np.testing.assert_array_equal(seen[0], MODEL)
    (ev,) = agg.evaluations
    assert (ev.device_id, ev.round, ev.model_version, ev.num_examples) == ("dev-1", 5, 7, 17)
    assert dict(ev.metrics) == {"accuracy": 0.5}
    assert train.calls == [] and agg.uploads == [] and stats.evaluations == 1
    assert agg.hellos[0].capabilities["tasks"] == "train,evaluate"


def test_tls_round_trip(serve, tmp_path):
    from shoal.transport.certs import make_local_pki

    pki = make_local_pki(tmp_path / "pki", now=dt.datetime.now(dt.timezone.utc))
    creds = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())])
    agg = FakeAggregator([_task()])
    target = serve(agg, creds)
    with _client(target, ToyTrain(), Recorder(),
                 root_certificates=pki.ca_cert.read_bytes()) as client:
        stats = client.run(max_rounds=1)
    assert stats.uploads_accepted == 1
    np.testing.assert_array_equal(from_bytes(agg.uploads[0][1], max_elements=D), DELTA)
    # a client that trusts another CA never gets through (no retry can fix it either)
    other = make_local_pki(tmp_path / "other", now=dt.datetime.now(dt.timezone.utc))
    with _client(target, ToyTrain(), Recorder(), max_retries=1,
                 root_certificates=other.ca_cert.read_bytes()) as client:
        with pytest.raises(TransportError):
            client.run(max_rounds=1)
    assert len(agg.hellos) == 1


@pytest.mark.parametrize("engine", ["sequential", "fused"])
def test_fmnist_train_fn_matches_the_simulator(tiny_task, engine):
    """A device trains exactly like the in-process pool trains that client in that round
    (bit for bit against the sequential engine, to float rounding against the fused one)."""
    import torch

    from shoal.events import TrainTask
    from shoal.models import build_model
    from shoal.sim.cohort import CohortTrainer
    from shoal.sim.pool import InProcessPool
    from shoal.training import LocalTrainConfig

    data, seed, round_, client = tiny_task, 5, 4, 3
    local = LocalTrainConfig(batch_size=16, lr=0.1)
    trainer = CohortTrainer(build_model("logreg", 20, 4, seed), torch.from_numpy(data.train.x),
                            torch.from_numpy(data.train.y), engine=engine)
    pool = InProcessPool(trainer, data.client_indices, local, seed=seed)
    params = np.random.default_rng(1).normal(size=trainer.spec.size).astype(np.float32)
    (batch,) = pool.train(TrainTask(1, round_ - 1, params, round_, {"mu": 0.1, "epochs": 2}),
                          np.array([client]))
    idx = data.client_indices[client]
    x, y = data.train.x[idx], data.train.y[idx]
    params.setflags(write=False)
    wire = {"mu": 0.1, "epochs": 2.0}  # settings arrive as doubles
    res = fmnist_train_fn("logreg", x, y, local, seed, client, num_classes=4)(
        params, wire, round_)
    tol = 0 if engine == "sequential" else 1e-5
    np.testing.assert_allclose(res.delta, batch.deltas[0], rtol=0, atol=tol)
    assert res.num_examples == len(idx) == int(batch.num_examples[0])
    # another client's stream (another batch order) gives a clearly different update
    other = fmnist_train_fn("logreg", x, y, local, seed, client + 1, num_classes=4)(
        params, wire, round_)
    assert np.abs(other.delta - batch.deltas[0]).max() > 100 * max(tol, 1e-7)


def test_fmnist_evaluate_fn_is_accuracy_of_the_linear_model(tiny_task):
    data = tiny_task
    params = np.random.default_rng(2).normal(size=84).astype(np.float32)
    n, metrics = fmnist_evaluate_fn("logreg", data.test.x, data.test.y, num_classes=4)(params)
    logits = data.test.x @ params[:80].reshape(4, 20).T + params[80:]  # Linear(20, 4)
    assert n == len(data.test.y)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(1) == data.test.y).mean()))


def test_three_devices_complete_a_round_on_the_real_aggregator(tmp_path):
    """Interoperability with shoal's own server: a coordinator round over gRPC commits the
    example-weighted mean of what three DeviceClients uploaded."""
    import time

    from shoal.runner import run_round
    from shoal.sampling import UniformSampler
    from shoal.registry import SQLiteRegistry
    from shoal.strategy import FedAvg
    from shoal.transport.auth import Keyring
    from shoal.transport.tokens import issue_token
    from shoal.policy import SyncPolicy
    from shoal.transport.carrier import GrpcCarrier
    from shoal.transport.server import AggregatorService, AggregatorSettings, serve

    dim, secret, devices = 50, b"s" * 32, ["dev-a", "dev-b", "dev-c"]
    service = AggregatorService(AggregatorSettings(chunk_size=64), Keyring.single(secret), dim,
                                "fp", lambda: SQLiteRegistry(tmp_path / "registry.db"))
    port, stop_server = serve(service)
    coord = functools.partial(run_round, FedAvg(), GrpcCarrier(service, devices, poll_s=0.02),
                              UniformSampler(3), seed=0,
                              policy=SyncPolicy(target=3, deadline_s=20.0, max_attempts=1))
    out: dict = {}
    rounds = threading.Thread(target=lambda: out.update(
        zip(("state", "record"), coord(FedAvg().init(np.zeros(dim, np.float32))))))
    stats: dict = {}

    def device(i, name):
        def train(params, settings, round):
            return TrainResult(np.full(dim, float(i + 1), np.float32), 10 * (i + 1), {})
        client = DeviceClient(f"127.0.0.1:{port}", issue_token(secret, name, now=time.time(),
                                                               ttl_seconds=600),
                              name, root_certificates=None, train=train, chunk_size=100,
                              min_wait_s=0.02, timeout_s=10, transfer_timeout_s=10)
        with client:
            stats[name] = client.run(max_rounds=1)

    threads = [threading.Thread(target=device, args=(i, d)) for i, d in enumerate(devices)]
    try:
        rounds.start()
        for t in threads:
            t.start()
        for t in [*threads, rounds]:
            t.join(timeout=20)
    finally:
        stop_server()
    assert out["record"].committed and out["record"].accepted == 3
    w = np.array([10.0, 20.0, 30.0])
    np.testing.assert_allclose(out["state"].params, np.full(dim, w @ [1, 2, 3] / w.sum()),
                               rtol=1e-6)
    assert all(s.uploads_accepted == 1 and s.rejections == {} for s in stats.values())
