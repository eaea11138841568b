"""The sans-I/O gossip node: synchronous mixing whatever the message order, refusals that
change nothing, churn, rejoin, and a trimmed mean that contains a Byzantine neighbour."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import ProtocolError
from shoal.gossip.mixing import OnePeerExponential, StaticSchedule, metropolis_hastings
from shoal.gossip.network import InMemoryNetwork
from shoal.gossip.node import Answer, GossipNode, Leave, Offer
from shoal.gossip.rules import TrimmedMean, trimmed_mean
from shoal.gossip.topology import complete, random_regular, ring, torus


def _nodes(schedule, x, **kw):
    return [GossipNode(i, schedule, x[i], **kw) for i in range(schedule.n)]


def _stack(nodes):
    return np.stack([n.params for n in nodes])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), loss=st.sampled_from([0.0, 0.2, 0.5]),
       duplicate=st.sampled_from([0.0, 0.3]), topo=st.sampled_from(["ring", "torus", "exp"]))
def test_any_delivery_order_losses_and_duplicates_give_exactly_w_times_y(seed, loss, duplicate,
                                                                      topo):
    rng = np.random.default_rng(seed)
    sched = {"ring": lambda: StaticSchedule(metropolis_hastings(ring(8))),
             "torus": lambda: StaticSchedule(metropolis_hastings(torus(9))),
             "exp": lambda: OnePeerExponential(8)}[topo]()
    x = rng.normal(size=(sched.n, 5)).astype(np.float32)
    # retries enough that no neighbour is ever given up on: the result must be exact
    nodes = _nodes(sched, x, max_attempts=10_000)
    net = InMemoryNetwork(nodes, rng=rng, loss=loss, duplicate=duplicate)
    shift = rng.normal(size=(3, sched.n, 5)).astype(np.float32)

    def train(peer, step, params):  # a deterministic stand-in for local training
        return params + shift[step, peer]

    want = x.astype(np.float64)
    for t in range(3):
        net.step(train)
        want = sched.at(t).to_dense() @ (want + shift[t])
    assert np.abs(_stack(nodes) - want).max() < 1e-5
    assert all(n.step == 3 and not n.down for n in nodes)


def test_push_pull_costs_one_model_each_way_per_edge():
    sched = StaticSchedule(metropolis_hastings(ring(10)))
    nodes = _nodes(sched, np.ones((10, 3), np.float32))
    out = InMemoryNetwork(nodes).step()
    assert sum(n.stats.models_sent for n in nodes) == 2 * 10  # 10 edges, both directions
    assert out.delivered <= 2 * 10  # a pull saves the call back


def _waiting_node():
    sched = StaticSchedule(metropolis_hastings(ring(6)))
    node = GossipNode(0, sched, np.zeros(4, np.float32))
    node.offer(0, np.zeros(4, np.float32), now=0.0)
    return node


@pytest.mark.parametrize("offer, reason", [
    (Offer(1, 0, np.zeros(3, np.float32)), "wrong_shape"),
    (Offer(1, 0, np.zeros(4, np.float64)), "wrong_shape"),
    (Offer(1, 0, np.array([0, np.nan, 0, 0], np.float32)), "non_finite"),
    (Offer(1, 0, np.array([0, np.inf, 0, 0], np.float32)), "non_finite"),
    (Offer(3, 0, np.zeros(4, np.float32)), "not_neighbour"),
    (Offer(0, 0, np.zeros(4, np.float32)), "not_neighbour"),  # itself
    (Offer(99, 0, np.zeros(4, np.float32)), "not_neighbour"),
    (Offer(1, -1, np.zeros(4, np.float32)), "stale"),
])
def test_garbage_is_refused_with_its_reason_and_changes_nothing(offer, reason):
    node = _waiting_node()
    before = (node.step, node.params.copy(), node.missing())
    answer = node.handle(offer, now=1.0)
    assert isinstance(answer, Answer) and not answer.accepted and answer.reason == reason
    assert answer.params is None  # nothing leaks to a refused caller
    assert (node.step, node.missing()) == (before[0], before[2])
    assert np.array_equal(node.params, before[1])
    assert node.stats.refused[reason] == 1


def test_an_offer_far_ahead_is_refused_and_tells_the_peer_it_is_behind():
    node = _waiting_node()
    node.handle(Offer(1, 0, np.ones(4, np.float32)), 0.0)  # received, then superseded
    answer = node.handle(Offer(1, 7, np.full(4, 9, np.float32)), 0.0)
    assert (answer.accepted, answer.reason, answer.params) == (False, "ahead", None)
    # a neighbour 7 steps on has passed this peer over: it catches up, keeping its own model
    assert node.step == 7 and node.stats.jumps == 1 and not node.waiting
    assert np.array_equal(node.params, np.zeros(4, np.float32))


def test_a_second_different_model_for_the_same_step_is_a_conflict():
    node = _waiting_node()
    first = np.ones(4, np.float32)
    assert node.handle(Offer(1, 0, first), 0.0).accepted
    assert node.handle(Offer(1, 0, first.copy()), 0.0).accepted  # a duplicate is fine
    answer = node.handle(Offer(1, 0, 2 * first), 0.0)
    assert answer.reason == "conflict"
    node.handle(Offer(5, 0, first), 0.0)
    assert np.allclose(node.mix().params, 2 / 3)  # (0 + 1 + 1) / 3: the first model kept


def test_offer_before_training_is_kept_and_answered_later_by_a_push():
    sched = StaticSchedule(metropolis_hastings(ring(6)))
    node = GossipNode(0, sched, np.zeros(2, np.float32))
    answer = node.handle(Offer(1, 0, np.ones(2, np.float32)), 0.0)
    assert answer.accepted and answer.params is None  # not trained yet: nothing to pull
    sends = node.offer(0, np.zeros(2, np.float32), 0.0)
    assert {s.to for s in sends} == {1, 5}
    to_1 = next(s.message for s in sends if s.to == 1)
    assert not to_1.wants  # its model is already here


def test_mixing_before_every_model_is_in_is_a_protocol_error():
    node = _waiting_node()
    with pytest.raises(ProtocolError, match="waiting for"):
        node.mix()


def test_a_neighbour_that_misses_the_deadline_is_mixed_without():
    node = _waiting_node()
    node.handle(Offer(1, 0, np.full(4, 3, np.float32)), 0.0)
    assert node.tick(0.5) == [] and not node.ready
    probes = node.tick(1.5)  # probe_s = 1: re-push to the missing neighbour
    assert [s.to for s in probes] == [5]
    node.tick(31.0)  # past step_timeout_s
    assert node.ready and node.down == {5}
    res = node.mix()
    assert res.absent == (5,) and np.allclose(res.params, 1.0)  # (0 + 0 + 3) / 3, weight kept
    # the neighbour is heard from again: waited for in the next step
    node.handle(Offer(5, 1, np.zeros(4, np.float32)), 32.0)
    assert 5 not in node.down


def test_a_leaving_neighbour_is_not_waited_for():
    node = _waiting_node()
    node.handle(Offer(1, 0, np.ones(4, np.float32)), 0.0)
    assert node.handle(Leave(5), 0.0) is None
    assert node.ready


def test_dead_peers_are_passed_over_and_the_rest_reach_consensus():
    rng = np.random.default_rng(0)
    sched = StaticSchedule(metropolis_hastings(torus(16)))
    x = rng.normal(size=(16, 3)).astype(np.float32)
    nodes = _nodes(sched, x)
    net = InMemoryNetwork(nodes, rng=rng, dead=[5])
    for _ in range(60):
        net.step()
    live = [n for n in nodes if n.peer != 5]
    spread = np.ptp(np.stack([n.params for n in live]), axis=0).max()
    assert spread < 1e-4
    assert all(5 in n.down for n in live if 5 in n.senders())
    assert np.array_equal(nodes[5].params, x[5])


def test_a_restarted_peer_jumps_to_its_neighbours_step_and_keeps_its_model():
    sched = StaticSchedule(metropolis_hastings(ring(6)))
    x = np.arange(6, dtype=np.float32)[:, None] * np.ones((6, 2), np.float32)
    nodes = _nodes(sched, x)
    net = InMemoryNetwork(nodes, dead=[2])
    for _ in range(5):
        net.step()
    back = GossipNode(2, sched, x[2], step=0)  # restarted from an old checkpoint
    nodes[2] = back
    net = InMemoryNetwork(nodes)
    net.step()
    assert back.stats.jumps == 1
    assert all(n.step == 6 for n in nodes)
    for _ in range(80):
        net.step()
    assert np.ptp(_stack(nodes), axis=0).max() < 1e-3


def test_with_a_trimmed_mean_one_liar_cannot_make_a_peer_jump():
    sched = StaticSchedule(metropolis_hastings(complete(5)))
    node = GossipNode(0, sched, np.zeros(2, np.float32), rule=TrimmedMean(1))
    node.answered(Answer(1, 10**9, 0, False, "stale"), 0.0)
    assert node.step == 0
    node.answered(Answer(2, 40, 0, False, "stale"), 0.0)
    assert node.step == 40  # two reports: the second largest step, not the liar's


@pytest.mark.parametrize("trim", [1, 2])
def test_trimmed_mean_matches_its_definition(trim):
    rng = np.random.default_rng(trim)
    v = rng.normal(size=(3, 7, 11)).astype(np.float32)
    got = trimmed_mean(v, trim)
    for a in range(3):
        for d in range(11):
            col = sorted(v[a, :, d].tolist())
            assert got[a, d] == pytest.approx(np.mean(col[trim:7 - trim]), rel=1e-6)
    with pytest.raises(ValueError, match="more than"):
        trimmed_mean(v[:, :2], 1)


def _byzantine_run(rule):
    """A random 6-regular network of 12 peers where peer 0 offers its model + 1000 (on a
    sparser graph the trimmed mean can stall short of consensus: docs/gossip.md)."""
    rng = np.random.default_rng(7)
    sched = StaticSchedule(metropolis_hastings(random_regular(12, 6, rng)))
    x = rng.uniform(-1, 1, size=(12, 6)).astype(np.float32)
    kw = {} if rule is None else {"rule": rule}
    nodes = _nodes(sched, x, **kw)
    net = InMemoryNetwork(nodes, rng=rng)

    def train(peer, step, params):
        return params + 1000 if peer == 0 else params

    for _ in range(30):
        net.step(train)
    honest = np.stack([n.params for n in nodes[1:]])
    return x[1:], honest


def test_trimmed_mean_keeps_honest_peers_inside_the_honest_range():
    start, honest = _byzantine_run(TrimmedMean(1))
    lo, hi = start.min(axis=0), start.max(axis=0)
    assert (honest >= lo - 1e-6).all() and (honest <= hi + 1e-6).all()
    # and the honest peers still agree with one another
    assert np.ptp(honest, axis=0).max() < 1e-3 * np.ptp(start, axis=0).max()


def test_plain_averaging_is_dragged_away_by_the_same_byzantine_peer():
    start, honest = _byzantine_run(None)
    assert honest.max() > start.max() + 100


def test_a_peers_checkpoint_and_trace_survive_a_kill_mid_write(tmp_path):
    from shoal.errors import DataError
    from shoal.gossip.state import append_trace, load_state, read_trace, save_state

    models = [np.full(5, k, np.float32) for k in range(3)]
    assert load_state(tmp_path / "state.shc", 5) is None
    save_state(tmp_path / "state.shc", 7, models[1])
    step, params = load_state(tmp_path / "state.shc", 5)
    assert step == 7 and np.array_equal(params, models[1])
    with pytest.raises(DataError, match="another size|parameters"):
        load_state(tmp_path / "state.shc", 6)
    trace = tmp_path / "trace.shc"
    for k, m in enumerate(models):
        append_trace(trace, k, m)
    whole = trace.read_bytes()
    assert [(s, p.tolist()) for s, p in read_trace(trace, 5)] == \
        [(k, m.tolist()) for k, m in enumerate(models)]
    frame = len(whole) // 3
    for cut in (len(whole) - 3, 2 * frame + 10):  # torn in the last frame, in its header
        trace.write_bytes(whole[:cut])
        assert [s for s, _ in read_trace(trace, 5)] == [0, 1]
    corrupt = bytearray(whole)
    corrupt[frame + frame // 2] ^= 0xFF  # a bit flipped inside the second frame
    trace.write_bytes(bytes(corrupt))
    with pytest.raises(DataError, match="corrupt trace frame 1"):
        read_trace(trace, 5)
    (tmp_path / "state.shc").write_bytes(whole[:frame - 1])
    with pytest.raises(DataError, match="corrupt checkpoint"):
        load_state(tmp_path / "state.shc", 5)
