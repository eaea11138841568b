"""Carrier parity (issue 12): one scripted scenario -- stragglers, a dropout, a stale update,
malformed updates, a replay -- played through the in-memory transport (DeviceGateway driven
directly, fake time) and through real gRPC on loopback (AggregatorService + GrpcCarrier, raw
stubs as devices, the wall clock) commits the same versions with the same aggregates, and
every device gets the same answer.

The script is ordered so that no outcome depends on a timing race: rounds 1 and 2 close by
their target long before their deadline, round 3 by its deadline with its reports sent at
once (seconds of margin), and stragglers report only once their round has closed.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from shoal.clock import WallClock  # noqa: E402
from shoal.codec import Chain, to_bytes  # noqa: E402
from shoal.coordinator import Coordinator  # noqa: E402
from shoal.device_task import Task, UploadResult  # noqa: E402
from shoal.errors import UpdateRejected  # noqa: E402
from shoal.gateway import DeviceGateway, GatewaySettings  # noqa: E402
from shoal.observers import CarrierObserver  # noqa: E402
from shoal.policy import SyncPolicy  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.runner import drive  # noqa: E402
from shoal.strategy import FedAvg  # noqa: E402
from shoal.transport.auth import Keyring  # noqa: E402
from shoal.transport.carrier import GrpcCarrier  # noqa: E402
from shoal.transport.proto import shoal_pb2 as pb  # noqa: E402
from shoal.transport.proto import shoal_pb2_grpc as pb_grpc  # noqa: E402
from shoal.transport.server import AggregatorService, AggregatorSettings, serve  # noqa: E402
from shoal.transport.tokens import issue_token  # noqa: E402

DIM = 64
DEVICES = tuple(f"dev-{i}" for i in range(8))  # client id i is dev-i (sorted order)
SECRET = b"q" * 32
TARGET = 3
DEADLINE_S = 5.0  # rounds 1-2 close by target in well under a second; round 3 waits this


# ---------------------------------------------------------------------------------------------
# The scenario
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One device's move. ``kind``: ``update`` (a good one), ``nan`` or ``short`` (malformed:
    a non-finite value, one element missing), ``stale`` (trained from the version before its
    task's), ``replay`` (a good update sent twice: a retry after a lost reply), ``dropout``
    (took the task, never reports) or ``straggler`` (a good update after the round closed)."""

    device: str
    kind: str
    seed: int = 0
    examples: int = 0

    def delta(self) -> np.ndarray:
        return np.random.default_rng(self.seed).normal(0.0, 1.0, DIM).astype(np.float32)


@dataclass(frozen=True)
class Round:
    """A round's cohort (every member takes its task first), its moves while it is open, how
    it closes, and its stragglers' moves once it has."""

    cohort: tuple[int, ...]
    steps: tuple[Step, ...]
    closed_by: str
    after: tuple[Step, ...] = ()


SCENARIO = (
    Round(cohort=(0, 1, 2, 3, 4), closed_by="target_reached", steps=(
        Step("dev-0", "update", seed=1, examples=10),
        Step("dev-1", "nan", seed=2, examples=20),
        Step("dev-1", "update", seed=3, examples=20),   # corrected: still counts
        Step("dev-3", "dropout"),
        Step("dev-4", "update", seed=4, examples=5),    # the target
    ), after=(Step("dev-2", "straggler", seed=5, examples=7),)),
    Round(cohort=(0, 5, 6, 7), closed_by="target_reached", steps=(
        Step("dev-5", "stale", seed=6, examples=8),
        Step("dev-6", "short", seed=7, examples=9),
        Step("dev-5", "update", seed=8, examples=8),
        Step("dev-6", "update", seed=9, examples=3),
        Step("dev-7", "replay", seed=10, examples=12),  # the target, then its retry
    ), after=(Step("dev-0", "straggler", seed=11, examples=4),)),
    Round(cohort=(1, 2, 3, 4), closed_by="deadline", steps=(
        Step("dev-1", "update", seed=12, examples=6),
        Step("dev-2", "update", seed=13, examples=2),
        Step("dev-3", "dropout"),
    ), after=(Step("dev-4", "straggler", seed=14, examples=1),)),
)


def fedavg_oracle() -> list[np.ndarray]:
    """The model after each version, from the script alone: FedAvg of the good updates that
    arrived while their round was open."""
    model, out = np.zeros(DIM, np.float64), []
    for rnd in SCENARIO:
        good = [s for s in rnd.steps if s.kind in ("update", "replay")]
        weights = np.array([s.examples for s in good], np.float64)
        model = model + weights @ np.stack([s.delta() for s in good]) / weights.sum()
        out.append(model)
    return out


class ScriptedSampler:
    """The scenario's cohorts, in order."""

    def __init__(self) -> None:
        self._cohorts = [np.array(r.cohort, np.int64) for r in SCENARIO]

    def sample(self, num_clients: int, rng: np.random.Generator,
               count: int | None = None) -> np.ndarray:
        return self._cohorts.pop(0)


class Refusals(CarrierObserver):
    """Counts every refused update by reason, wherever it was refused (on the wire, by a
    session, by the coordinator's pipeline): what an operator's metrics show."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_reason: Counter[str] = Counter()

    def update_rejected(self, task_id, reason, count, detail, now) -> None:
        with self.lock:
            self.by_reason[reason] += count


def coordinator(observer: Refusals) -> Coordinator:
    policy = SyncPolicy(target=TARGET, over_selection=5 / TARGET, deadline_s=DEADLINE_S,
                        min_fraction=0.5, max_attempts=1)
    return Coordinator(FedAvg(), len(DEVICES), ScriptedSampler(), seed=0, policy=policy,
                       steps=len(SCENARIO), observers=[observer])


def play(carrier) -> list[tuple[int, str, str, str]]:
    """Play the scenario; returns every answer as ``(round, device, move, answer)``."""
    answers: list[tuple[int, str, str, str]] = []
    for number, rnd in enumerate(SCENARIO, start=1):
        tasks = {DEVICES[c]: carrier.task(DEVICES[c], number - 1) for c in rnd.cohort}
        for step in rnd.steps:
            answers += [(number, step.device, step.kind, a) for a in move(carrier, tasks, step)]
        carrier.closed(number, rnd.closed_by, tasks)
        for step in rnd.after:
            answers += [(number, step.device, step.kind, a) for a in move(carrier, tasks, step)]
    return answers


def move(carrier, tasks: dict, step: Step) -> list[str]:
    """One step's uploads; returns their answers (``"accepted"`` or the refusal's reason)."""
    task = tasks[step.device]
    delta, base = step.delta(), task.model_version
    if step.kind == "dropout":
        return []
    if step.kind == "nan":
        delta[3] = np.nan
    elif step.kind == "short":
        delta = delta[:-1]
    elif step.kind == "stale":
        base -= 1
    sends = 2 if step.kind == "replay" else 1
    return [carrier.upload(step.device, task, delta, step.examples, base) for _ in range(sends)]


# ---------------------------------------------------------------------------------------------
# The two carriers
# ---------------------------------------------------------------------------------------------


class InMemory:
    """DeviceGateway driven directly at a fake time (every move 0.05 s after the last)."""

    def __init__(self) -> None:
        self.refusals = Refusals()
        self.gateway = DeviceGateway(DEVICES, DIM, GatewaySettings(),
                                     rng=np.random.default_rng(0), observer=self.refusals)
        self.commits: list = []
        self.now = 0.0
        self.gateway.start(coordinator(self.refusals), FedAvg().init(np.zeros(DIM, np.float32)),
                           self.now)
        self._settle()

    def _settle(self) -> None:
        self.gateway.carry_out(lambda: self.now,
                               on_commit=lambda state, record: self.commits.append(
                                   (state, record)))

    def task(self, device: str, version: int) -> Task:
        self.now += 0.05
        task, _, _ = self.gateway.check_in(device, self.now)
        self._settle()
        assert isinstance(task, Task) and task.model_version == version, task
        return task

    def upload(self, device: str, task: Task, delta: np.ndarray, examples: int,
               base: int) -> str:
        self.now += 0.05
        try:
            result = self.gateway.upload(device, task.round, base, task.upload_key, examples,
                                         delta, self.now)
        except UpdateRejected as exc:
            return exc.reason
        finally:
            self._settle()
        assert isinstance(result, UploadResult)
        return "accepted"

    def tick(self, now: float) -> None:
        self.now = now
        self.gateway.tick(now)
        self._settle()

    def closed(self, version: int, closed_by: str, tasks: dict[str, Task]) -> None:
        if closed_by == "deadline":
            (deadline,) = {t.deadline for t in tasks.values()}
            self.tick(deadline - 1e-6)
            assert len(self.commits) == version - 1  # still open just before its deadline
            self.tick(deadline)
        assert len(self.commits) == version

    def finish(self) -> None:
        assert self.gateway.finished == "done"


class OverGrpc:
    """The real aggregator on loopback: the coordinator served by GrpcCarrier in a thread
    (through drive(), as ``shoal serve`` runs it), devices as raw gRPC stubs."""

    def __init__(self, tmp_path) -> None:
        self.refusals = Refusals()
        settings = AggregatorSettings(rate_per_s=1000.0, burst=1000.0, idle_retry_s=0.05,
                                      checkin_interval_s=0.05)
        self.service = AggregatorService(settings, Keyring.single(SECRET), DIM, "fp",
                                         lambda: SQLiteRegistry(tmp_path / "registry.db"),
                                         metrics=self.refusals)
        self.port, self._stop = serve(self.service)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.AggregatorStub(self.channel)
        self.carrier = GrpcCarrier(self.service, DEVICES, poll_s=0.02,
                                   rng=np.random.default_rng(0))
        self.commits: list = []
        self.committed = threading.Condition()
        self.finished: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        def commit(state, record) -> None:
            with self.committed:
                self.commits.append((state, record))
                self.committed.notify_all()

        self.finished.append(drive(coordinator(self.refusals), self.carrier,
                                   FedAvg().init(np.zeros(DIM, np.float32)), WallClock(),
                                   on_commit=commit))

    def _md(self, device: str):
        token = issue_token(SECRET, device, now=time.time(), ttl_seconds=600)
        return (("authorization", f"Bearer {token}"),)

    def task(self, device: str, version: int) -> pb.Task:
        end = time.monotonic() + 15.0
        while time.monotonic() < end:  # the round opens once the last version is stored
            reply = self.stub.CheckIn(pb.CheckInRequest(device_id=device),
                                      metadata=self._md(device), timeout=5)
            if reply.WhichOneof("reply") == "task" and reply.task.model_version == version:
                return reply.task
            time.sleep(0.02)
        raise AssertionError(f"{device} got no task for version {version}")

    def upload(self, device: str, task: pb.Task, delta: np.ndarray, examples: int,
               base: int) -> str:
        blob = _wire(delta)
        header = pb.UploadHeader(device_id=device, round=task.round, base_version=base,
                                 upload_key=task.upload_key, idempotency_key="i",
                                 num_examples=examples, total_size=len(blob),
                                 sha256=hashlib.sha256(blob).digest())
        chunks = [pb.UploadChunk(header=header)] + [
            pb.UploadChunk(data=blob[off:off + 100]) for off in range(0, len(blob), 100)]
        reply = self.stub.Upload(iter(chunks), metadata=self._md(device), timeout=5)
        return "accepted" if reply.accepted else reply.reason

    def closed(self, version: int, closed_by: str, tasks) -> None:
        with self.committed:
            assert self.committed.wait_for(lambda: len(self.commits) >= version,
                                           timeout=DEADLINE_S + 10), f"no version {version}"

    def finish(self) -> None:
        self.thread.join(timeout=10)
        assert self.finished == ["done"]

    def close(self) -> None:
        with self.carrier.gateway.changed:  # end a run a failed test left open
            if not self.carrier.gateway.finished:
                self.carrier.gateway._finish("test over")
        self.thread.join(timeout=10)
        self.channel.close()
        self._stop()


def _wire(delta: np.ndarray) -> bytes:
    """The raw codec's bytes of ``delta``; a non-finite value is forged into the payload
    (shoal's encoder refuses one) with its CRC recomputed, as a broken client could send."""
    if np.isfinite(delta).all():
        return to_bytes(Chain([]).encode(delta, np.random.default_rng(0)))
    marked = np.where(np.isfinite(delta), delta, np.float32(12345.678)).astype(np.float32)
    blob = bytearray(to_bytes(Chain([]).encode(marked, np.random.default_rng(0))))
    at = bytes(blob).find(np.float32(12345.678).tobytes())
    blob[at:at + 4] = np.float32(np.nan).tobytes()
    blob[-4:] = struct.pack("<I", zlib.crc32(bytes(blob[:-4])))
    return bytes(blob)


@pytest.fixture()
def memory_carrier() -> InMemory:
    return InMemory()


@pytest.fixture()
def grpc_carrier(tmp_path):
    carrier = OverGrpc(tmp_path)
    yield carrier
    carrier.close()


# ---------------------------------------------------------------------------------------------
# The requirement
# ---------------------------------------------------------------------------------------------


def test_the_scenario_commits_the_same_versions_over_both_carriers(memory_carrier,
                                                                     grpc_carrier):
    memory = memory_carrier
    answers = {"memory": play(memory), "grpc": play(grpc_carrier)}
    memory.finish()
    grpc_carrier.finish()

    # every device got the same answer, and it is the one the script calls for
    assert answers["memory"] == answers["grpc"]
    told = {(r, d, kind): a for r, d, kind, a in answers["memory"]}
    assert [a for (_, _, kind), a in told.items() if kind == "straggler"] == ["late"] * 3
    assert (told[(1, "dev-1", "nan")], told[(2, "dev-6", "short")],
            told[(2, "dev-5", "stale")]) == ("non_finite", "wrong_shape", "stale")
    assert [a for r, d, kind, a in answers["memory"] if kind == "replay"] == \
        ["accepted", "accepted"]

    # the same versions, closed the same way, from the same reports
    def summary(commits) -> list[tuple]:
        return [(state.version, rec.closed_by, rec.sampled, rec.accepted, rec.examples,
                 rec.rejected.get("timed_out", 0), rec.rejected.get("wrong_shape", 0))
                for state, rec in commits]

    assert summary(memory.commits) == summary(grpc_carrier.commits) == [
        (1, "target_reached", 5, 3, 35, 0, 0), (2, "target_reached", 4, 3, 23, 0, 1),
        (3, "deadline", 4, 2, 8, 2, 0)]
    # refusals by reason are the same, and so is where: a non-finite payload decodes on the
    # wire and is refused by the coordinator's validation, as in memory
    assert memory.refusals.by_reason == grpc_carrier.refusals.by_reason == Counter(
        {"late": 3, "non_finite": 1, "wrong_shape": 1, "stale": 1})
    assert memory.commits[0][1].rejected == grpc_carrier.commits[0][1].rejected == {
        "non_finite": 1}

    # the same aggregates: each version is the FedAvg of exactly the accepted updates
    oracle = fedavg_oracle()
    diffs = [float(np.max(np.abs(np.asarray(a.params, np.float64) - b.params)))
             for (a, _), (b, _) in zip(memory.commits, grpc_carrier.commits)]
    print(f"carrier parity: max |memory - grpc| per version = {diffs}")
    assert max(diffs) <= 1e-6
    worst = max(float(np.max(np.abs(state.params - want)))
                for (state, _), want in zip(memory.commits, oracle))
    print(f"carrier parity: max |memory - FedAvg oracle| = {worst:.3g}")
    assert worst <= 1e-6
