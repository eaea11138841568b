"""Devices over real loopback gRPC for secure-aggregation tests: an aggregator whose carrier
runs SecAgg+ rounds, N device runtimes in threads (named after the devices) that can vanish
after a chosen stage, and a record of what each device encoded on its side of the wire."""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest

from shoal.policy import SyncPolicy
from shoal.privacy.rotated_encoding import RoundEncoding
from shoal.privacy.secagg_encoding import FixedPoint, RingEncoding
from shoal.registry import SQLiteRegistry
from shoal.runner import run_round
from shoal.sampling import UniformSampler
from shoal.strategy import FedAvg
from shoal.transport.auth import Keyring
from shoal.transport.carrier import GrpcCarrier
from shoal.transport.client import DeviceClient
from shoal.transport.device_api import TrainResult
from shoal.transport.server import AggregatorService, AggregatorSettings, serve
from shoal.transport.proto import shoal_pb2 as pb
from shoal.transport.tokens import issue_token

DIM = 300
N = 10
SECRET = b"g" * 32
C = 2.0  # the L2 clip norm of the updates' oracle


class Vanish(Exception):
    """Raised from the after_stage hook: the device's thread ends there, mid-round."""


def delta_of(i: int, dim: int = DIM) -> np.ndarray:
    scale = 0.005 if i % 4 == 0 else 1.5  # some below C, most above (scaled down)
    return (np.random.default_rng(300 + i).uniform(-1, 1, dim) * scale).astype(np.float32)


def clipped(i: int, dim: int = DIM, clip: float = C) -> np.ndarray:
    d = delta_of(i, dim).astype(np.float64)
    return d * min(1.0, clip / np.linalg.norm(d))


@pytest.fixture()
def recorded(monkeypatch):
    """What each device encoded: device -> ``(encoding, ring vector, rng type)``, recorded
    on the device side of the wire."""
    calls: dict[str, tuple[RingEncoding, np.ndarray, type]] = {}
    lock = threading.Lock()

    def recording(original):
        def encode(self, x, weight, bits, rng):
            out = original(self, x, weight, bits, rng)
            with lock:  # each device runs in a thread named after it
                calls[threading.current_thread().name] = (self, out.copy(), type(rng))
            return out
        return encode

    for kind in (RoundEncoding, FixedPoint):
        monkeypatch.setattr(kind, "encode", recording(kind.encode))
    return calls


def serve_carrier(tmp_path, secure, dim=DIM):
    """A served aggregator whose carrier runs ``secure`` (a SecAggAggregation) with the N
    devices enrolled: ``(port, stop, carrier, devices)``."""
    settings = AggregatorSettings(roster_wait_s=10.0, stage_timeout_s=3.0, long_poll_s=0.5,
                                  checkin_interval_s=0.2, idle_retry_s=0.2, rate_per_s=200,
                                  burst=400)
    service = AggregatorService(settings, Keyring.single(SECRET), dim, "fp",
                                lambda: SQLiteRegistry(tmp_path / "registry.db"))
    port, stop = serve(service)
    devices = [f"dev-{i}" for i in range(N)]
    for d in devices:
        SQLiteRegistry(tmp_path / "registry.db").enroll(d, now=time.time())
    carrier = GrpcCarrier(service, devices, poll_s=0.05, secure=secure)
    return port, stop, carrier, devices


def run_devices(port, devices, vanish_after: dict[str, str], stop: threading.Event,
                stats: dict, dim: int = DIM, *, result=None, secret: bytes = SECRET,
                min_noise: float = 0.0):
    """A thread per device running one round over gRPC; device ``d`` vanishes after the
    SecAgg stage ``vanish_after[d]``. ``result(i)``: device ``i``'s ``TrainResult``
    (default ``delta_of(i, dim)`` with 7 + i examples); ``secret``: the tokens' key;
    ``min_noise``: every device's distributed-DP noise floor (``DeviceClient``)."""
    threads = []

    def device(i, d):
        def train(params, settings, rnd):
            if result is not None:
                return result(i)
            return TrainResult(delta_of(i, dim), 7 + i, {"loss": 0.1})

        def hook(stage, rnd):
            if vanish_after.get(d) == stage:
                raise Vanish(d)

        token = issue_token(secret, d, now=time.time(), ttl_seconds=600)
        with DeviceClient(f"127.0.0.1:{port}", token, d, root_certificates=None, train=train,
                          after_stage=hook, min_wait_s=0.05, max_backoff_s=0.2,
                          min_noise=min_noise) as client:
            try:
                client.run(max_rounds=1, stop=stop)
            except Vanish:
                pass
            stats[d] = client.stats

    for i, d in enumerate(devices):
        t = threading.Thread(target=device, args=(i, d), name=d, daemon=True)
        t.start()
        threads.append(t)
    return threads


def one_round(port, carrier, devices, pipeline, vanish, *, dim=DIM, target=N - 1,
              deadline_s=60.0, min_noise=0.0):
    """One round with every device; returns ``(state, record, device -> its counters)``."""
    stop = threading.Event()
    stats: dict = {}
    try:
        threads = run_devices(port, devices, vanish, stop, stats, dim, min_noise=min_noise)
        # target N - 1 by default: input collection closes once the nine who can send have
        policy = SyncPolicy(target=target, over_selection=N / target, deadline_s=deadline_s,
                            min_fraction=0.5, max_attempts=1)
        coord = functools.partial(run_round, FedAvg(), carrier, UniformSampler(N), seed=0,
                                  policy=policy, pipeline=pipeline)
        state, rec = coord(FedAvg().init(np.zeros(dim, np.float32)))
        for t in threads:
            t.join(timeout=20)
    finally:
        stop.set()
    return state, rec, stats


def check_in_all(gateway_of, stub, devices, metadata_of) -> dict:
    """Once the round's first task is open (``gateway_of()`` has published a version), check
    every device in over ``stub`` by hand; returns device -> its task."""
    while gateway_of().latest_version is None:
        time.sleep(0.01)
    return {d: stub.CheckIn(pb.CheckInRequest(device_id=d), metadata=metadata_of(d),
                            timeout=5).task for d in devices}
