"""Communication graphs of a peer-to-peer network: who talks to whom.

A :class:`Topology` is an undirected simple graph on peers ``0 .. n-1`` (its edge list, each
edge once with ``i < j``), plus, for D-Cliques, the cliques it was built from. The builders:

* :func:`ring`, :func:`torus` (2-D, wrap-around), :func:`complete`;
* :func:`random_regular` -- a uniformly random-looking k-regular graph by the pairing method
  of Steger and Wormald ("Generating random regular graphs quickly", Combinatorics,
  Probability and Computing, 1999);
* :func:`erdos_renyi` -- G(n, p) (Erdős and Rényi, "On random graphs I", 1959), redrawn
  until connected;
* :func:`d_cliques` -- Bellet, Kermarrec and Lavoie, "D-Cliques: Compensating for Data
  Heterogeneity with Topology in Decentralized Federated Learning" (SRDS 2022): cliques whose
  label mix is close to the global one (random cliques improved by Greedy Swap), joined by
  one edge per pair of cliques (or in a ring of cliques), each inter-clique edge on the
  least-connected members.

The time-varying one-peer exponential graph is not a fixed graph; it is a mixing schedule
(:class:`~shoal.gossip.mixing.OnePeerExponential`). Randomness is an argument: every random
builder takes a :class:`numpy.random.Generator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from shoal.errors import ConfigError

__all__ = ["Topology", "ring", "torus", "complete", "random_regular", "erdos_renyi",
           "d_cliques", "clique_skew"]


@dataclass(frozen=True, eq=False)
class Topology:
    """An undirected simple graph on peers ``0 .. n-1``.

    Attributes:
        n: number of peers.
        edges: int64 ``(m, 2)``, each undirected edge once, ``edges[:, 0] < edges[:, 1]``,
            sorted.
        name: what built it (``"ring"``, ``"d_cliques"``, ...).
        cliques: for D-Cliques, each clique's peers; empty otherwise.

    Raises:
        ConfigError: on construction, fewer than 1 peer, a self-loop, an edge twice or a peer
            outside ``0 .. n-1``.
    """

    n: int
    edges: np.ndarray
    name: str
    cliques: tuple[np.ndarray, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"a topology needs at least 1 peer, got {self.n}",
                              key="data.clients")
        e = np.asarray(self.edges, dtype=np.int64).reshape(-1, 2)
        e = np.sort(e, axis=1)
        if len(e) and (e.min() < 0 or e.max() >= self.n):
            raise ConfigError(f"{self.name}: an edge names a peer outside 0..{self.n - 1}")
        if np.any(e[:, 0] == e[:, 1]):
            raise ConfigError(f"{self.name}: a peer is linked to itself")
        e = e[np.lexsort((e[:, 1], e[:, 0]))]
        if len(e) > 1 and np.any(np.all(e[1:] == e[:-1], axis=1)):
            raise ConfigError(f"{self.name}: an edge is listed twice")
        e.setflags(write=False)
        object.__setattr__(self, "edges", e)

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    def degrees(self) -> np.ndarray:
        """int64 ``(n,)``: each peer's number of neighbours."""
        return np.bincount(self.edges.ravel(), minlength=self.n).astype(np.int64)

    def adjacency(self) -> tuple[np.ndarray, np.ndarray]:
        """Neighbour lists in CSR form: peer ``i``'s neighbours are
        ``indices[indptr[i]:indptr[i + 1]]``, ascending."""
        both = np.concatenate([self.edges, self.edges[:, ::-1]])
        both = both[np.lexsort((both[:, 1], both[:, 0]))]
        indptr = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(np.bincount(both[:, 0], minlength=self.n), out=indptr[1:])
        return indptr, both[:, 1].copy()

    def neighbours(self, peer: int) -> np.ndarray:
        indptr, indices = self.adjacency()
        return indices[indptr[peer]:indptr[peer + 1]]

    def is_connected(self) -> bool:
        """Whether every peer can reach every other (breadth-first search)."""
        if self.n <= 1:
            return True
        indptr, indices = self.adjacency()
        seen = np.zeros(self.n, dtype=bool)
        seen[0] = True
        frontier = np.array([0])
        while len(frontier):
            nxt = np.concatenate([indices[indptr[i]:indptr[i + 1]] for i in frontier])
            nxt = np.unique(nxt[~seen[nxt]])
            seen[nxt] = True
            frontier = nxt
        return bool(seen.all())


def _check_n(n: int, least: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < least:
        raise ConfigError(f"a {what} needs at least {least} peers, got {n!r}",
                          key="data.clients")


def ring(n: int) -> Topology:
    """Peer ``i`` linked to ``i - 1`` and ``i + 1`` (mod n). Needs ``n >= 3``."""
    _check_n(n, 3, "ring")
    i = np.arange(n)
    return Topology(n, np.stack([i, (i + 1) % n], axis=1), "ring")


def torus(n: int, rows: int | None = None) -> Topology:
    """A ``rows x (n / rows)`` grid with wrap-around in both directions: each peer has four
    neighbours. ``rows`` defaults to the largest divisor of ``n`` not above ``sqrt(n)``.

    Raises:
        ConfigError: ``n`` has no factorisation with both sides >= 3 (e.g. a prime).
    """
    _check_n(n, 9, "2-D torus")
    if rows is None:
        rows = max((r for r in range(3, math.isqrt(n) + 1) if n % r == 0), default=0)
    if not rows or n % rows or n // rows < 3 or rows < 3:
        raise ConfigError(f"a 2-D torus of {n} peers needs n = rows x cols with both >= 3 "
                          f"(got rows = {rows or 'none'}); pick another number of peers",
                          key="gossip.topology")
    cols = n // rows
    r, c = np.divmod(np.arange(n), cols)
    right = r * cols + (c + 1) % cols
    down = ((r + 1) % rows) * cols + c
    i = np.arange(n)
    return Topology(n, np.concatenate([np.stack([i, right], 1), np.stack([i, down], 1)]),
                    "torus")


def complete(n: int) -> Topology:
    """Every pair of peers linked (the fully connected graph)."""
    _check_n(n, 2, "complete graph")
    i, j = np.triu_indices(n, k=1)
    return Topology(n, np.stack([i, j], axis=1), "complete")


def random_regular(n: int, degree: int, rng: np.random.Generator,
                   max_restarts: int = 100) -> Topology:
    """A random ``degree``-regular simple graph, connected.

    Steger and Wormald's pairing: each peer holds ``degree`` points; repeatedly join two
    unpaired points of different peers that are not yet linked, chosen uniformly; start over
    when stuck (rare) or when the graph comes out disconnected.

    Raises:
        ConfigError: ``n * degree`` is odd, ``degree`` is not in ``[2, n - 1]``, or no
            connected graph was found in ``max_restarts`` attempts.
    """
    _check_n(n, 3, "random regular graph")
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) \
            or not 2 <= degree <= n - 1:
        raise ConfigError(f"gossip.degree must be an integer in [2, n - 1 = {n - 1}], got "
                          f"{degree!r}", key="gossip.degree")
    if (n * degree) % 2:
        raise ConfigError(f"no {degree}-regular graph on {n} peers exists: n x degree must "
                          f"be even", key="gossip.degree")
    for _ in range(max_restarts):
        edges = _pair_points(n, degree, rng)
        if edges is not None:
            top = Topology(n, edges, "regular")
            if top.is_connected():
                return top
    raise ConfigError(f"found no connected {degree}-regular graph on {n} peers in "
                      f"{max_restarts} attempts", key="gossip.degree")


def _pair_points(n: int, degree: int, rng: np.random.Generator) -> np.ndarray | None:
    free = np.full(n, degree, dtype=np.int64)  # unpaired points per peer
    linked: set[tuple[int, int]] = set()
    out: list[tuple[int, int]] = []
    for _ in range(n * degree // 2):
        # draw two points uniformly among the unpaired ones, until a legal pair comes up
        for _attempt in range(50 * degree):
            u, v = rng.choice(n, size=2, p=free / free.sum())
            a, b = (u, v) if u < v else (v, u)
            if u != v and (a, b) not in linked:
                break
        else:
            return None
        linked.add((int(a), int(b)))
        out.append((int(a), int(b)))
        free[u] -= 1
        free[v] -= 1
    return np.array(out, dtype=np.int64)


def erdos_renyi(n: int, p: float, rng: np.random.Generator, max_draws: int = 100) -> Topology:
    """G(n, p): each pair linked independently with probability ``p``, redrawn until
    connected (connectivity needs about ``p > ln(n) / n``).

    Raises:
        ConfigError: ``p`` outside ``(0, 1]``, or no connected draw in ``max_draws``.
    """
    _check_n(n, 2, "Erdős–Rényi graph")
    if not (isinstance(p, (int, float)) and 0.0 < p <= 1.0):
        raise ConfigError(f"gossip.edge_probability must be in (0, 1], got {p!r}",
                          key="gossip.edge_probability")
    i, j = np.triu_indices(n, k=1)
    for _ in range(max_draws):
        keep = rng.random(len(i)) < p
        top = Topology(n, np.stack([i[keep], j[keep]], axis=1), "erdos_renyi")
        if top.is_connected():
            return top
    raise ConfigError(f"G({n}, {p:g}) came out disconnected {max_draws} times: raise "
                      f"gossip.edge_probability above ln(n)/n = {math.log(n) / n:.3g}",
                      key="gossip.edge_probability")


def clique_skew(label_counts: np.ndarray, members: np.ndarray) -> float:
    """The L1 distance between a clique's label distribution and the global one (the skew
    D-Cliques minimises): ``sum_y |p(y | clique) - p(y)|``."""
    total = label_counts.sum(axis=0)
    mix = label_counts[members].sum(axis=0)
    return float(np.abs(mix / max(mix.sum(), 1) - total / max(total.sum(), 1)).sum())


def d_cliques(label_counts: np.ndarray, clique_size: int, rng: np.random.Generator, *,
              swaps: int = 1000, interclique: str = "full") -> Topology:
    """D-Cliques (Bellet et al., SRDS 2022) for a label-skewed population.

    Peers are dealt into random cliques of ``clique_size`` (the last may be smaller), then
    ``swaps`` times two random cliques are drawn and, if swapping one member of each lowers
    the sum of their skews (:func:`clique_skew`), a random improving swap is made (Greedy
    Swap). Each clique is fully connected inside; cliques are joined by one edge per pair
    (``interclique = "full"``) or in a ring (``"ring"``), each such edge between the members
    of the two cliques that have the fewest inter-clique edges so far.

    Args:
        label_counts: ``(n, classes)`` examples of each class held by each peer.
        clique_size: peers per clique, >= 2 (the paper uses the number of classes).
        rng: draws the initial cliques and the swaps.
        swaps: Greedy Swap iterations.
        interclique: ``"full"`` or ``"ring"``.

    Raises:
        ConfigError: a bad clique size or interclique name.
    """
    counts = np.asarray(label_counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] < 2:
        raise ConfigError("D-Cliques needs a (peers, classes) table of label counts for at "
                          "least 2 peers", key="gossip.topology")
    n = counts.shape[0]
    if isinstance(clique_size, bool) or not isinstance(clique_size, (int, np.integer)) \
            or not 2 <= clique_size <= n:
        raise ConfigError(f"gossip.clique_size must be an integer in [2, {n}], got "
                          f"{clique_size!r}", key="gossip.clique_size")
    if interclique not in ("full", "ring"):
        raise ConfigError(f"gossip.interclique must be 'full' or 'ring', got "
                          f"{interclique!r}", key="gossip.interclique")
    order = rng.permutation(n)
    cliques = [order[s:s + clique_size].copy() for s in range(0, n, clique_size)]
    if len(cliques) > 1:
        _greedy_swap(counts, cliques, rng, swaps)
    cliques = [np.sort(c) for c in cliques]
    edges: list[np.ndarray] = []
    for c in cliques:
        a, b = np.triu_indices(len(c), k=1)
        edges.append(np.stack([c[a], c[b]], axis=1))
    edges.append(_join_cliques(cliques, interclique))
    return Topology(n, np.concatenate(edges), "d_cliques", tuple(cliques))


def _greedy_swap(counts: np.ndarray, cliques: list[np.ndarray], rng: np.random.Generator,
                 swaps: int) -> None:
    """Greedy Swap, in place: each step tries every (member of c1, member of c2) swap at once."""
    p_global = counts.sum(axis=0) / max(counts.sum(), 1.0)
    mixes = [counts[c].sum(axis=0) for c in cliques]

    def skew(mix: np.ndarray) -> np.ndarray:  # (..., classes) -> (...)
        total = mix.sum(axis=-1, keepdims=True)
        return np.abs(mix / np.maximum(total, 1.0) - p_global).sum(axis=-1)

    for _ in range(swaps):
        a, b = rng.choice(len(cliques), size=2, replace=False)
        ca, cb = cliques[a], cliques[b]
        before = skew(mixes[a]) + skew(mixes[b])
        # swapping ca[u] and cb[v]: mix_a - counts[ca[u]] + counts[cb[v]], and back for b
        diff = counts[cb][None, :, :] - counts[ca][:, None, :]           # (|ca|, |cb|, C)
        after = skew(mixes[a] + diff) + skew(mixes[b] - diff)
        better = np.argwhere(after < before - 1e-12)
        if len(better):
            u, v = better[rng.integers(len(better))]
            mixes[a] = mixes[a] + diff[u, v]
            mixes[b] = mixes[b] - diff[u, v]
            ca[u], cb[v] = cb[v], ca[u]


def _join_cliques(cliques: list[np.ndarray], how: str) -> np.ndarray:
    k = len(cliques)
    if k == 1:
        return np.empty((0, 2), dtype=np.int64)
    if how == "full":
        pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    else:
        pairs = [(a, (a + 1) % k) for a in range(k)] if k > 2 else [(0, 1)]
    used = [np.zeros(len(c), dtype=np.int64) for c in cliques]  # inter-clique edges per member
    out = []
    for a, b in pairs:
        u, v = int(np.argmin(used[a])), int(np.argmin(used[b]))
        used[a][u] += 1
        used[b][v] += 1
        out.append((cliques[a][u], cliques[b][v]))
    return np.array(out, dtype=np.int64).reshape(-1, 2)
