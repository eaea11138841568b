"""The sans-I/O secure-aggregation device round, driven in memory by real client machines.

Devices pull: each step every live device either sends its pending message or polls; the
round's own clock is the ``now`` argument. The oracle is the plain weighted mean of the
included devices' (clipped, quantized) inputs, computed independently of the protocol.
"""

from __future__ import annotations

import numpy as np
import pytest

from shoal.device_task import ComeBack, Task
from shoal.device_secagg import End, SecAggDeviceRound, Wait
from shoal.errors import UpdateRejected
from shoal.privacy.secagg_client import SecAggClient
from shoal.privacy.secagg_driver import SecAggConfig
from shoal.privacy.secagg_encoding import FixedPoint
from shoal.privacy.secagg_messages import (
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    RoundSetup,
    Stage,
)

D = 40
ENC = FixedPoint(clip=1.0, value_bits=16, max_weight=8)


def config_for(n: int) -> SecAggConfig:
    return SecAggConfig(ENC, None, (n - 1) // 2 + 1)


def make_round(n=6, *, target=None, min_accepted=3, roster_wait_s=5.0, stage_timeout_s=2.0,
               deadline_s=20.0):
    devices = [f"d{i}" for i in range(n)]
    return SecAggDeviceRound(1, 4, 3, devices, target=target or n, min_accepted=min_accepted,
                             opened_at=0.0, input_deadline=deadline_s, dim=D,
                             config_for=config_for,
                             roster_wait_s=roster_wait_s, stage_timeout_s=stage_timeout_s,
                             client_ids=[10 + i for i in range(n)])


class Device:
    def __init__(self, rnd, device_id, x, weight, die_after=None):
        self.rnd, self.id, self.x, self.weight = rnd, device_id, x, weight
        self.die_after = die_after
        self.task = None
        self.client = None
        self.pending = None
        self.end = None
        self.alive = True

    def step(self, now, rng):
        if not self.alive or self.end is not None:
            return
        if self.task is None:
            d = self.rnd.check_in(self.id, now, rng=rng)
            if isinstance(d, Task):
                self.task = d
            return
        try:
            reply = self.rnd.exchange(self.id, 4, 3, self.task.upload_key, self.pending, now)
        except UpdateRejected as exc:
            assert exc.reason == "late", exc  # a straggler; it polls on and learns its fate
            self.late = True
            reply = Wait("?")
        self.pending = None
        if isinstance(reply, Wait):
            return
        if isinstance(reply, End):
            self.end = reply
            return
        if isinstance(reply, RoundSetup):
            self.client = SecAggClient(self.rnd.client_id(self.id))
        out = self.client.handle(reply)
        if isinstance(out, EncryptedShares):  # "train" while the stage closes
            self.client.set_input(ENC.encode(self.x, self.weight, self.client.params.bits, rng))
        self.pending = out
        if self.die_after is not None and self.client.stage is self.die_after:
            # the message is sent, then the device vanishes
            self.rnd.exchange(self.id, 4, 3, self.task.upload_key, self.pending, now)
            self.alive = False


def drive(rnd, devices, steps=1000, dt=0.05, rng=None):
    rng = rng or np.random.default_rng(0)
    for i in range(steps):
        now = i * dt
        rnd.tick(now)
        for dev in devices:
            dev.step(now, rng)
        if rnd.status().done:
            return now
    raise AssertionError(f"round not done: {rnd.status()}")


def expected_mean(devices, included_ids, rnd):
    # oracle: decode each included device's own encoding separately... the encoding is
    # stochastic, so compare the decoded mean with the exact clipped weighted mean instead
    xs = [np.clip(d.x, -1, 1) for d in devices if rnd.client_id(d.id) in included_ids]
    ws = [d.weight for d in devices if rnd.client_id(d.id) in included_ids]
    return np.average(np.stack(xs), axis=0, weights=ws)


def inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.2, 1.2, size=(n, D)), rng.integers(1, 9, size=n)


@pytest.mark.parametrize("die", [None, Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS,
                                 Stage.MASKED_INPUT])
def test_the_round_recovers_from_devices_vanishing_after_any_stage(die):
    rnd = make_round(7)
    xs, ws = inputs(7)
    devices = [Device(rnd, f"d{i}", xs[i], int(ws[i]),
                      die_after=die if i in (1, 4) else None) for i in range(7)]
    drive(rnd, devices)
    st = rnd.status()
    assert st.commit, st.error
    total, included = rnd.result()
    expect_in = {10 + i for i in range(7)} - ({11, 14} if die in (Stage.ADVERTISE_KEYS,
                                                                   Stage.SHARE_KEYS) else set())
    assert included == expect_in
    mean, weight = ENC.decode(total)
    assert weight == sum(int(ws[c - 10]) for c in included)
    np.testing.assert_allclose(mean, expected_mean(devices, included, rnd), atol=ENC.step)
    for dev in devices:
        if dev.alive:
            assert dev.end.outcome == "done"
    if die is not None:
        assert rnd.dropped_at  # the stage that lost them is recorded


def test_devices_that_never_check_in_are_left_off_the_roster():
    rnd = make_round(6, roster_wait_s=1.0)
    xs, ws = inputs(6)
    devices = [Device(rnd, f"d{i}", xs[i], int(ws[i])) for i in range(6)]
    devices[5].alive = False  # never checks in
    drive(rnd, devices)
    assert rnd.status().roster == 5 and rnd.status().commit
    assert rnd.result()[1] == {10, 11, 12, 13, 14}
    # after the roster closed, a late device gets no task
    late = rnd.check_in("d5", 100.0, rng=np.random.default_rng(0))
    assert isinstance(late, ComeBack) and late.reason == "round_closed"


def test_target_closes_input_collection_and_stragglers_masks_are_removed():
    rnd = make_round(7, target=5)  # t = 4: each of 5 inputs keeps 4 live neighbours
    xs, ws = inputs(7, seed=3)
    devices = [Device(rnd, f"d{i}", xs[i], int(ws[i])) for i in range(7)]
    rng = np.random.default_rng(0)
    now = 0.0
    # run until input collection opens, then let only four devices send inputs
    while rnd.status().stage is not Stage.MASKED_INPUT:
        rnd.tick(now)
        for dev in devices:
            dev.step(now, rng)
        now += 0.05
    for dev in devices[:5]:
        while dev.client.stage is not Stage.MASKED_INPUT:
            dev.step(now, rng)
        dev.step(now, rng)  # delivers the masked input
    rnd.tick(now)
    assert rnd.status().stage is Stage.UNMASKING
    drive(rnd, devices)
    total, included = rnd.result()
    assert included == {10, 11, 12, 13, 14}
    mean, _ = ENC.decode(total)
    np.testing.assert_allclose(mean, expected_mean(devices, included, rnd), atol=ENC.step)
    assert {d.end.outcome for d in devices[5:]} == {"dropped"}
    assert all(getattr(d, "late", False) for d in devices[5:])
    assert rnd.rejections == {"late": 2}


def test_too_few_inputs_abort_before_unmasking_and_reveal_nothing():
    rnd = make_round(6, min_accepted=5)
    xs, ws = inputs(6)
    devices = [Device(rnd, f"d{i}", xs[i], int(ws[i]),
                      die_after=Stage.SHARE_KEYS if i < 2 else None) for i in range(6)]
    drive(rnd, devices, steps=2000)
    st = rnd.status()
    assert st.phase == "aborted" and "needs 5" in st.error
    assert rnd.server is None  # the masked sum and every share are gone
    with pytest.raises(Exception, match="no result"):
        rnd.result()
    assert {d.end.outcome for d in devices if d.alive} == {"aborted"}


def test_too_few_devices_checking_in_aborts_the_round():
    rnd = make_round(6, roster_wait_s=0.5)
    rnd.check_in("d0", 0.0, rng=np.random.default_rng(0))
    rnd.tick(1.0)
    assert rnd.status().phase == "aborted" and "checked in" in rnd.status().error


def test_bad_messages_are_refused_with_a_reason_and_change_nothing():
    rnd = make_round(4)
    rng = np.random.default_rng(0)
    tasks = {d: rnd.check_in(d, 0.0, rng=rng) for d in ("d0", "d1", "d2", "d3")}
    rnd.tick(0.1)
    setup = rnd.exchange("d0", 4, 3, tasks["d0"].upload_key, None, 0.1)
    assert isinstance(setup, RoundSetup)
    client = SecAggClient(10)
    adv = client.handle(setup)

    def refused(reason, *args):
        with pytest.raises(UpdateRejected) as info:
            rnd.exchange(*args)
        assert info.value.reason == reason

    refused("bad_key", "d0", 4, 3, "0" * 32, adv, 0.2)
    refused("wrong_round", "d0", 5, 3, tasks["d0"].upload_key, adv, 0.2)
    refused("stale", "d0", 4, 2, tasks["d0"].upload_key, adv, 0.2)
    refused("not_selected", "dx", 4, 3, tasks["d0"].upload_key, adv, 0.2)
    # d1 presenting d0's advertisement (its own key, another sender)
    refused("wrong_sender", "d1", 4, 3, tasks["d1"].upload_key, adv, 0.2)
    forged = KeyAdvertisement(b"x" * 16, 10, adv.enc_public, adv.mask_public)
    refused("protocol", "d0", 4, 3, tasks["d0"].upload_key, forged, 0.2)  # wrong session
    early = MaskedInput(setup.session, 10, np.zeros(D + 1, np.uint32))
    refused("wrong_stage", "d0", 4, 3, tasks["d0"].upload_key, early, 0.2)
    assert rnd.rejections == {"bad_key": 1, "wrong_round": 1, "stale": 1, "not_selected": 1,
                              "wrong_sender": 1, "protocol": 1, "wrong_stage": 1}
    # none of that counted: the genuine message is still taken, once
    assert isinstance(rnd.exchange("d0", 4, 3, tasks["d0"].upload_key, adv, 0.3), Wait)
    assert isinstance(rnd.exchange("d0", 4, 3, tasks["d0"].upload_key, adv, 0.3), Wait)
    assert rnd.replays == 1


def test_close_aborts_an_unfinished_round():
    rnd = make_round(4)
    assert rnd.close("server shutdown").phase == "aborted"
    assert isinstance(rnd.check_in("d0", 0.1, rng=np.random.default_rng(0)), ComeBack)
