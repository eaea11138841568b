"""Central DP composed with secure aggregation, over real loopback gRPC with 10 devices.

The server never sees one device's update, so it cannot clip them: the task asks each device
to clip its update to C and weigh it 1 before masking; the secure sum of the included devices
reaches the coordinator as one group that promises exactly that, and the central-DP stage adds
its Gaussian noise to the unmasked sum. Oracles, all independent of the code under test: the
devices' updates clipped here by hand, the noise redrawn here from the generator the test gave
the stage, and epsilon from ``dp-accounting`` directly.
"""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
dp_accounting = pytest.importorskip("dp_accounting")

from dp_accounting import dp_event  # noqa: E402
from dp_accounting.privacy_accountant import NeighboringRelation  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402

from shoal.events import PartialAggregate  # noqa: E402
from shoal.pipeline import Pipeline  # noqa: E402
from shoal.policy import SyncPolicy  # noqa: E402
from shoal.privacy import CentralDP, RoundEvent  # noqa: E402
from shoal.privacy.secagg_rounds import SecAggAggregation  # noqa: E402
from shoal.privacy.stages import BudgetPolicy, CentralDPStage  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.runner import run_round  # noqa: E402
from shoal.sampling import UniformSampler  # noqa: E402
from shoal.strategy import FedAvg  # noqa: E402
from shoal.transport.auth import Keyring  # noqa: E402
from shoal.transport.carrier import GrpcCarrier  # noqa: E402
from secure_devices import run_devices  # noqa: E402
from shoal.transport.device_api import TrainResult  # noqa: E402
from shoal.transport.server import AggregatorService, AggregatorSettings, serve  # noqa: E402

DIM = 300
N = 10
SECRET = b"d" * 32
C = 3.0  # central DP's L2 clip norm
Z = 1.2  # noise multiplier
RANGE = 4.0  # secure aggregation's fixed-point range per coordinate (>= C: never binds)
BITS = 20
NOISE_SEED = 1234


def delta_of(i: int) -> np.ndarray:
    # norms ~ 0.1 .. 25: some below C (kept as they are), most above (scaled down)
    scale = 0.005 if i % 4 == 0 else 1.5
    return (np.random.default_rng(200 + i).uniform(-1, 1, DIM) * scale).astype(np.float32)


def clipped(i: int) -> np.ndarray:
    d = delta_of(i).astype(np.float64)
    return d * min(1.0, C / np.linalg.norm(d))


def oracle_epsilon(delta: float) -> float:
    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_event.SampledWithoutReplacementDpEvent(N, N, dp_event.GaussianDpEvent(Z / 2)))
    return acc.get_epsilon(delta)


@pytest.fixture()
def secure_dp(tmp_path):
    settings = AggregatorSettings(roster_wait_s=10.0, stage_timeout_s=3.0, long_poll_s=0.5,
                                  checkin_interval_s=0.2, idle_retry_s=0.2, rate_per_s=200,
                                  burst=400)
    service = AggregatorService(settings, Keyring.single(SECRET), DIM, "fp",
                                lambda: SQLiteRegistry(tmp_path / "registry.db"))
    port, stop = serve(service)
    devices = [f"dev-{i}" for i in range(N)]
    for d in devices:
        SQLiteRegistry(tmp_path / "registry.db").enroll(d, now=time.time())
    secure = SecAggAggregation(clip=RANGE, value_bits=BITS, max_weight=4, neighbours=-1,
                               threshold=0, dropout=0.0, corrupt_rate=0.05,
                               rng_for_round=np.random.default_rng)
    carrier = GrpcCarrier(service, devices, poll_s=0.05, secure=secure)
    stage = CentralDPStage(CentralDP(noise_multiplier=Z, clip_norm=C, expected_clients=N),
                           RoundEvent.fixed_size(N, N, Z), BudgetPolicy(0.0, 1e-5),
                           rng_for_step=lambda step: np.random.default_rng(NOISE_SEED + step))
    yield port, carrier, Pipeline(stages=(stage,)), devices
    stop()


def test_committed_model_is_the_secure_sum_of_clipped_updates_plus_the_recorded_noise(
        secure_dp):
    port, carrier, pipeline, devices = secure_dp
    # dev-3 leaves before its input (excluded; its pairwise masks are reconstructed), dev-5
    # after sending it (included; its self-mask is removed with the survivors' shares)
    vanish = {"dev-3": "share_keys", "dev-5": "masked_input"}
    stop = threading.Event()
    try:
        threads = run_devices(port, devices, vanish, stop, {}, result=lambda i: TrainResult(
            delta_of(i), 7 + i, {"loss": 0.1}), secret=SECRET)  # weights are not 1 here
        # target N - 1: input collection closes as soon as the nine who can send have (a
        # generous deadline then costs nothing, and a loaded machine cannot miss it)
        policy = SyncPolicy(target=N - 1, over_selection=N / (N - 1), deadline_s=60.0,
                            min_fraction=0.5, max_attempts=1)
        coord = functools.partial(run_round, FedAvg(), carrier, UniformSampler(N), seed=0,
                                  policy=policy, pipeline=pipeline)
        state, rec = coord(FedAvg().init(np.zeros(DIM, np.float32)))
        for t in threads:
            t.join(timeout=20)
    finally:
        stop.set()
    assert rec.committed, rec
    included = [i for i in range(N) if i != 3]
    assert rec.accepted == len(included) and rec.privacy["secagg_included"] == len(included)
    # the recorded release: noise N(0, (z C)^2) on the sum, the sum over m = N expected clients
    assert rec.privacy["clip_norm"] == C
    assert rec.privacy["noise_std"] == pytest.approx(Z * C / N)
    noise = np.random.default_rng(NOISE_SEED + 1).standard_normal(DIM, dtype=np.float32) \
        * np.float32(Z * C)
    secure_sum = np.sum([clipped(i) for i in included], axis=0)
    expected = (secure_sum + noise) / N
    step = 2 * RANGE / (2**BITS - 1)  # one fixed-point step per device in the sum
    np.testing.assert_allclose(state.params, expected, atol=len(included) * step / N, rtol=0)
    # the test can tell: unclipped updates, or the mean without noise, are far from it
    raw = np.sum([delta_of(i) for i in included], axis=0) / N
    assert np.abs(state.params - raw).max() > 100 * step
    assert np.abs(state.params - secure_sum / N).max() > 100 * step
    assert rec.privacy["epsilon"] == pytest.approx(oracle_epsilon(1e-5), rel=1e-9)


def test_a_group_that_does_not_promise_clipping_is_refused_and_changes_nothing():
    from shoal.coordinator import Coordinator
    from shoal.events import CommitVersion, SendTask, TaskEnded, UpdatesArrived

    stage = CentralDPStage(CentralDP(noise_multiplier=Z, clip_norm=C, expected_clients=2),
                           RoundEvent.fixed_size(2, 4, Z), BudgetPolicy(0.0, 1e-5),
                           rng_for_step=lambda step: np.random.default_rng(step))
    strategy = FedAvg()

    def round_with(group: PartialAggregate):
        coord = Coordinator(strategy, 4, UniformSampler(2), seed=0,
                            pipeline=Pipeline(stages=(stage,)), steps=1)
        (send,) = [c for c in coord.start(strategy.init(np.zeros(DIM, np.float32)), 0.0)
                   if isinstance(c, SendTask)]
        assert send.task.clip_norm == C  # the task tells clients what to clip to
        out = coord.handle(UpdatesArrived(send.task.task_id, group, 1.0))
        out += coord.handle(TaskEnded(send.task.task_id, 2.0))
        return [c for c in out if isinstance(c, CommitVersion)]

    mean = np.full(DIM, 0.01, np.float32)
    ok = round_with(PartialAggregate(mean, 2, 2, clip_norm=C))
    assert ok[0].record.accepted == 2 and ok[0].record.rejected == {}
    for bad in (PartialAggregate(mean, 2, 2),  # no promise
                PartialAggregate(mean, 2, 2, clip_norm=2 * C),  # a looser bound
                PartialAggregate(mean, 17, 2, clip_norm=C)):  # example-weighted, not 1 each
        (commit,) = round_with(bad)
        # refused: the release is noise alone (central DP releases every round)
        assert commit.record.accepted == 0 and commit.record.rejected == {"not_clipped": 1}


@pytest.mark.slow
def test_launch_with_central_dp_and_secure_aggregation_reports_epsilon(tmp_path):
    """`shoal launch` with both on: 10 device processes clip before masking, the aggregator
    noises the unmasked sum and its accountant reports epsilon -- the same epsilon the
    library gives for the run's rounds and sampling."""
    import json
    import os
    import subprocess
    import sys

    overrides = {"data.dataset": "synthetic", "data.clients": N, "model.name": "logreg",
                 "sampling.per_round": N, "deploy.over_selection": 1.0,
                 "deploy.min_fraction": 0.8, "deploy.checkin_interval_s": 0.3,
                 "privacy.placement": "central", "privacy.clip_norm": 1.0,
                 "privacy.noise_multiplier": Z, "secure_aggregation.enabled": True,
                 "secure_aggregation.roster_wait_s": 5.0,
                 "secure_aggregation.stage_timeout_s": 3.0, "rounds": 2}
    sets = [a for k, v in overrides.items()
            for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}")]
    proc = subprocess.run([sys.executable, "-m", "shoal.cli", "launch", *sets, "--dir",
                           str(tmp_path / "work"), "--out", str(tmp_path / "runs"), "--json",
                           "-q"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["rounds"] == 2
    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_event.SampledWithoutReplacementDpEvent(N, N, dp_event.GaussianDpEvent(Z / 2)),
                2)
    assert summary["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
