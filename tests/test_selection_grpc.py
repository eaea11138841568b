"""Selection and outcomes in a deployment, on real loopback gRPC: devices enrol with the
attributes and windows their runtime declares, the registry sampler stratifies over them,
and every kind of round -- plain, retried after an abandoned attempt, secure -- leaves each
device's outcome in the registry (participation, which fairness reads)."""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from shoal.cli import main  # noqa: E402
from shoal.cli.client import parse_windows  # noqa: E402
from shoal.codec import Chain, to_bytes  # noqa: E402
from shoal.pipeline import Pipeline, Validation  # noqa: E402
from shoal.policy import SyncPolicy  # noqa: E402
from shoal.privacy.secagg_rounds import SecAggAggregation  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.runner import run_round  # noqa: E402
from shoal.sampling import RegistrySampler, UniformSampler  # noqa: E402
from shoal.selection import AvailabilityAware, Stratified  # noqa: E402
from shoal.strategy import FedAvg  # noqa: E402
from shoal.transport.auth import Keyring  # noqa: E402
from shoal.transport.carrier import GrpcCarrier  # noqa: E402
from shoal.transport.client import DeviceClient  # noqa: E402
from shoal.transport.device_api import TrainResult  # noqa: E402
from shoal.transport.proto import shoal_pb2 as pb  # noqa: E402
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc  # noqa: E402
from shoal.transport.server import AggregatorService, AggregatorSettings, serve  # noqa: E402
from shoal.transport.tokens import issue_token  # noqa: E402

DIM = 40
SECRET = b"o" * 32


def token(device: str) -> str:
    return issue_token(SECRET, device, now=time.time(), ttl_seconds=600)


def md(device: str):
    return (("authorization", f"Bearer {token(device)}"),)


@pytest.fixture()
def server(tmp_path):
    settings = AggregatorSettings(roster_wait_s=5.0, stage_timeout_s=1.5, long_poll_s=0.5,
                                  checkin_interval_s=0.2, idle_retry_s=0.2, rate_per_s=200,
                                  burst=400)
    path = tmp_path / "registry.db"
    service = AggregatorService(settings, Keyring.single(SECRET), DIM, "fp",
                                lambda: SQLiteRegistry(path))
    port, stop = serve(service)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield service, port, pb_grpc.AggregatorStub(channel), path
    channel.close()
    stop()


def hello(port: int, device: str, **kw) -> None:
    """The device runtime's Hello (its attributes and windows), and nothing else."""
    with DeviceClient(f"127.0.0.1:{port}", token(device), device,
                      root_certificates=None, train=lambda *a: None, **kw) as client:
        client.run(max_rounds=0)


def run_in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(result=fn()), daemon=True)
    t.start()
    return t, out


def wait_for_task(carrier: GrpcCarrier) -> None:
    deadline = time.time() + 10
    while carrier.gateway.latest_version is None and time.time() < deadline:
        time.sleep(0.01)


def check_in(stub, device):
    reply = stub.CheckIn(pb.CheckInRequest(device_id=device), metadata=md(device), timeout=5)
    return reply.task if reply.WhichOneof("reply") == "task" else None


def upload(stub, device, task, value: float, num_examples: int = 10):
    blob = to_bytes(Chain([]).encode(np.full(DIM, value, np.float32),
                                     np.random.default_rng(0)))
    header = pb.UploadHeader(device_id=device, round=task.round,
                             base_version=task.model_version, upload_key=task.upload_key,
                             idempotency_key="i", num_examples=num_examples,
                             total_size=len(blob), sha256=hashlib.sha256(blob).digest())
    return stub.Upload(iter([pb.UploadChunk(header=header), pb.UploadChunk(data=blob)]),
                       metadata=md(device), timeout=5)


def outcomes(path, device):
    with SQLiteRegistry(path) as reg:
        return [(o.round, o.outcome) for o in reg.outcomes(device)], \
            reg.get(device).participation


# --- devices declare, the registry sampler reads -------------------------------------------


def test_devices_enrol_with_their_attributes_and_windows_and_selection_reads_them(server):
    service, port, stub, path = server
    nights = parse_windows(["Mon-Fri/22:00-06:00"])
    for i in range(8):
        hello(port, f"dev-{i}", attributes={"os": "ios" if i < 2 else "android"},
              windows=nights if i % 2 else ())
    with SQLiteRegistry(path) as reg:
        dev = reg.get("dev-1")
        assert dict(dev.attributes) == {"os": "ios"}
        assert dev.windows == ((1320, 1800), (2760, 3240), (4200, 4680), (5640, 6120),
                               (7080, 7560))
    devices = tuple(f"dev-{i}" for i in range(8))
    stratified = RegistrySampler(Stratified("os"), 4, devices, lambda: service.registry)
    for seed in range(10):
        picked = stratified.sample(8, np.random.default_rng(seed))
        assert sum(devices[p] in ("dev-0", "dev-1") for p in picked) == 1  # 2 of 8 are ios
    monday_noon = 1796040000.0  # 2026-12-07 12:00 UTC, a Monday: the night owls sleep
    assert time.gmtime(monday_noon).tm_wday == 0 and time.gmtime(monday_noon).tm_hour == 12
    awake = RegistrySampler(AvailabilityAware(), 8, devices, lambda: service.registry,
                            clock=lambda: monday_noon)
    assert [devices[p] for p in awake.sample(8, np.random.default_rng(0))] == \
        ["dev-0", "dev-2", "dev-4", "dev-6"]
    assert len(awake.sample(8, np.random.default_rng(0), count=2)) == 2


@pytest.mark.parametrize("argv, phrase", [
    (["--window", "Mon-Fry/22:00-06:00"], "'Mon-Fry' is not a day"),
    (["--window", "22:00"], "expected [DAYS/]HH:MM-HH:MM"),
    (["--window", "Mon/07:00-07:00"], "start and end are the same time"),
    (["--window", "Mon/07:00-25:00"], "the end '25:00' must be a time HH:MM"),
    (["--attr", "os"], "expected KEY=VALUE"),
    (["--attr", "bad name=x"], "attribute name 'bad name'"),
])
def test_shoal_client_refuses_bad_attributes_and_windows(capsys, argv, phrase):
    assert main(["client", "--server", "localhost:1", "--token", "t", "--index", "0",
                 *argv]) == 2
    assert phrase in capsys.readouterr().err


def test_shoal_launch_deals_attributes_round_robin(tmp_path, capsys):
    from shoal.cli.launch import _deal_attributes

    dealt = _deal_attributes(["os=android,ios,linux", "region=eu"], 4)
    assert dealt == [["os=android", "region=eu"], ["os=ios", "region=eu"],
                     ["os=linux", "region=eu"], ["os=android", "region=eu"]]
    work = tmp_path / "work"
    assert main(["launch", "--clients", "3", "--per-round", "3", "--attr", "bad name=x",
                 "--dir", str(work), "-q"]) == 2
    assert "attribute name 'bad name'" in capsys.readouterr().err
    assert not work.exists()  # refused before a certificate or token was written


# --- outcomes of every kind of round ---------------------------------------------------------


def test_a_plain_round_records_accepted_and_late(server):
    service, port, stub, path = server
    devices = ["dev-a", "dev-b", "dev-c"]
    for d in devices:
        hello(port, d)
    carrier = GrpcCarrier(service, devices, poll_s=0.05)
    policy = SyncPolicy(target=2, over_selection=1.5, deadline_s=20.0, min_fraction=1.0,
                        max_attempts=1)
    t, out = run_in_thread(functools.partial(
        run_round, FedAvg(), carrier, UniformSampler(2), FedAvg().init(np.zeros(DIM,
                                                                                np.float32)),
        seed=0, policy=policy))
    wait_for_task(carrier)
    tasks = {d: check_in(stub, d) for d in devices}
    assert all(tasks.values())  # 3 asked for a target of 2
    assert upload(stub, "dev-a", tasks["dev-a"], 1.0).accepted
    assert upload(stub, "dev-c", tasks["dev-c"], 2.0).accepted
    t.join(timeout=15)
    assert out["result"][1].committed
    assert outcomes(path, "dev-a") == ([(1, "accepted")], 1)
    assert outcomes(path, "dev-c") == ([(1, "accepted")], 1)
    assert outcomes(path, "dev-b") == ([(1, "late")], 0)  # it had the task, round closed


def test_a_retried_round_records_the_attempt_that_let_a_device_in(server):
    service, port, stub, path = server
    devices = ["dev-a", "dev-b"]
    for d in devices:
        hello(port, d)
    carrier = GrpcCarrier(service, devices, poll_s=0.05)
    policy = SyncPolicy(target=2, deadline_s=1.0, min_fraction=1.0, max_attempts=2)
    t, out = run_in_thread(functools.partial(
        run_round, FedAvg(), carrier, UniformSampler(2), FedAvg().init(np.zeros(DIM,
                                                                                np.float32)),
        seed=0, policy=policy, pipeline=Pipeline(validation=Validation(max_norm=100.0))))
    wait_for_task(carrier)
    first = {d: check_in(stub, d) for d in devices}
    assert upload(stub, "dev-a", first["dev-a"], 1.0).accepted  # dev-b never uploads
    deadline = time.time() + 10
    second = None
    while second is None and time.time() < deadline:  # the attempt is abandoned, retried
        time.sleep(0.1)
        task = check_in(stub, "dev-b")
        second = task if task is not None and task.upload_key != first["dev-b"].upload_key \
            else None
    assert second is not None and second.round == first["dev-b"].round
    retry_a = check_in(stub, "dev-a")
    assert upload(stub, "dev-b", second, 2.0).accepted
    assert upload(stub, "dev-a", retry_a, 3.0).accepted
    t.join(timeout=15)
    state, rec = out["result"]
    assert rec.committed and rec.attempt == 1
    # dev-b was late in the abandoned attempt and accepted in the retry: the round counts
    # for it; dev-a took part in both attempts of one round: it counts once
    assert outcomes(path, "dev-b") == ([(1, "accepted")], 1)
    assert outcomes(path, "dev-a") == ([(1, "accepted")], 1)


def test_a_secure_round_records_included_and_dropped_devices(server):
    service, port, stub, path = server
    devices = [f"dev-{i}" for i in range(5)]
    for d in devices:
        hello(port, d)
    secure = SecAggAggregation(clip=2.0, value_bits=16, max_weight=64, neighbours=-1,
                               threshold=0, dropout=0.0, corrupt_rate=0.05,
                               rng_for_round=np.random.default_rng)
    carrier = GrpcCarrier(service, devices, poll_s=0.05, secure=secure)
    policy = SyncPolicy(target=5, deadline_s=8.0, min_fraction=0.5, max_attempts=1)
    stop = threading.Event()

    class Vanish(Exception):
        pass

    def device(d: str) -> None:
        def hook(stage: str, rnd: int) -> None:
            if d == "dev-3" and stage == "advertise_keys":
                raise Vanish(d)

        with DeviceClient(f"127.0.0.1:{port}", token(d), d,
                          root_certificates=None, after_stage=hook, min_wait_s=0.05,
                          max_backoff_s=0.2,
                          train=lambda *a: TrainResult(np.full(DIM, 0.5, np.float32), 5,
                                                       {})) as client:
            try:
                client.run(max_rounds=1, stop=stop)
            except Vanish:
                pass

    threads = [threading.Thread(target=device, args=(d,), daemon=True) for d in devices]
    for th in threads:
        th.start()
    try:
        state, rec = run_round(FedAvg(), carrier, UniformSampler(5),
                               FedAvg().init(np.zeros(DIM, np.float32)), seed=0,
                               policy=policy)
        for th in threads:
            th.join(timeout=20)
    finally:
        stop.set()
    assert rec.committed and rec.accepted == 4
    for d in devices:
        got, participation = outcomes(path, d)
        assert got == [(1, "dropped" if d == "dev-3" else "accepted")], d
        assert participation == (0 if d == "dev-3" else 1)


def test_a_registry_error_is_logged_with_the_device_and_the_round(server, caplog):
    service, port, stub, path = server
    devices = ["dev-a", "dev-b"]
    for d in devices:
        hello(port, d)
    carrier = GrpcCarrier(service, devices, poll_s=0.05)
    policy = SyncPolicy(target=2, deadline_s=20.0, min_fraction=1.0, max_attempts=1)
    t, out = run_in_thread(functools.partial(
        run_round, FedAvg(), carrier, UniformSampler(2), FedAvg().init(np.zeros(DIM,
                                                                                np.float32)),
        seed=0, policy=policy))
    wait_for_task(carrier)
    tasks = {d: check_in(stub, d) for d in devices}
    with SQLiteRegistry(path) as reg:
        reg.remove("dev-a")  # an operator removes it mid-round: its outcome cannot be kept
    with caplog.at_level(logging.WARNING, logger="shoal.aggregator"):
        assert upload(stub, "dev-a", tasks["dev-a"], 1.0).accepted  # the device is answered
        assert upload(stub, "dev-b", tasks["dev-b"], 1.0).accepted
        t.join(timeout=15)
    assert out["result"][1].committed
    errors = [r for r in caplog.records if getattr(r, "fields", {}).get("event")
              == "registry_error"]
    assert len(errors) == 1, caplog.text
    fields = errors[0].fields
    assert (fields["device"], fields["round"], fields["outcome"]) == ("dev-a", 1, "accepted")
    assert "'dev-a' is not enrolled" in fields["error"] and errors[0].levelno == logging.ERROR
    assert outcomes(path, "dev-b") == ([(1, "accepted")], 1)  # the others are still written
