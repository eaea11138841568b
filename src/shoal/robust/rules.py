"""Byzantine-robust aggregation rules as pure functions of the round's updates.

Each rule takes the ``(n, d)`` matrix of one round's updates (one row per client, every
client one vote) and the number ``f`` of Byzantine clients it must tolerate, and returns the
aggregate ``(d,)``. Each states the assumption it needs (:func:`requirement`); a round that
breaks it is refused by :class:`~shoal.robust.held.HeldRule` before the rule runs. No rule
loops over coordinates in Python: per-coordinate rules sort along the client axis, distance
rules work on one ``n x n`` Gram matrix.

* coordinate-wise median and trimmed mean: D. Yin, Y. Chen, K. Ramchandran, P. Bartlett,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018
  (an even ``n`` takes the mean of the two middle values);
* Krum and Multi-Krum: P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine
  Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017 (the score
  of ``V_i`` is the sum of its ``n - f - 2`` smallest squared distances to the others);
* Bulyan: E. M. El Mhamdi, R. Guerraoui, S. Rouault, "The Hidden Vulnerability of
  Distributed Learning in Byzantium", ICML 2018 (``theta = n - 2f`` updates chosen by
  Krum one after another, then per coordinate the mean of the ``beta = theta - 2f``
  values closest to their median).
"""

from __future__ import annotations

import numpy as np

__all__ = ["RULES", "requirement", "coordinate_median", "trimmed_mean", "trim_count",
           "pairwise_sq_distances", "krum_scores", "krum", "multi_krum", "bulyan"]

#: rule name -> the assumption it states, as text (n updates, f Byzantine)
RULES = {
    "median": "f < n/2",
    "trimmed_mean": "n > 2b with b = ceil(beta x n) >= f values trimmed at each end",
    "krum": "n > 2f + 2",
    "multi_krum": "n > 2f + 2",
    "bulyan": "n >= 4f + 3",
}


def trim_count(n: int, beta: float) -> int:
    """Values trimmed at each end of a coordinate by :func:`trimmed_mean` of ``n`` updates
    at fraction ``beta`` (rounded up: trimming too few is what fails)."""
    return int(np.ceil(beta * n - 1e-9))


def requirement(rule: str, n: int, f: int, *, beta: float = 0.0) -> str:
    """``''`` if ``rule`` may aggregate ``n`` updates with ``f`` Byzantine, else what breaks.

    Raises:
        KeyError: an unknown rule.
    """
    stated = RULES[rule]
    if n < 1:
        return f"{rule} needs at least one update"
    if rule == "median":
        ok = 2 * f < n
    elif rule == "trimmed_mean":
        b = trim_count(n, beta)
        ok = 2 * b < n and b >= f
        stated = f"n > 2b and b >= f, with b = ceil({beta:g} x {n}) = {b}"
    elif rule in ("krum", "multi_krum"):
        ok = n > 2 * f + 2
    else:
        ok = n >= 4 * f + 3
    return "" if ok else f"{rule} assumes {stated}; this round has n = {n}, f = {f}"


def coordinate_median(rows: np.ndarray) -> np.ndarray:
    """Per-coordinate median (float64)."""
    return np.median(rows, axis=0).astype(np.float64)


def trimmed_mean(rows: np.ndarray, b: int) -> np.ndarray:
    """Per coordinate, the mean of the values left after dropping the ``b`` largest and the
    ``b`` smallest (float64). Needs ``2b < n``."""
    n = rows.shape[0]
    if b == 0:
        return rows.mean(axis=0, dtype=np.float64)
    # partial sorts: only the order statistics at the two cuts are placed exactly
    part = np.partition(rows, (b - 1, n - b), axis=0)
    return part[b:n - b].mean(axis=0, dtype=np.float64)


def pairwise_sq_distances(rows: np.ndarray) -> np.ndarray:
    """``(n, n)`` squared L2 distances, from one float64 Gram matrix (``|a|^2 + |b|^2 -
    2 a.b``, clamped at 0 against rounding; exact 0 on the diagonal)."""
    x = rows.astype(np.float64, copy=False)
    gram = x @ x.T
    sq = np.diag(gram)
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def krum_scores(dist: np.ndarray, f: int, alive: np.ndarray | None = None) -> np.ndarray:
    """Krum's score of every update among the ``alive`` ones (default all): the sum of its
    ``m - f - 2`` smallest squared distances to the other alive updates (``m`` alive);
    ``inf`` for updates not alive."""
    n = dist.shape[0]
    alive = np.ones(n, bool) if alive is None else alive
    m = int(alive.sum())
    k = max(m - f - 2, 0)
    d = np.where(alive[None, :] & alive[:, None], dist, np.inf)
    np.fill_diagonal(d, np.inf)  # a row is never its own neighbour
    nearest = np.sort(d, axis=1)[:, :k]
    scores = nearest.sum(axis=1) if k else np.zeros(n)
    return np.where(alive, scores, np.inf)


def krum(rows: np.ndarray, f: int) -> np.ndarray:
    """The update with the lowest Krum score (ties to the lower index), as float64."""
    return rows[int(np.argmin(krum_scores(pairwise_sq_distances(rows), f)))].astype(np.float64)


def multi_krum(rows: np.ndarray, f: int, m: int) -> np.ndarray:
    """The mean of the ``m`` updates with the lowest Krum scores (scored once)."""
    scores = krum_scores(pairwise_sq_distances(rows), f)
    chosen = np.argsort(scores, kind="stable")[:m]
    return rows[chosen].mean(axis=0, dtype=np.float64)


def bulyan(rows: np.ndarray, f: int) -> np.ndarray:
    """Bulyan over Krum: needs ``n >= 4f + 3``."""
    n = rows.shape[0]
    theta = n - 2 * f
    beta = theta - 2 * f
    dist = pairwise_sq_distances(rows)
    alive = np.ones(n, bool)
    chosen = np.empty(theta, np.int64)
    for i in range(theta):  # theta Krum selections (n is small), never a loop over d
        pick = int(np.argmin(krum_scores(dist, f, alive)))
        chosen[i] = pick
        alive[pick] = False
    selected = rows[chosen].astype(np.float64)
    med = np.median(selected, axis=0)
    closest = np.argsort(np.abs(selected - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(selected, closest, axis=0).mean(axis=0)
