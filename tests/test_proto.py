"""The device protocol's messages, answered by the real aggregator on a loopback gRPC server.

Every reply here comes from :class:`~shoal.transport.server.AggregatorService` in front of the
real coordinator (a :class:`~shoal.transport.carrier.GrpcCarrier` serving one synchronous
round), so the test checks what the messages mean to a device: a check-in is answered by a task or by "come back at T" with its reason; a model larger
than one gRPC message (4 MB) arrives in capped, checksummed chunks that reassemble to the
model; an update streamed in chunks reaches the round only when it matches its declared
SHA-256.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from shoal.codec import Chain, from_bytes, to_bytes  # noqa: E402
from shoal.errors import CodecError, ConfigError  # noqa: E402
from shoal.policy import SyncPolicy  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.transport.auth import Keyring  # noqa: E402
from shoal.transport.tokens import issue_token  # noqa: E402
from shoal.transport.proto import shoal_pb2 as pb  # noqa: E402
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc  # noqa: E402
from shoal.runner import run_round  # noqa: E402
from shoal.strategy import FedProx, ServerState  # noqa: E402
from shoal.transport.carrier import GrpcCarrier  # noqa: E402
from shoal.transport.channel import MAX_CHUNK_BYTES  # noqa: E402
from shoal.transport.server import AggregatorService, AggregatorSettings, serve  # noqa: E402

DIM = 1_600_000  # 6.4 MB of float32: more than gRPC carries in one message (4 MB)
CHUNK = 1 << 20
SECRET = b"p" * 32
PARAMS = np.linspace(-1.0, 1.0, DIM, dtype=np.float32)
SETTINGS = AggregatorSettings(chunk_size=CHUNK, max_update_bytes=8 << 20, idle_retry_s=2.0,
                              checkin_interval_s=5.0)
DEADLINE_S = 30.0
ROUND = 3  # trains model version ROUND - 1


def md(device: str):
    token = issue_token(SECRET, device, now=time.time(), ttl_seconds=3600)
    return (("authorization", f"Bearer {token}"),)


def encode(vector: np.ndarray) -> bytes:
    return to_bytes(Chain([]).encode(vector, np.random.default_rng(0)))


@pytest.fixture()
def server(tmp_path):
    service = AggregatorService(SETTINGS, Keyring.single(SECRET), DIM, "spec-fp",
                                lambda: SQLiteRegistry(tmp_path / "registry.db"))
    port, stop = serve(service)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield service, pb_grpc.AggregatorStub(channel)
    channel.close()
    stop()


class FirstDevice:
    """Always samples client 0 (dev-a, the first device in sorted order)."""

    def sample(self, num_clients, rng, count=None):
        return np.array([0], dtype=np.int64)


@pytest.fixture()
def open_round(server):
    """Round ``ROUND`` (training model version ``ROUND - 1`` = ``PARAMS``) open for dev-a
    alone: the coordinator's sync policy (target 1, deadline) served to the devices by the
    gRPC carrier in a thread, as ``shoal serve`` does (dev-b is enrolled, not selected).
    Yields ``(result, stub)``; ``result`` holds the round's state and record once it ends."""
    service, stub = server
    carrier = GrpcCarrier(service, ["dev-a", "dev-b"], poll_s=0.05)
    policy = SyncPolicy(target=1, deadline_s=DEADLINE_S, min_fraction=1.0, max_attempts=1)
    state = ServerState(PARAMS, version=ROUND - 1)
    result: dict = {}

    def serve_round():
        result["state"], result["record"] = run_round(FedProx(mu=0.05), carrier,
                                                      FirstDevice(), state, seed=0,
                                                      policy=policy)

    thread = threading.Thread(target=serve_round, daemon=True)
    thread.start()
    end = time.time() + 10
    while carrier.gateway.latest_version is None and time.time() < end:
        time.sleep(0.01)
    assert carrier.gateway.latest_version == ROUND - 1
    result["thread"] = thread
    yield result, stub
    with carrier.gateway.changed:  # end a round the test left open
        if not carrier.gateway.finished:
            carrier.gateway._finish("test over")
    thread.join(timeout=10)


def test_a_port_in_use_is_a_config_error_naming_it(tmp_path):
    service = AggregatorService(SETTINGS, Keyring.single(SECRET), DIM, "spec-fp",
                                lambda: SQLiteRegistry(tmp_path / "registry.db"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}") as info:
            serve(service, port=port)
    assert info.value.key == "deploy.port"


def test_hello_and_check_in_before_any_round(server):
    service, stub = server
    before = time.time()
    hello = stub.Hello(pb.HelloRequest(device_id="dev-a", attributes={"os": "test"}),
                       metadata=md("dev-a"), timeout=5)
    assert hello.server_id == "shoal" and hello.model_version == 0
    assert before - 1 <= hello.server_time <= time.time() + 1
    reply = stub.CheckIn(pb.CheckInRequest(device_id="dev-a"), metadata=md("dev-a"), timeout=5)
    assert reply.WhichOneof("reply") == "come_back"
    assert reply.come_back.reason == "no_round"
    assert before <= reply.come_back.at <= time.time() + SETTINGS.idle_retry_s


def test_check_in_answers_a_task_or_when_to_come_back(open_round):
    _, stub = open_round
    before = time.time()
    reply = stub.CheckIn(pb.CheckInRequest(device_id="dev-a"), metadata=md("dev-a"), timeout=5)
    assert reply.WhichOneof("reply") == "task"
    task = reply.task
    assert (task.round, task.model_version, task.kind) == (ROUND, ROUND - 1, "train")
    assert dict(task.settings) == {"mu": 0.05} and task.spec_fingerprint == "spec-fp"
    assert len(bytes.fromhex(task.upload_key)) == 16
    assert before < task.deadline <= time.time() + DEADLINE_S
    # a lost reply costs nothing: asking again returns the same task
    again = stub.CheckIn(pb.CheckInRequest(device_id="dev-a"), metadata=md("dev-a"), timeout=5)
    assert again.task.upload_key == task.upload_key
    # a device the round does not need comes back within [0.5, 1.5] x checkin_interval_s
    other = stub.CheckIn(pb.CheckInRequest(device_id="dev-b"), metadata=md("dev-b"), timeout=5)
    assert other.WhichOneof("reply") == "come_back"
    assert other.come_back.reason == "not_selected"
    interval = SETTINGS.checkin_interval_s
    assert before + 0.5 * interval <= other.come_back.at <= time.time() + 1.5 * interval
    # the heartbeat tells a device whether its round is still worth finishing
    beat = stub.Heartbeat(pb.HeartbeatRequest(device_id="dev-a", round=ROUND),
                          metadata=md("dev-a"), timeout=5)
    assert beat.keep_going
    past = stub.Heartbeat(pb.HeartbeatRequest(device_id="dev-a", round=ROUND - 1),
                          metadata=md("dev-a"), timeout=5)
    assert not past.keep_going


def test_a_model_larger_than_one_message_streams_in_capped_checksummed_chunks(open_round):
    _, stub = open_round
    request = pb.DownloadRequest(version=ROUND - 1, chunk_size=16 * CHUNK)
    chunks = list(stub.Download(request, metadata=md("dev-a"), timeout=10))
    blob = b"".join(c.data for c in chunks)
    assert len(blob) > 4 << 20
    assert all(len(c.data) == CHUNK for c in chunks[:-1]) and len(chunks[-1].data) <= CHUNK
    assert [c.offset for c in chunks] == [i * CHUNK for i in range(len(chunks))]
    assert {(c.version, c.total_size) for c in chunks} == {(ROUND - 1, len(blob))}
    assert chunks[0].sha256 == hashlib.sha256(blob).digest()
    assert all(c.sha256 == b"" for c in chunks[1:])
    np.testing.assert_array_equal(from_bytes(blob, max_elements=DIM), PARAMS)
    # a device may ask for smaller chunks than the server's cap
    small = list(stub.Download(pb.DownloadRequest(version=ROUND - 1, chunk_size=CHUNK // 2),
                               metadata=md("dev-a"), timeout=10))
    assert len(small) == -(-len(blob) // (CHUNK // 2))
    assert b"".join(c.data for c in small) == blob
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Download(pb.DownloadRequest(version=ROUND), metadata=md("dev-a"), timeout=5))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_update_streamed_in_chunks_reaches_the_round_only_if_its_bytes_are_intact(
        open_round):
    result, stub = open_round
    task = stub.CheckIn(pb.CheckInRequest(device_id="dev-a"), metadata=md("dev-a"),
                        timeout=5).task
    delta = np.full(DIM, 0.25, np.float32)
    blob = encode(delta)

    def upload(sha256: bytes, header_first: bool = True, payload: bytes = blob):
        header = pb.UploadHeader(device_id="dev-a", round=task.round,
                                 base_version=task.model_version, upload_key=task.upload_key,
                                 idempotency_key="once", num_examples=10,
                                 metrics={"loss": 0.5}, total_size=len(payload), sha256=sha256)
        parts = [pb.UploadChunk(data=payload[off:off + MAX_CHUNK_BYTES])
                 for off in range(0, len(payload), MAX_CHUNK_BYTES)]
        parts.insert(0 if header_first else 1, pb.UploadChunk(header=header))
        return stub.Upload(iter(parts), metadata=md("dev-a"), timeout=10)

    # a bit flipped in the last chunk, whatever SHA-256 the header declares: the codec
    # frame's CRC-32 refuses it
    damaged = bytearray(blob)
    damaged[-100] ^= 0x10
    for sha in (hashlib.sha256(blob).digest(), hashlib.sha256(damaged).digest()):
        refused = upload(sha, payload=bytes(damaged))
        assert (refused.accepted, refused.reason) == (False, "malformed")
        assert "checksum" in refused.detail
    headless = upload(hashlib.sha256(blob).digest(), header_first=False)
    assert (headless.accepted, headless.reason) == (False, "malformed")
    assert upload(hashlib.sha256(blob).digest()).accepted
    result["thread"].join(timeout=10)
    state, record = result["state"], result["record"]
    assert (record.accepted, record.examples, record.closed_by) == (1, 10, "target_reached")
    assert record.rejected == {}  # refused on the wire, before the round saw them
    assert record.bytes_up == len(blob)
    assert state.version == ROUND
    np.testing.assert_array_equal(state.params, PARAMS + delta)


@pytest.mark.parametrize("chain", ["", "fp16", "q8", "q2", "sign", "zstd", "topk(0.3)",
                                   "randk(1.0)+q4", "topk(0.01)+q8+zstd", "fp16+zstd"])
def test_the_upload_limit_bounds_every_update_of_the_model_in_its_codec(chain):
    # the oracle is the encoder itself: no update the chain makes, however its values fall
    # (smooth, heavy-tailed, sparse, incompressible), may exceed the limit the server
    # enforces -- and the limit stays within a small multiple of the raw model
    from shoal.transport.downloads import upload_limit

    codec = Chain.parse(chain, key="compression.upload")
    rng = np.random.default_rng(0)
    for dim in (1, 7, 1000, 40_000):
        limit = upload_limit(dim, codec)
        raw = len(encode(np.zeros(dim, np.float32)))
        for x in (rng.standard_normal(dim), rng.standard_cauchy(dim),
                  np.where(rng.random(dim) < 0.01, rng.standard_normal(dim), 0.0),
                  rng.uniform(-1e30, 1e30, dim), np.arange(dim) - dim / 2):
            try:
                size = len(to_bytes(codec.encode(x.astype(np.float32), rng)))
            except CodecError:  # e.g. fp16 cannot carry 1e30: nothing is sent
                continue
            assert size <= limit, (chain, dim, size, limit)
        # raw float32 has one exact size; any other chain at most twice it (a value and an
        # index per coordinate) plus its frame
        assert limit == raw if not chain else limit <= 2.05 * raw + 4096
