"""Codecs on the deployed path: a DeviceClient on real loopback gRPC against a servicer that
serves :class:`~shoal.transport.downloads.ModelPublisher` payloads and decodes uploads with
:func:`~shoal.transport.downloads.decode_upload`, checked against the simulator's own uplink
(same chain, same random stream) and against the float32 bytes of the published models."""

from __future__ import annotations

import random
from concurrent import futures

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("zstandard")
from shoal import seeds  # noqa: E402
from shoal.codec import (Chain, Download, decode_download, download_from_bytes,  # noqa: E402
                         download_to_bytes, encode_download, to_bytes)
from shoal.errors import CodecError, ConfigError  # noqa: E402
from shoal.transport.client import DeviceClient  # noqa: E402
from shoal.transport.device_api import TrainResult  # noqa: E402
from shoal.transport.downloads import ModelPayload, ModelPublisher, decode_upload  # noqa: E402
from shoal.transport.proto import shoal_pb2 as pb  # noqa: E402
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc  # noqa: E402
from shoal.uplink import Uplink  # noqa: E402

D, SEED, CID, NOW = 20_000, 3, 17, 1_000_000.0
RNG = np.random.default_rng(0)
V1 = (RNG.normal(size=D) * 0.05).astype(np.float32)
V2 = (V1 + RNG.normal(size=D) * 1e-3).astype(np.float32)  # one dense training step
DELTAS = {3: (RNG.normal(size=D) * 0.01).astype(np.float32),
          4: (RNG.normal(size=D) * 0.01).astype(np.float32)}


def _task(round_, version, codec="", error_feedback=False):
    return pb.CheckInReply(task=pb.Task(round=round_, model_version=version, upload_key="uk",
                                        deadline=NOW + 600, kind="train", upload_codec=codec,
                                        error_feedback=error_feedback))


class PublisherServicer(pb_grpc.AggregatorServicer):
    """Downloads from a ModelPublisher (optionally spoiling the first few), uploads recorded."""

    def __init__(self, publisher, replies, spoil=0):
        self.publisher, self.replies, self.spoil = publisher, list(replies), spoil
        self.requests, self.served, self.uploads = [], [], []

    def Hello(self, request, context):
        return pb.HelloReply(server_id="t", model_version=self.publisher.version or 0,
                             server_time=NOW)

    def CheckIn(self, request, context):
        if not self.replies:
            return pb.CheckInReply(come_back=pb.ComeBack(at=NOW + 60))
        return self.replies.pop(0)

    def Download(self, request, context):
        self.requests.append((request.version, request.base_version))
        payload = self.publisher.payload(request.version, request.base_version)
        self.served.append(payload)
        blob = payload.blob
        if self.spoil:
            self.spoil -= 1
            blob = blob[:-1] + bytes([blob[-1] ^ 1])  # caught by the sha256
        for off in range(0, len(blob), 4096):
            yield pb.ModelChunk(version=payload.version, base_version=payload.base_version,
                                total_size=len(blob),
                                sha256=payload.sha256 if off == 0 else b"", offset=off,
                                data=blob[off:off + 4096])

    def Upload(self, request_iterator, context):
        chunks = list(request_iterator)
        self.uploads.append((chunks[0].header, b"".join(c.data for c in chunks[1:])))
        return pb.UploadReply(accepted=True)


class Train:
    """Returns the round's delta; records the params it was given."""

    def __init__(self):
        self.params = []

    def __call__(self, params, settings, round):
        self.params.append(params.copy())
        return TrainResult(DELTAS[round], 10, {})


@pytest.fixture()
def device():
    servers, clients = [], []

    def start(servicer, train):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_AggregatorServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        client = DeviceClient(f"127.0.0.1:{port}", "kid.claims.tag", "dev-1",
                              root_certificates=None, train=train, clock=lambda: NOW,
                              sleep=lambda s: None, rng=random.Random(0), timeout_s=10,
                              transfer_timeout_s=10,
                              codec_rng=lambda r: seeds.generator(SEED, "uplink", r, CID))
        clients.append(client)
        return client

    yield start
    for c in clients:
        c.close()
    for s in servers:
        s.stop(grace=None)


def _publisher(*versions, **kw):
    pub = ModelPublisher(Chain.parse("zstd"), **kw)
    for v, params in versions:
        pub.publish(v, params)
    return pub


def test_q8_upload_decodes_to_what_the_simulator_decodes(device):
    servicer = PublisherServicer(_publisher((1, V1)), [_task(3, 1, "q8")])
    client = device(servicer, Train())
    client.run(max_rounds=1)
    ((header, data),) = servicer.uploads
    got = decode_upload(data, D, "q8")
    sim, nbytes = Uplink(D, Chain.parse("q8")).process(
        CID, DELTAS[3], seeds.generator(SEED, "uplink", 3, CID))
    np.testing.assert_array_equal(got, sim)
    # about a byte per value plus per-block scales: ~26% of raw float32, not 100%
    assert len(data) == nbytes == header.total_size < 0.3 * 4 * D
    assert not np.array_equal(got, DELTAS[3])  # it really was quantized
    assert client.residual is None


def test_error_feedback_residual_is_carried_across_rounds_as_in_the_simulator(device):
    codec = "topk(0.1)+q8"
    servicer = PublisherServicer(_publisher((1, V1)), [_task(3, 1, codec, True),
                                                       _task(4, 1, codec, True)])
    client = device(servicer, Train())
    sim = Uplink(D, Chain.parse(codec), error_feedback=True)
    for i, round_ in enumerate((3, 4)):
        client.run(max_rounds=1)
        expected, _ = sim.process(CID, DELTAS[round_],
                                  seeds.generator(SEED, "uplink", round_, CID))
        np.testing.assert_array_equal(decode_upload(servicer.uploads[i][1], D, codec), expected)
        np.testing.assert_array_equal(client.residual, sim.residuals[CID])
    # the second upload carried the first round's residual: without it, it would differ
    plain, _ = Uplink(D, Chain.parse(codec)).process(CID, DELTAS[4],
                                                     seeds.generator(SEED, "uplink", 4, CID))
    assert not np.array_equal(decode_upload(servicer.uploads[1][1], D, codec), plain)
    # nothing is lost, only delayed: what was sent plus the residual is what was trained
    sent = sum(decode_upload(d, D, codec).astype(np.float64) for _, d in servicer.uploads)
    np.testing.assert_allclose(sent + client.residual, DELTAS[3] + DELTAS[4].astype(np.float64),
                               atol=1e-5)


def test_delta_download_is_smaller_and_bit_exact(device):
    naive = V1 + (V2 - V1)
    assert naive.tobytes() != V2.tobytes()  # a plain float32 delta would miss some entries
    pub = _publisher((1, V1))
    servicer = PublisherServicer(pub, [_task(3, 1), _task(4, 2)])
    train = Train()
    client = device(servicer, train)
    client.run(max_rounds=1)
    pub.publish(2, V2)
    client.run(max_rounds=1)
    assert servicer.requests == [(1, 0), (2, 1)]  # the device asks with what it holds
    full, delta = servicer.served
    assert (full.base_version, delta.base_version) == (0, 1)
    assert len(delta.blob) < 0.95 * len(pub.payload(2, 0).blob)
    assert train.params[0].tobytes() == V1.tobytes()
    assert train.params[1].tobytes() == V2.tobytes()
    assert client.held_version == 2


def test_refused_delta_is_retried_as_the_full_model(device):
    pub = _publisher((1, V1), (2, V2))
    servicer = PublisherServicer(pub, [_task(3, 1), _task(4, 2)])
    train = Train()
    client = device(servicer, train)
    client.run(max_rounds=1)
    servicer.spoil = 1
    stats = client.run(max_rounds=1)
    assert servicer.requests == [(1, 0), (2, 1), (2, 0)]
    assert stats.download_errors == 1 and train.params[1].tobytes() == V2.tobytes()


def test_wrong_chain_is_refused():
    rng = np.random.default_rng(0)
    raw = to_bytes(Chain([]).encode(DELTAS[3], rng))
    q8 = to_bytes(Chain.parse("q8").encode(DELTAS[3], rng))
    np.testing.assert_array_equal(decode_upload(raw, D, ""), DELTAS[3])
    for blob, announced in ((raw, "q8"), (q8, ""), (q8, "q4"), (q8, "q8+zstd")):
        with pytest.raises(CodecError, match="announced") as info:
            decode_upload(blob, D, announced)
        assert info.value.reason == "wrong_codec"
    with pytest.raises(CodecError, match="max_elements") as info:
        decode_upload(raw, D - 1, "")
    assert info.value.reason == "malformed"


def test_version_no_longer_held_gets_the_full_model():
    pub = _publisher(*((v, V1 + np.float32(v * 1e-3)) for v in range(1, 6)), keep_versions=2)
    assert pub.versions == (3, 4, 5) and pub.version == 5
    old, full, near = pub.payload(5, 1), pub.payload(5, 0), pub.payload(5, 4)
    assert old.base_version == 0 and old.blob == full.blob
    assert near.base_version == 4 and len(near.blob) < len(full.blob)
    assert pub.payload(5, 4) is near  # cached
    held = decode_download(download_from_bytes(near.blob, max_elements=D),
                           (4, V1 + np.float32(4e-3)))
    assert held.tobytes() == (V1 + np.float32(5e-3)).tobytes()
    with pytest.raises(KeyError, match="version 2 is not available"):
        pub.payload(2)


def test_full_model_when_a_delta_is_not_smaller_or_deltas_are_off():
    raw = ModelPublisher(keep_versions=1)  # no zstd: a dense delta is as big as the model
    raw.publish(1, V1)
    raw.publish(2, V2)
    assert raw.payload(2, 1).blob == raw.payload(2, 0).blob == ModelPayload.of(2, V2).blob
    off = _publisher((1, V1), (2, V2), deltas=False)
    assert off.payload(2, 1).base_version == 0
    with pytest.raises(ConfigError, match="lossless") as info:
        ModelPublisher(Chain.parse("q8"))
    assert info.value.key == "compression.download_codec"


def test_exact_download_patch_is_checked():
    dl = encode_download(V2, 2, (1, V1), Chain.parse("zstd"), 1, rng=np.random.default_rng(0),
                         exact=True)
    assert dl.patch is not None and 0 < dl.patch.count < D // 50
    blob = download_to_bytes(dl)
    assert decode_download(download_from_bytes(blob, max_elements=D),
                           (1, V1)).tobytes() == V2.tobytes()
    for bad in (blob[:-3], blob + b"\0", download_to_bytes(Download(2, 1, dl.encoded))[:-1]):
        with pytest.raises(CodecError):
            download_from_bytes(bad, max_elements=D)
    bare = to_bytes(Chain([]).encode(V1, np.random.default_rng(0)))  # an older server's model
    assert download_from_bytes(bare, max_elements=D, bare_version=7).version == 7
    with pytest.raises(CodecError, match="context"):
        download_from_bytes(bare, max_elements=D)
