"""Distributed DP and the rotated SecAgg+ ring over real loopback gRPC, with 10 devices
(the compressed ring without DP is measured here too: its bytes on the wire).

Each device clips its update, rotates it with the seed of the round's session, rounds it
into a 16-bit ring, adds its own discrete Gaussian share (from a CSPRNG) and masks it; the
server unmasks only the noised sum of the survivors and decodes it. Oracles, independent of
the server's code: the ring vectors the devices actually encoded (recorded on their side),
summed and decoded here; the devices' own updates clipped here by hand; epsilon from
``dp-accounting``'s Gaussian directly.
"""

from __future__ import annotations

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
dp_accounting = pytest.importorskip("dp_accounting")

from dp_accounting import dp_event  # noqa: E402
from dp_accounting.privacy_accountant import NeighboringRelation  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402

from secure_devices import (C, DIM, N, clipped, one_round, recorded,  # noqa: E402, F401
                            serve_carrier)
from shoal.build import pipeline_from_config, secagg_from_config  # noqa: E402
from shoal.config import load_config  # noqa: E402
from shoal.pipeline import Pipeline  # noqa: E402
from shoal.privacy.csprng import CryptoRandom  # noqa: E402
from shoal.privacy.ddg_accounting import ORDERS  # noqa: E402
from shoal.privacy.rotated_encoding import decode_sum  # noqa: E402
from shoal.privacy.rotation import rotation_seed  # noqa: E402
from shoal.privacy.secagg_encoding import FixedPoint  # noqa: E402

Z = 0.8  # noise multiplier
H = 8  # honest clients whose noise a release must hold
DELTA = 1e-5


def config(**extra):
    return load_config(None, {
        "data.dataset": "synthetic", "data.clients": N, "model.name": "logreg",
        "sampling.per_round": N, "secure_aggregation.enabled": True,
        "secure_aggregation.encoding": "rotated", "privacy.placement": "distributed",
        "privacy.noise_multiplier": Z, "privacy.clip_norm": C, "privacy.honest_clients": H,
        "privacy.delta": DELTA, "deploy.over_selection": 1.0, **extra})


def oracle_epsilon() -> float:
    acc = RdpAccountant(list(ORDERS), NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_event.SampledWithoutReplacementDpEvent(N, N, dp_event.GaussianDpEvent(Z / 2)))
    return acc.get_epsilon(DELTA)


def test_the_committed_model_is_the_decoded_noised_sum_the_devices_encoded(tmp_path, recorded):
    cfg = config()
    port, stop, carrier, devices = serve_carrier(tmp_path, secagg_from_config(cfg))
    pipeline = pipeline_from_config(cfg, deployed=True, secure_in_transport=True)
    try:
        # dev-3 leaves before its input (excluded; its pairwise masks are reconstructed),
        # dev-5 after sending it (included: its noise share is in the sum)
        state, rec, _ = one_round(port, carrier, devices, pipeline,
                               {"dev-3": "share_keys", "dev-5": "masked_input"})
    finally:
        stop()
    assert rec.committed, rec
    included = [i for i in range(N) if i != 3]
    assert rec.accepted == len(included) and rec.privacy["ddg_noise_shares"] == len(included)
    # every device that trained (not dev-3) encoded into the round's encoding, with a CSPRNG
    assert set(recorded) == {f"dev-{i}" for i in included}
    encoding = recorded["dev-0"][0]
    assert all(e == encoding for e, _, _ in recorded.values())
    assert {rng for *_, rng in recorded.values()} == {CryptoRandom}
    p = encoding.params
    assert p.noise_std > 0 and p.bits == 16 and p.dim == DIM
    # the oracle: the ring vectors of the devices that were included, summed mod 2^b
    vectors = [recorded[f"dev-{i}"][1] for i in included]
    total = np.sum([v.astype(np.int64) for v in vectors], axis=0) % (1 << p.bits)
    decoded, count = decode_sum(total, encoding.seed, p)
    assert count == len(included)
    np.testing.assert_allclose(state.params, decoded / N, rtol=1e-5, atol=1e-6)
    # it is noised: the clipped updates' plain mean is far from it, by about the noise of
    # nine shares (their sum's std is 3 shares' noise; rounding adds a little)
    residual = state.params * N - np.sum([clipped(i) for i in included], axis=0)
    share = Z * (1 + 1 / 64) * C / np.sqrt(H)
    assert np.std(residual) == pytest.approx(np.sqrt(len(included)) * share, rel=0.2)
    assert rec.privacy["noise_std"] == pytest.approx(np.sqrt(len(included)) * share / N)
    # epsilon: the distributed accountant's, which here is dp-accounting's Gaussian at z
    assert rec.privacy["epsilon"] == pytest.approx(oracle_epsilon(), rel=1e-9)


def test_a_deployment_checks_distributed_dp_cohorts_like_central_ones():
    from shoal.deploy import check_deployable
    from shoal.errors import ConfigError

    check_deployable(config(), tls=False)  # deployable now
    check_deployable(config(**{"privacy.placement": "none"}), tls=False)  # compression only
    with pytest.raises(ConfigError) as exc:
        check_deployable(config(**{"deploy.over_selection": 1.3}), tls=False)
    assert exc.value.key == "deploy.over_selection" and "distributed DP" in str(exc.value)
    for refused, key in (({"secure_aggregation.protocol": "ckks"},
                          "secure_aggregation.protocol"),
                         ({"compression.upload": "q8"}, "compression.upload")):
        with pytest.raises(ConfigError) as exc:
            check_deployable(config(**refused), tls=False)
        assert exc.value.key == key


def test_a_device_refuses_a_rotated_setup_that_does_not_add_up():
    from shoal.errors import ConfigError, ProtocolError
    from shoal.transport.proto import shoal_pb2 as pb
    from shoal.transport.secagg_wire import reply_from_pb, reply_to_pb
    from shoal.privacy.secagg_messages import RoundSetup, SecAggParams

    enc = secagg_from_config(config()).rotated.for_round(DIM, N, rotation_seed(b"s" * 16))
    setup = RoundSetup(b"s" * 16, tuple(range(N)), b"g" * 32,
                       SecAggParams(neighbours=N - 1, threshold=6, bits=16,
                                    length=enc.params.length))
    wire = reply_to_pb(setup, client_id=4, encoding=enc)
    message, cid, got = reply_from_pb(pb.SecAggReply.FromString(wire.SerializeToString()))
    assert (message, cid, got) == (setup, 4, enc)  # the seed is derived, not sent
    # an older runtime reads only the fixed-point fields: it cannot build an encoding, so
    # it abandons the task instead of masking an input without a noise share
    with pytest.raises(ConfigError):
        FixedPoint(clip=wire.setup.clip, value_bits=wire.setup.value_bits,
                   max_weight=wire.setup.max_weight)
    # a block that is not a power of two, a negative grid, a length that is not the ring's
    for field, value in (("block", 3), ("gamma", -1.0), ("dim", 2 * DIM)):
        bad = pb.SecAggReply()
        bad.CopyFrom(wire)
        setattr(bad.setup.rotation, field, value)
        with pytest.raises(ProtocolError, match="malformed"):
            reply_from_pb(bad)


def test_a_round_with_fewer_than_h_plus_f_masked_inputs_unmasks_nothing(tmp_path, recorded):
    """h = 9 of 10: two devices leave before their input, the eight inputs are never
    unmasked, nothing is committed or accounted, and the devices hear the round abort."""
    cfg = config(**{"privacy.honest_clients": 9})
    port, stop, carrier, devices = serve_carrier(tmp_path, secagg_from_config(cfg))
    pipeline = pipeline_from_config(cfg, deployed=True, secure_in_transport=True)
    try:
        state, rec, stats = one_round(port, carrier, devices, pipeline,
                                      {"dev-3": "share_keys", "dev-6": "advertise_keys"},
                                      target=8)
    finally:
        stop()
    assert not rec.committed and "epsilon" not in rec.privacy
    assert not state.params.any()
    assert len(recorded) == 8  # they did encode and mask: the server holds them masked
    assert sum(s.secagg.get("aborted", 0) for s in stats.values()) == 8


@pytest.mark.parametrize("floor", [0.01, 10.0])
def test_a_device_refuses_a_round_asking_for_less_noise_than_its_floor(tmp_path, recorded,
                                                                         floor):
    """The server announces each device's noise share; a device with a floor above it
    refuses the round before advertising keys (nothing encoded, nothing committed)."""
    cfg = config()
    port, stop, carrier, devices = serve_carrier(tmp_path, secagg_from_config(cfg))
    pipeline = pipeline_from_config(cfg, deployed=True, secure_in_transport=True)
    try:
        state, rec, stats = one_round(port, carrier, devices, pipeline, {}, target=N,
                                      deadline_s=15.0, min_noise=floor)
    finally:
        stop()
    refused = sum(s.secagg.get("refused:noise_below_floor", 0) for s in stats.values())
    if floor > 1:  # far above z / sqrt(h) = 0.28 clip norms
        assert refused == N and not recorded and not rec.committed
        assert not state.params.any()
    else:
        assert refused == 0 and len(recorded) == N and rec.committed


TWO_NN = 199_210  # the reference 2NN's parameter count


def test_a_rotated_upload_is_at_least_four_times_smaller_on_the_wire(tmp_path, recorded):
    """Today's SecAgg+ (fixed point) against the 8-bit rotated ring, one round each of the
    same ten 2NN-sized updates: bytes the server received per device (every SecAgg message:
    keys, shares, masked input, unmasking), and the rotated mean within its grid of the
    clipped updates' mean."""
    per_device, models = {}, {}
    for encoding in ("fixed_point", "rotated"):
        cfg = config(**{"privacy.placement": "none", "secure_aggregation.encoding": encoding})
        (tmp_path / encoding).mkdir()
        port, stop, carrier, devices = serve_carrier(tmp_path / encoding,
                                                     secagg_from_config(cfg), TWO_NN)
        try:
            state, rec, stats = one_round(port, carrier, devices, Pipeline(), {}, dim=TWO_NN,
                                          target=N)
        finally:
            stop()
        assert rec.committed and rec.accepted == N, rec
        # either encoding's rounding coins come from the devices' CSPRNG
        assert {rng for *_, rng in recorded.values()} == {CryptoRandom}
        recorded.clear()
        per_device[encoding] = rec.bytes_up / N
        sent = [s.bytes_up for s in stats.values()]  # what each device put on the wire
        assert max(sent) <= 1.01 * min(sent)
        assert np.mean(sent) == pytest.approx(per_device[encoding], rel=0.05)
        models[encoding] = state.params
    assert per_device["fixed_point"] >= 4 * per_device["rotated"]
    # accuracy: the rotated ring's mean of the updates clipped to norm_clip = 1
    plan = secagg_from_config(config(**{"privacy.placement": "none"})).rotated
    p = plan.for_round(TWO_NN, N, b"\0" * 32).params
    target = np.mean([clipped(i, TWO_NN, plan.clip) for i in range(N)], axis=0)
    err = np.linalg.norm(models["rotated"] - target)
    assert err < p.gamma * np.sqrt(p.padded)  # within one grid step per coordinate
    assert err > 0


@pytest.mark.slow
def test_launch_with_distributed_dp_reports_the_distributed_accountants_epsilon(tmp_path):
    """`shoal launch` end to end: 10 device processes add their shares inside SecAgg+ over
    TLS for 2 rounds, every round holds all 10 shares, and epsilon is dp-accounting's
    Gaussian at z for 2 rounds of 10 of 10 (the distributed bound's tau is negligible)."""
    import json
    import os
    import subprocess
    import sys

    overrides = {"data.dataset": "synthetic", "data.clients": N, "model.name": "logreg",
                 "sampling.per_round": N, "deploy.over_selection": 1.0,
                 "deploy.min_fraction": 1.0, "deploy.checkin_interval_s": 0.3,
                 "privacy.placement": "distributed", "privacy.clip_norm": 1.0,
                 "privacy.noise_multiplier": Z, "secure_aggregation.enabled": True,
                 "secure_aggregation.encoding": "rotated",
                 "secure_aggregation.roster_wait_s": 10.0,
                 "secure_aggregation.stage_timeout_s": 5.0, "rounds": 2}
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    proc = subprocess.run([sys.executable, "-m", "shoal.cli", "launch", *sets, "--dir",
                           str(tmp_path / "work"), "--out", str(tmp_path / "runs"), "--json",
                           "-q", "--no-dashboard"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["rounds"] == 2
    acc = RdpAccountant(list(ORDERS), NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_event.SampledWithoutReplacementDpEvent(N, N, dp_event.GaussianDpEvent(Z / 2)),
                2)
    assert summary["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    (run,) = (tmp_path / "runs").iterdir()
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("privacy_ddg_noise_shares") for r in rounds[1:]] == [float(N)] * 2
