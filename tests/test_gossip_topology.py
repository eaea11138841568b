"""Gossip topologies, mixing weights and spectral gaps, against closed forms and definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shoal.errors import ConfigError
from shoal.gossip.mixing import (MixingMatrix, OnePeerExponential, StaticSchedule,
                                 max_degree, metropolis_hastings, spectrum)
from shoal.gossip.topology import (Topology, clique_skew, complete, d_cliques, erdos_renyi,
                                   random_regular, ring, torus)


def _edge_set(top: Topology) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in top.edges}


def test_ring_links_each_peer_to_its_two_neighbours():
    top = ring(7)
    assert _edge_set(top) == {(i, i + 1) for i in range(6)} | {(0, 6)}
    assert (top.degrees() == 2).all() and top.is_connected()


def test_torus_is_a_wrapped_grid_with_four_neighbours_each():
    top = torus(12)  # 3 x 4
    assert (top.degrees() == 4).all()
    assert set(top.neighbours(0).tolist()) == {1, 3, 4, 8}  # right, left (wrap), down, up
    with pytest.raises(ConfigError, match="rows x cols"):
        torus(13)


@pytest.mark.parametrize("n", [16, 64, 256])
def test_ring_metropolis_weights_are_one_third_and_lambda2_matches_the_closed_form(n):
    w = metropolis_hastings(ring(n))
    assert np.allclose(w.weights, 1 / 3)
    lam = 1 / 3 + 2 / 3 * math.cos(2 * math.pi / n)
    s = spectrum(StaticSchedule(w))
    assert s.lambda2 == pytest.approx(lam, abs=1e-12)
    assert s.gap == pytest.approx(1 - lam, abs=1e-12)


def test_torus_lambda2_matches_the_eigenvalues_of_the_grid():
    rows, cols = 4, 5
    w = metropolis_hastings(torus(rows * cols, rows))
    assert np.allclose(w.weights, 1 / 5)
    # W = (I + shifts in both directions) / 5 is diagonalised by the 2-D Fourier basis
    eig = [(1 + 2 * math.cos(2 * math.pi * a / rows) + 2 * math.cos(2 * math.pi * b / cols)) / 5
           for a in range(rows) for b in range(cols) if (a, b) != (0, 0)]
    assert spectrum(StaticSchedule(w)).lambda2 == pytest.approx(max(map(abs, eig)), abs=1e-12)


def test_complete_graph_averages_in_one_step():
    w = metropolis_hastings(complete(9))
    assert np.allclose(w.to_dense(), 1 / 9)
    assert spectrum(StaticSchedule(w)).lambda2 == pytest.approx(0.0, abs=1e-12)


def test_metropolis_weights_follow_the_definition_on_an_irregular_graph():
    top = Topology(5, np.array([[0, 1], [0, 2], [0, 3], [3, 4]]), "star-ish")
    d = [3, 1, 1, 2, 1]
    w = metropolis_hastings(top).to_dense()
    for a, b in top.edges:
        assert w[a, b] == w[b, a] == pytest.approx(1 / (1 + max(d[a], d[b])))
    assert np.allclose(w.sum(0), 1) and np.allclose(w.sum(1), 1)
    assert np.allclose(np.diag(w), 1 - (w.sum(1) - np.diag(w)))
    md = max_degree(top).to_dense()
    assert md[0, 1] == pytest.approx(1 / 4) and md[4, 4] == pytest.approx(1 - 1 / 4)


def test_a_matrix_that_is_not_doubly_stochastic_is_refused():
    w = MixingMatrix.from_dense(np.array([[0.5, 0.5], [0.2, 0.8]]), "bad")
    with pytest.raises(ConfigError, match="column 0 sums to"):
        StaticSchedule(w)


def test_one_peer_exponential_averages_exactly_every_log2_n_steps_for_a_power_of_two():
    sched = OnePeerExponential(16)
    assert sched.period == 4
    x = np.random.default_rng(0).normal(size=(16, 3))
    y = x.copy()
    for t in range(4):
        w = sched.at(t)
        assert w.senders(5) == ((5 - 2 ** t) % 16,) and w.receivers(5) == ((5 + 2 ** t) % 16,)
        y = w.to_dense() @ y
    assert np.allclose(y, x.mean(0), atol=1e-12)
    assert spectrum(sched).lambda2 == pytest.approx(0.0, abs=1e-9)
    # not a power of two: no exact averaging, but still contracting
    assert 0.0 < spectrum(OnePeerExponential(12)).lambda2 < 1.0


def test_random_regular_graph_is_simple_regular_connected_and_random():
    rng = np.random.default_rng(0)
    graphs = [random_regular(30, 4, rng) for _ in range(3)]
    for top in graphs:
        assert (top.degrees() == 4).all() and top.is_connected()
        assert len(_edge_set(top)) == 60  # Topology refuses loops and repeats on its own
    assert _edge_set(graphs[0]) != _edge_set(graphs[1])
    with pytest.raises(ConfigError, match="must be even"):
        random_regular(7, 3, rng)


def test_erdos_renyi_edge_count_is_binomial_and_the_graph_connected():
    rng = np.random.default_rng(1)
    n, p = 100, 0.1
    counts = [erdos_renyi(n, p, rng).num_edges for _ in range(5)]
    pairs = n * (n - 1) / 2
    sd = math.sqrt(pairs * p * (1 - p))
    assert all(abs(c - pairs * p) < 5 * sd for c in counts)
    with pytest.raises(ConfigError, match="disconnected"):
        erdos_renyi(100, 0.005, rng, max_draws=3)


def _two_labels_per_peer(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    counts = np.zeros((n, classes))
    for i in range(n):
        counts[i, rng.choice(classes, size=2, replace=False)] = 300
    return counts


def test_d_cliques_cover_the_labels_with_a_tenth_of_the_edges():
    rng = np.random.default_rng(0)
    counts = _two_labels_per_peer(100, 10, rng)
    top = d_cliques(counts, 10, np.random.default_rng(1))
    assert [len(c) for c in top.cliques] == [10] * 10
    assert top.num_edges == 10 * 45 + 45  # cliques, plus one edge per pair of cliques
    assert top.is_connected()
    assert top.num_edges / complete(100).num_edges < 0.11
    for c in top.cliques:  # each clique fully connected
        sub = {(a, b) for a, b in _edge_set(top) if a in c and b in c}
        assert len(sub) == 45
    # Greedy Swap leaves far less label skew than random cliques of the same size
    random_cliques = np.array_split(np.random.default_rng(2).permutation(100), 10)
    swapped = np.mean([clique_skew(counts, c) for c in top.cliques])
    unswapped = np.mean([clique_skew(counts, c) for c in random_cliques])
    assert swapped < 0.5 * unswapped
    # the inter-clique edges land on different members (least connected first)
    inter = [(a, b) for a, b in _edge_set(top)
             if not any(a in c and b in c for c in top.cliques)]
    per_peer = np.bincount(np.ravel(inter), minlength=100)
    assert per_peer.max() == 1


def test_d_cliques_ring_of_cliques_and_bad_sizes():
    counts = _two_labels_per_peer(40, 10, np.random.default_rng(3))
    top = d_cliques(counts, 10, np.random.default_rng(4), interclique="ring")
    assert top.num_edges == 4 * 45 + 4 and top.is_connected()
    with pytest.raises(ConfigError, match="clique_size"):
        d_cliques(counts, 1, np.random.default_rng(0))


@pytest.mark.parametrize("build", [
    lambda: ring(10), lambda: torus(16), lambda: complete(6),
    lambda: random_regular(20, 3, np.random.default_rng(0)),
    lambda: erdos_renyi(30, 0.2, np.random.default_rng(0)),
    lambda: d_cliques(_two_labels_per_peer(30, 10, np.random.default_rng(0)), 10,
                      np.random.default_rng(0)),
])
def test_every_topology_gets_symmetric_doubly_stochastic_weights_with_a_gap(build):
    top = build()
    for w in (metropolis_hastings(top), max_degree(top)):
        w.check()
        dense = w.to_dense()
        assert np.allclose(dense, dense.T) and (dense >= 0).all()
        s = spectrum(StaticSchedule(w))
        # the gap from the dense eigen-decomposition, recomputed independently
        eig = np.sort(np.abs(np.linalg.eigvals(dense)))[::-1]
        assert s.lambda2 == pytest.approx(eig[1], abs=1e-9)
        assert 0 < s.gap <= 1
