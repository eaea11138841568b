"""Raw gRPC devices against a real aggregator on loopback: shared by the aggregator's tests.

Devices here are bare stubs, so every byte a device could send is under the test's control.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np

from shoal.clock import WallClock
from shoal.codec import Chain, from_bytes, to_bytes
from shoal.coordinator import Coordinator
from shoal.pipeline import Pipeline, Validation
from shoal.policy import SyncPolicy
from shoal.registry import SQLiteRegistry
from shoal.runner import drive
from shoal.sampling import UniformSampler
from shoal.strategy import FedAvg
from shoal.telemetry import PrometheusObserver
from shoal.transport.auth import Keyring
from shoal.transport.carrier import GrpcCarrier
from shoal.transport.proto import shoal_pb2 as pb
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc
from shoal.transport.server import AggregatorService, AggregatorSettings, serve
from shoal.transport.tokens import issue_token

DIM = 50
SECRET = b"k" * 32
DEVICES = ["dev-a", "dev-b", "dev-c", "dev-d"]


def token(device: str, secret: bytes = SECRET, ttl: int = 3600, now: float | None = None):
    return issue_token(secret, device, now=time.time() if now is None else now,
                       ttl_seconds=ttl)


def md(device: str, **kw):
    return (("authorization", f"Bearer {token(device, **kw)}"),)


@contextmanager
def running_aggregator(tmp_path, settings: AggregatorSettings, *, devices=DEVICES,
                       hello: bool = True, capabilities=None, runtime: str = "shoal-client/3"
                       ) -> Iterator[tuple[AggregatorService, object]]:
    """An aggregator on a free loopback port with ``devices`` said Hello (as ``runtime``,
    with ``capabilities``); yields ``(service, stub)`` (``service.port``,
    ``service.registry_path`` set)."""
    service = AggregatorService(settings, Keyring.single(SECRET), DIM, "fp",
                                lambda: SQLiteRegistry(tmp_path / "registry.db"),
                                metrics=PrometheusObserver())
    service.registry_path = tmp_path / "registry.db"
    port, stop = serve(service)
    service.port = port
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.AggregatorStub(channel)
    try:
        for d in devices if hello else ():
            stub.Hello(pb.HelloRequest(device_id=d, attributes={"os": "test"},
                                       capabilities=capabilities or {},
                                       runtime_version=runtime),
                       metadata=md(d), timeout=5)
        yield service, stub
    finally:
        channel.close()
        stop()


def start_round(service, n_sampled=4, seed=0, *, rounds=1, target=3, deadline_s=20.0,
                min_fraction=0.6, observers=(), devices=DEVICES, pipeline=None):
    """Run ``rounds`` coordinator rounds (the deployment's sync policy: target,
    over-selection, deadline, minimum fraction; one cohort per round) over one carrier in a
    thread; returns ``(thread, out)``: ``out["state"]``, ``out["record"]`` (the last),
    ``out["records"]``, ``out["carrier"]``."""
    carrier = GrpcCarrier(service, devices, poll_s=0.05)
    policy = SyncPolicy(target=target, over_selection=n_sampled / target,
                        deadline_s=deadline_s, min_fraction=min_fraction, max_attempts=1)
    pipeline = pipeline or Pipeline(validation=Validation(max_norm=100.0))
    coordinator = Coordinator(FedAvg(), carrier.num_clients, UniformSampler(n_sampled),
                              seed=seed, policy=policy, pipeline=pipeline, steps=rounds,
                              observers=[service.metrics, *observers])
    start = FedAvg().init(np.zeros(DIM, np.float32))
    out: dict = {"carrier": carrier, "records": [], "state": start, "record": None}

    def committed(state, record):
        out["state"], out["record"] = state, record
        out["records"].append(record)

    def abandoned(record, reason, retry):
        out["record"] = record
        out["records"].append(record)

    def run():
        try:
            drive(coordinator, carrier, start, WallClock(), on_commit=committed,
                  on_abort=abandoned)
        except Exception as exc:  # the test asserts on it
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 10
    while carrier.gateway.latest_version is None and time.time() < deadline:
        time.sleep(0.01)
    return t, out


def wait_for_round(out: dict, number: int, timeout: float = 10.0) -> None:
    """Wait until the run's task for round ``number`` is open."""
    gateway = out["carrier"].gateway
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s.round == number for s in gateway.sessions.all()):
            return
        time.sleep(0.01)
    raise AssertionError(f"round {number} did not open")


def get_task(stub, device):
    reply = stub.CheckIn(pb.CheckInRequest(device_id=device), metadata=md(device), timeout=5)
    assert reply.WhichOneof("reply") == "task", reply
    return reply.task


def download(stub, device, version):
    chunks = list(stub.Download(pb.DownloadRequest(version=version), metadata=md(device),
                                timeout=5))
    blob = b"".join(c.data for c in chunks)
    assert hashlib.sha256(blob).digest() == chunks[0].sha256 and len(chunks) > 1
    return from_bytes(blob, max_elements=DIM)


def encode(delta) -> bytes:
    return to_bytes(Chain([]).encode(np.asarray(delta, np.float32), np.random.default_rng(0)))


def upload_header(device, task, blob, *, num_examples=10, metrics=None, **overrides):
    header = dict(device_id=device, round=task.round, base_version=task.model_version,
                  upload_key=task.upload_key, idempotency_key="i", num_examples=num_examples,
                  metrics={"loss": 0.5} if metrics is None else metrics,
                  total_size=len(blob), sha256=hashlib.sha256(blob).digest())
    header.update(overrides)
    return pb.UploadHeader(**header)


def upload(stub, device, task, delta, *, num_examples=10, blob=None, sha=None, total=None,
           header_overrides=None, metadata=None, metrics=None):
    if blob is None:
        blob = encode(delta)
    overrides = dict(header_overrides or {})
    if sha is not None:
        overrides["sha256"] = sha
    if total is not None:
        overrides["total_size"] = total
    header = upload_header(device, task, blob, num_examples=num_examples, metrics=metrics,
                           **overrides)

    def parts():
        yield pb.UploadChunk(header=header)
        for off in range(0, len(blob), 100):
            yield pb.UploadChunk(data=blob[off:off + 100])

    return stub.Upload(parts(), metadata=metadata or md(device), timeout=5)


def held_stream(first=(), release: threading.Event | None = None):
    """A request stream that sends ``first`` and then nothing until ``release`` is set (or
    for a minute): an idle or stalled caller."""
    release = release if release is not None else threading.Event()

    def gen():
        yield from first
        release.wait(60)

    return gen()
