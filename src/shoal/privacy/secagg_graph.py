"""SecAgg+ neighbourhoods: random Harary graphs and the (degree, threshold) parameter finder.

Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (CCS 2020): instead of masking with and secret-sharing to every
other client (Bonawitz et al., CCS 2017), each client does so only with its k neighbours in a
random k-regular graph, k = O(log n). The graph is a Harary graph H(n, k) -- nodes on a circle,
each joined to its k/2 predecessors and k/2 successors -- whose labels are permuted by a seed the
server fixes in the round's setup message, before any key is advertised. k = n - 1 is the
complete graph, i.e. the original SecAgg.

:func:`secagg_parameters` reimplements the search of Google's production parameter finder
(``fcp/secagg/server/graph_parameter_finder.cc`` in google/federated-compute; see
docs/references.md, section "SecAgg neighbourhoods"), which turns Bell et al.'s analysis into
concrete numbers: statistical security 2^-40 and failure probability below 2^-20 for a fraction
``corrupt_rate`` of corrupt clients and ``dropout_rate`` of dropouts. It reproduces every row of
that finder's published test table (see the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np

from shoal.errors import ConfigError
from shoal.privacy import crypto

__all__ = [
    "HararyGraph",
    "harary_graph",
    "secagg_parameters",
    "hypergeometric_pmf",
]

SECURITY_BITS = 40
"""Statistical security: the adversary learns an individual input with probability < 2^-40."""
CORRECTNESS_BITS = 20
"""The round fails (too few surviving neighbours) with probability < 2^-20."""
MAX_CLIENTS = 1_000_000
_SMALL = 1e-14  # keeps float rounding of rate * n from erring on the insecure side
_GRAPH_INFO = b"shoal secagg v1 graph permutation"


@dataclass(frozen=True)
class HararyGraph:
    """A Harary graph H(n, k) on roster indices ``0..n-1`` with permuted labels.

    Attributes:
        n: number of nodes.
        k: degree (neighbours per node, self excluded); even, or ``n - 1`` for the complete graph.
        order: ``order[p]`` is the roster index sitting at circle position ``p``.
    """

    n: int
    k: int
    order: np.ndarray = field(repr=False)
    _position: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        order = np.array(self.order, dtype=np.int64)  # own, read-only copy: graphs are cached
        if order.shape != (self.n,) or not np.array_equal(np.sort(order), np.arange(self.n)):
            raise ConfigError(f"order must be a permutation of 0..{self.n - 1}", key="order")
        position = np.empty(self.n, dtype=np.int64)
        position[order] = np.arange(self.n)
        order.flags.writeable = False
        position.flags.writeable = False
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "_position", position)

    @property
    def complete(self) -> bool:
        """True when every node neighbours every other (plain SecAgg)."""
        return self.k == self.n - 1

    def neighbours(self, i: int) -> tuple[int, ...]:
        """Sorted roster indices of node ``i``'s k neighbours (never ``i`` itself)."""
        if not 0 <= i < self.n:
            raise IndexError(f"node {i} outside [0, {self.n})")
        if self.complete:
            return tuple(j for j in range(self.n) if j != i)
        half = self.k // 2
        offsets = np.concatenate([np.arange(-half, 0), np.arange(1, half + 1)])
        return tuple(sorted(int(j) for j in self.order[(self._position[i] + offsets) % self.n]))


@lru_cache(maxsize=16)
def harary_graph(n: int, k: int, seed: bytes | None) -> HararyGraph:
    """The Harary graph H(n, k) with labels permuted by ``seed``.

    Args:
        n: number of nodes (clients in the roster), >= 2.
        k: neighbours per node: even and < n - 1, or exactly n - 1 (complete graph).
        seed: 32-byte public seed fixing the permutation (AES-CTR keys sorted, so every party
            derives the same graph); ``None`` keeps the identity labelling.

    Results are cached (graphs are immutable), so the clients of a simulated round share one.

    Raises:
        ConfigError: ``n`` or ``k`` out of range.
    """
    if n < 2:
        raise ConfigError(f"secure aggregation needs at least 2 clients, got n={n}", key="n")
    if not 1 <= k <= n - 1:
        raise ConfigError(f"neighbours k={k} must be in [1, n-1={n - 1}]", key="neighbours")
    if k < n - 1 and k % 2:
        raise ConfigError(
            f"a Harary graph needs an even degree below n-1; got k={k} with n={n}",
            key="neighbours",
        )
    if seed is None:
        order = np.arange(n, dtype=np.int64)
    else:
        keys = crypto.prg_uint(crypto.derive_key(seed, salt=b"", info=_GRAPH_INFO), n, 64)
        order = np.argsort(keys, kind="stable").astype(np.int64)
    return HararyGraph(n=n, k=k, order=order)


def hypergeometric_pmf(total: int, marked: int, sampled: int) -> tuple[int, np.ndarray]:
    """PMF of the number of marked items in a sample without replacement.

    Returns:
        ``(lo, pmf)`` with ``pmf[i] = P(X = lo + i)`` over the whole support.
    """
    lo, hi = max(0, marked + sampled - total), min(marked, sampled)
    x = np.arange(lo, hi, dtype=np.float64)
    # log P(x+1) - log P(x), accumulated and normalised: no log-gamma over the support needed
    step = np.log(marked - x) + np.log(sampled - x) - np.log(x + 1)
    step -= np.log(total - marked - sampled + x + 1)
    logp = np.concatenate([[0.0], np.cumsum(step)])
    logp -= logp.max()
    p = np.exp(logp)
    return lo, p / p.sum()


def _log_prob_disconnected(n: int, k: int, max_bad: int) -> float:
    # Removing nodes disconnects H(n, k) only if two disjoint runs of k/2 consecutive nodes are
    # all bad; union bound over the ~n(n-k-1)/2 pairs of runs (Bell et al.; FCP's finder).
    if k > max_bad:
        return -math.inf
    log_pairs = math.log(n) + math.log(n - k - 1) - math.log(2)
    return (
        log_pairs
        + math.lgamma(max_bad + 1)
        + math.lgamma(n - k + 1)
        - math.lgamma(n + 1)
        - math.lgamma(max_bad - k + 1)
    )


def _threshold_for(
    n: int, k: int, corrupt: int, surviving: int, semi_malicious: bool
) -> int | None:
    per_event = SECURITY_BITS + 1  # security budget split over two bad events
    if _log_prob_disconnected(n, k, corrupt + (n - surviving)) >= -per_event * math.log(2):
        return None
    q_sec = 2.0**-per_event / n
    q_cor = 2.0**-CORRECTNESS_BITS / n
    # t1: smallest a with P(#corrupt neighbours > a) < q_sec, so t = t1 + 1 shares are needed
    lo, p = hypergeometric_pmf(n, corrupt, k)
    upper_tail = np.concatenate([np.cumsum(p[::-1])[::-1][1:], [0.0]])  # P(X > lo + i)
    t1 = lo + int(np.argmax(upper_tail < q_sec))
    if semi_malicious:
        t1 = math.ceil((t1 + k - 1.25) / 2)
    # t2: smallest s with P(#surviving neighbours <= s) >= q_cor, so P(survivors < t) < q_cor
    # for every t <= t2
    lo, p = hypergeometric_pmf(n, surviving, k)
    t2 = lo + int(np.argmax(np.cumsum(p) >= q_cor))
    if t2 <= t1:
        return None
    return max(t1 + 1, 2)


def secagg_parameters(
    n: int,
    dropout_rate: float,
    corrupt_rate: float,
    *,
    adversary: Literal["semi-honest", "semi-malicious"] = "semi-honest",
) -> tuple[int, int]:
    """Smallest SecAgg+ degree k and its Shamir threshold t for n clients (Bell et al. 2020).

    Searches k = 2, 4, ... < n - 1 and returns the first k such that

    * the Harary graph of honest survivors stays connected except with probability < 2^-41
      (union bound over pairs of runs of k/2 removed nodes, at most
      ``floor(corrupt_rate*n) + floor(dropout_rate*n)`` removed), and
    * some threshold t satisfies both P(a client has >= t corrupt neighbours) < 2^-41 / n
      (hypergeometric) and P(a client has < t surviving neighbours) < 2^-20 / n;

    t is the smallest such threshold (cheapest reconstruction), at least 2. With
    ``adversary="semi-malicious"`` t is raised so that 2t > k + (corrupt neighbours), following
    the same finder. When no sparse graph qualifies (small n), it falls back to the complete
    graph k = n - 1 (plain SecAgg) with t = floor(corrupt_rate*n) + 1 (semi-malicious:
    floor((n - 1 + floor(corrupt_rate*n)) / 2) + 1), provided the worst-case number of surviving
    neighbours, ceil((1 - dropout_rate)*n) - 1, still reaches t.

    Examples (Google's published table): n=100, 5% / 5% -> (12, 6); n=1000, 5% / 5% -> (30, 17).

    Raises:
        ConfigError: rates out of [0, 1), ``corrupt_rate + dropout_rate > 0.9`` (semi-honest) or
            ``corrupt_rate + 2*dropout_rate > 0.9`` (semi-malicious), n outside [2, 10^6], or no
            parameters exist.
    """
    if not 2 <= n <= MAX_CLIENTS:
        raise ConfigError(f"n={n} must be in [2, {MAX_CLIENTS}]", key="n")
    for name, rate in (("dropout_rate", dropout_rate), ("corrupt_rate", corrupt_rate)):
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"{name}={rate} must be in [0, 1)", key=name)
    semi_malicious = adversary == "semi-malicious"
    if adversary not in ("semi-honest", "semi-malicious"):
        raise ConfigError(f"unknown adversary {adversary!r}", key="adversary")
    budget = corrupt_rate + (2 if semi_malicious else 1) * dropout_rate
    if budget > 0.9:
        raise ConfigError(
            f"infeasible: corrupt_rate + {'2*' if semi_malicious else ''}dropout_rate = "
            f"{budget:.3g} exceeds 0.9",
            key="dropout_rate",
        )
    corrupt = math.floor((corrupt_rate + _SMALL) * n)
    surviving = math.ceil((1 - dropout_rate - _SMALL) * n)
    for k in range(2, n - 1, 2):
        t = _threshold_for(n, k, corrupt, surviving, semi_malicious)
        if t is not None:
            return k, t
    t = (n - 1 + corrupt) // 2 + 1 if semi_malicious else corrupt + 1
    t = max(t, 2)
    if t > surviving - 1:
        raise ConfigError(
            f"no secure parameters for n={n}: threshold {t} exceeds the {surviving - 1} "
            f"neighbours guaranteed to survive dropout_rate={dropout_rate}",
            key="n",
        )
    return n - 1, t
