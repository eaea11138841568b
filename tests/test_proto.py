"""The device protocol schema over a real gRPC channel on loopback (a smoke test of the
generated modules; the aggregator itself is not built yet)."""

from __future__ import annotations

import hashlib
from concurrent import futures

import pytest

grpc = pytest.importorskip("grpc")
from shoal.transport.proto import shoal_pb2 as pb  # noqa: E402
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc  # noqa: E402

PAYLOAD = bytes(range(256)) * 24_000  # 6 MB: more than gRPC allows in one message (4 MB)


class _Servicer(pb_grpc.AggregatorServicer):
    def CheckIn(self, request, context):
        if request.device_id == "selected":
            return pb.CheckInReply(task=pb.Task(round=3, model_version=7, upload_key="k",
                                                deadline=123.5, settings={"lr": 0.05},
                                                kind="train"))
        return pb.CheckInReply(come_back=pb.ComeBack(at=200.0, reason="not_selected"))

    def Download(self, request, context):
        digest = hashlib.sha256(PAYLOAD).digest()
        size = min(request.chunk_size or 65536, 262144)
        for off in range(0, len(PAYLOAD), size):
            yield pb.ModelChunk(version=request.version, total_size=len(PAYLOAD),
                                sha256=digest if off == 0 else b"", offset=off,
                                data=PAYLOAD[off:off + size])

    def Upload(self, request_iterator, context):
        header, data = None, bytearray()
        for chunk in request_iterator:
            if chunk.WhichOneof("part") == "header":
                header = chunk.header
            else:
                data += chunk.data
        ok = header is not None and hashlib.sha256(data).digest() == header.sha256
        return pb.UploadReply(accepted=ok, reason="" if ok else "checksum")


@pytest.fixture()
def stub():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AggregatorServicer_to_server(_Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.AggregatorStub(channel)
    channel.close()
    server.stop(grace=None)


def test_check_in_reply_is_a_task_or_come_back(stub):
    task = stub.CheckIn(pb.CheckInRequest(device_id="selected"), timeout=5)
    assert task.WhichOneof("reply") == "task" and task.task.settings["lr"] == 0.05
    later = stub.CheckIn(pb.CheckInRequest(device_id="other"), timeout=5)
    assert later.WhichOneof("reply") == "come_back" and later.come_back.reason == "not_selected"


def test_models_and_updates_stream_in_checksummed_chunks(stub):
    chunks = list(stub.Download(pb.DownloadRequest(version=7, chunk_size=1 << 20), timeout=10))
    assert len(chunks) == -(-len(PAYLOAD) // 262144)  # the server caps the chunk size
    blob = b"".join(c.data for c in chunks)
    assert blob == PAYLOAD and hashlib.sha256(blob).digest() == chunks[0].sha256

    def parts(digest):
        yield pb.UploadChunk(header=pb.UploadHeader(device_id="d", round=3, sha256=digest,
                                                    total_size=len(PAYLOAD)))
        for off in range(0, len(PAYLOAD), 262144):
            yield pb.UploadChunk(data=PAYLOAD[off:off + 262144])

    assert stub.Upload(parts(hashlib.sha256(PAYLOAD).digest()), timeout=10).accepted
    bad = stub.Upload(parts(b"\0" * 32), timeout=10)
    assert not bad.accepted and bad.reason == "checksum"
