"""Mixing weights W, schedules of them over steps, and how fast they reach consensus.

One gossip step replaces every peer's model by a weighted average of the models it receives:
``x_i <- sum_j W_ij x_j`` (D-PSGD: Lian et al., "Can Decentralized Algorithms Outperform
Centralized Algorithms? A Case Study for Decentralized Parallel Stochastic Gradient Descent",
NeurIPS 2017). With W doubly stochastic the average of the models never changes, and the
consensus distance ``sqrt(1/n sum_i ||x_i - mean||^2)`` shrinks by at most
``lambda_2 = ||W - 11^T/n||_2`` per step -- for a symmetric W the second-largest eigenvalue
modulus. ``1 - lambda_2`` is the spectral gap.

Weights:

* :func:`metropolis_hastings` (the default): ``W_ij = 1 / (1 + max(d_i, d_j))`` on each edge,
  the rest on the diagonal (Xiao, Boyd and Lall, "A Scheme for Robust Distributed Sensor
  Fusion Based on Average Consensus", IPSN 2005): symmetric and doubly stochastic on any
  graph, computed from the two end points' degrees alone. On a ring it is 1/3 everywhere.
* :func:`max_degree`: ``1 / (1 + d_max)`` on every edge (Xiao and Boyd, "Fast Linear
  Iterations for Distributed Averaging", Systems & Control Letters, 2004).
* :class:`OnePeerExponential`: time-varying; at step t peer i averages half-half with peer
  ``i - 2^(t mod tau)``, ``tau = ceil(log2 n)`` (Ying et al., "Exponential Graph is Provably
  Efficient for Decentralized Deep Training", NeurIPS 2021): one neighbour per step, and for
  n a power of two any tau consecutive steps average exactly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from shoal.errors import ConfigError
from shoal.gossip.topology import Topology

__all__ = ["MixingMatrix", "Schedule", "StaticSchedule", "OnePeerExponential",
           "metropolis_hastings", "max_degree", "Spectrum", "spectrum", "MAX_DENSE_PEERS"]

MAX_DENSE_PEERS = 4096
"""Largest network whose spectrum :func:`spectrum` computes (densely, in float64)."""


@dataclass(frozen=True, eq=False)
class MixingMatrix:
    """A sparse n x n mixing matrix in CSR form: row ``i`` holds the weights peer ``i`` gives
    to the models it mixes, its own included.

    Attributes:
        n: peers.
        indptr, indices, weights: CSR (``weights`` float64, columns ascending in each row).
        name: what built it.
    """

    n: int
    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    name: str = ""

    @classmethod
    def from_dense(cls, w: np.ndarray, name: str = "") -> MixingMatrix:
        """The non-zeros of a dense ``(n, n)`` matrix."""
        w = np.asarray(w, dtype=np.float64)
        if w.ndim != 2 or w.shape[0] != w.shape[1]:
            raise ConfigError(f"a mixing matrix must be square, got shape {w.shape}")
        rows, cols = np.nonzero(w)
        indptr = np.zeros(len(w) + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=len(w)), out=indptr[1:])
        return cls(len(w), indptr, cols.astype(np.int64), w[rows, cols], name)

    @classmethod
    def from_edges(cls, n: int, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray,
                   name: str = "") -> MixingMatrix:
        """From coordinate lists (each (row, column) once)."""
        order = np.lexsort((cols, rows))
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return cls(n, indptr, np.asarray(cols, np.int64)[order],
                   np.asarray(weights, np.float64)[order], name)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(peers, weights)`` of row ``i`` (peer ``i`` itself included when non-zero)."""
        a, b = self.indptr[i], self.indptr[i + 1]
        return self.indices[a:b], self.weights[a:b]

    def to_dense(self) -> np.ndarray:
        w = np.zeros((self.n, self.n))
        rows = np.repeat(np.arange(self.n), np.diff(self.indptr))
        w[rows, self.indices] = self.weights
        return w

    @functools.cached_property
    def transposed(self) -> MixingMatrix:
        """Column ``i`` as a row: who mixes peer ``i``'s model, with which weight."""
        rows = np.repeat(np.arange(self.n), np.diff(self.indptr))
        return MixingMatrix.from_edges(self.n, self.indices, rows, self.weights, self.name)

    def senders(self, i: int) -> tuple[int, ...]:
        """The peers whose models peer ``i`` mixes (itself excluded)."""
        peers, _ = self.row(i)
        return tuple(int(p) for p in peers if p != i)

    def receivers(self, i: int) -> tuple[int, ...]:
        """The peers that mix peer ``i``'s model (itself excluded)."""
        return self.transposed.senders(i)

    def check(self, *, tol: float = 1e-9) -> None:
        """Raise unless W is non-negative and doubly stochastic (rows and columns sum to 1).

        Raises:
            ConfigError: naming the first row or column that breaks it.
        """
        if np.any(self.weights < 0):
            raise ConfigError(f"mixing matrix {self.name!r} has a negative weight")
        rows = np.bincount(np.repeat(np.arange(self.n), np.diff(self.indptr)),
                           weights=self.weights, minlength=self.n)
        cols = np.bincount(self.indices, weights=self.weights, minlength=self.n)
        for what, sums in (("row", rows), ("column", cols)):
            bad = np.flatnonzero(np.abs(sums - 1.0) > tol)
            if len(bad):
                raise ConfigError(f"mixing matrix {self.name!r}: {what} {bad[0]} sums to "
                                  f"{sums[bad[0]]!r}, not 1 (W must be doubly stochastic)")


def metropolis_hastings(top: Topology) -> MixingMatrix:
    """Metropolis–Hastings weights of ``top``: ``1 / (1 + max(d_i, d_j))`` per edge."""
    d = top.degrees()
    i, j = top.edges[:, 0], top.edges[:, 1]
    w = 1.0 / (1.0 + np.maximum(d[i], d[j]))
    return _with_diagonal(top, w, "metropolis")


def max_degree(top: Topology) -> MixingMatrix:
    """Max-degree weights of ``top``: ``1 / (1 + d_max)`` on every edge."""
    d_max = int(top.degrees().max()) if top.num_edges else 0
    w = np.full(top.num_edges, 1.0 / (1.0 + d_max))
    return _with_diagonal(top, w, "max_degree")


def _with_diagonal(top: Topology, w: np.ndarray, how: str) -> MixingMatrix:
    n = top.n
    i, j = top.edges[:, 0], top.edges[:, 1]
    off = np.bincount(i, weights=w, minlength=n) + np.bincount(j, weights=w, minlength=n)
    rows = np.concatenate([i, j, np.arange(n)])
    cols = np.concatenate([j, i, np.arange(n)])
    vals = np.concatenate([w, w, 1.0 - off])
    return MixingMatrix.from_edges(n, rows, cols, vals, f"{top.name}/{how}")


class Schedule(Protocol):
    """The mixing matrix of every step: fixed, or periodic in time."""

    @property
    def n(self) -> int: ...

    @property
    def period(self) -> int: ...

    @property
    def name(self) -> str: ...

    def at(self, step: int) -> MixingMatrix:
        """W of gossip step ``step`` (>= 0)."""
        ...


class StaticSchedule:
    """The same W every step."""

    period = 1

    def __init__(self, w: MixingMatrix) -> None:
        w.check()
        self.w = w
        self.n = w.n
        self.name = w.name

    def at(self, step: int) -> MixingMatrix:
        return self.w


class OnePeerExponential:
    """One-peer exponential graph (Ying et al., NeurIPS 2021): at step t, peer i mixes
    ``(x_i + x_{i - 2^m}) / 2`` with ``m = t mod ceil(log2 n)``.

    Raises:
        ConfigError: fewer than 2 peers.
    """

    def __init__(self, n: int) -> None:
        if n < 2:
            raise ConfigError(f"the one-peer exponential graph needs at least 2 peers, got "
                              f"{n}", key="data.clients")
        self.n = n
        self.period = max(1, math.ceil(math.log2(n)))
        self.name = "exponential/one_peer"
        i = np.arange(n)
        self._ws = [MixingMatrix.from_edges(
            n, np.concatenate([i, i]), np.concatenate([i, (i - 2 ** m) % n]),
            np.full(2 * n, 0.5), f"{self.name}[{m}]") for m in range(self.period)]

    def at(self, step: int) -> MixingMatrix:
        return self._ws[step % self.period]


@dataclass(frozen=True)
class Spectrum:
    """How fast a schedule reaches consensus.

    Attributes:
        lambda2: per-step contraction of the consensus distance, ``||W - J||_2``
            (``J = 11^T / n``); for a symmetric W its second-largest eigenvalue modulus. For a
            periodic schedule, the per-step geometric mean over one period,
            ``||W_{p-1} ... W_0 - J||_2 ^ (1 / p)``.
        gap: ``1 - lambda2``, the spectral gap.
        period: steps in one period of the schedule.
    """

    lambda2: float
    gap: float
    period: int


def spectrum(schedule: Schedule) -> Spectrum:
    """The spectral gap of ``schedule``, computed densely (float64).

    Raises:
        ConfigError: more than :data:`MAX_DENSE_PEERS` peers.
    """
    n = schedule.n
    if n > MAX_DENSE_PEERS:
        raise ConfigError(f"the spectrum is computed densely, for at most {MAX_DENSE_PEERS} "
                          f"peers ({n} given)", key="data.clients")
    if n == 1:
        return Spectrum(0.0, 1.0, schedule.period)
    j = np.full((n, n), 1.0 / n)
    if schedule.period == 1:
        w = schedule.at(0).to_dense()
        if np.allclose(w, w.T, atol=1e-12):
            lam = float(np.abs(np.linalg.eigvalsh(w - j)).max())
        else:
            lam = float(np.linalg.norm(w - j, 2))
        return Spectrum(lam, 1.0 - lam, 1)
    prod = np.eye(n)
    for t in range(schedule.period):
        prod = schedule.at(t).to_dense() @ prod
    whole = float(np.linalg.norm(prod - j, 2))
    lam = whole ** (1.0 / schedule.period) if whole > 1e-15 else 0.0
    return Spectrum(lam, 1.0 - lam, schedule.period)
