"""Client selection over the registry's columns: uniform, stratified, availability- and
fairness-aware.

A selector answers *with whom* a round runs: given a :class:`~shoal.registry.Columns` view of
the registry (one array per field, rows in device-id order), a cohort size, a
``numpy.random.Generator`` and the current time, it returns the chosen rows. Selectors are
small frozen dataclasses with no I/O, and every one is a few vector operations over the
columns: choosing 100 devices out of a million builds no Python object per device. The
coordinator reaches them through :class:`~shoal.sampling.RegistrySampler`, the one sampler of
both simulation (an in-memory registry of virtual clients) and deployment (the SQLite
registry of enrolled devices); ``rng`` is the coordinator's sampling stream
(``shoal.seeds.generator(seed, "sample", round)``), so a resumed run picks the same cohort.

Conventions shared by every selector here:

* **Deterministic and order-independent.** Rows are in device-id order whatever order the
  registry learnt of the devices, and every draw is made over rows, so the same registry
  and the same generator state give the same cohort. Duplicate ids cannot occur: a
  ``Columns`` view holds each id once by construction.
* **Shortfall returns everyone eligible.** Asking for more devices than are eligible returns
  all eligible rows rather than raising: in deployment the population that is online
  fluctuates, and whether a short cohort is still worth a round is the round engine's call
  (compare ``len(cohort)`` with its minimum), not the selector's.
* **Output** is the chosen rows as a sorted int64 array. ``among`` (sorted rows) restricts
  the draw to a subset -- the devices of the run's pool, or those a wrapping selector kept.
* :class:`Uniform` over every row draws exactly ``np.sort(rng.choice(n, size=count,
  replace=False))``: the cohorts of the simulator since its first release.

Over-selection follows K. Bonawitz et al., "Towards Federated Learning at Scale: System
Design", MLSys 2019: ask ``ceil(factor * target)`` devices (they use 130%) so that the round
still reaches ``target`` reports after drop-outs; :func:`over_selection_count` is that count.
Stratified allocation is proportional with largest-remainder (Hamilton) rounding, as in
W. G. Cochran, "Sampling Techniques", 3rd ed., 1977, ch. 5. Weighted sampling without
replacement uses the keys of P. S. Efraimidis and P. G. Spirakis, "Weighted random sampling
with a reservoir", Information Processing Letters, 2006.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from shoal.errors import ConfigError
from shoal.registry.columns import Columns

__all__ = [
    "AvailabilityAware",
    "FairnessAware",
    "Selector",
    "Stratified",
    "Uniform",
    "over_selection_count",
    "proportional_allocation",
]


@runtime_checkable
class Selector(Protocol):
    """Chooses up to ``count`` rows of ``columns`` (of ``among``, if given).

    Returns the chosen rows, sorted int64; every eligible row when fewer than ``count``
    are eligible.
    """

    def select(self, columns: Columns, count: int, rng: np.random.Generator, now: float,
               among: np.ndarray | None = None) -> np.ndarray: ...


def _check_count(count: object, name: str = "count") -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ConfigError(f"{name} must be an int >= 0, got {count!r}", key=name)
    return int(count)


def _eligible(columns: Columns, among: np.ndarray | None) -> int:
    """How many rows the draw is over."""
    return columns.size if among is None else len(among)


def _rows(picked: np.ndarray, among: np.ndarray | None) -> np.ndarray:
    """Positions among the eligible rows (sorted) -> registry rows (sorted int64)."""
    picked = np.asarray(picked, dtype=np.int64)
    return picked if among is None else np.asarray(among, dtype=np.int64)[picked]


def _everyone(columns: Columns, among: np.ndarray | None) -> np.ndarray:
    return _rows(np.arange(_eligible(columns, among), dtype=np.int64), among)


def _uniform(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` of ``range(n)`` uniformly without replacement, sorted: the one uniform draw
    (numpy's ``choice`` is O(count) for a small fraction of a large ``n``)."""
    return np.sort(rng.choice(n, size=count, replace=False))


# ---------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Uniform:
    """``count`` rows uniformly at random without replacement."""

    def select(self, columns: Columns, count: int, rng: np.random.Generator, now: float,
               among: np.ndarray | None = None) -> np.ndarray:
        count = _check_count(count)
        n = _eligible(columns, among)
        if count >= n:
            return _everyone(columns, among)
        return _rows(_uniform(n, count, rng), among)


def proportional_allocation(sizes: Sequence[int] | np.ndarray, count: int,
                            rng: np.random.Generator) -> np.ndarray:
    """Split ``count`` draws over strata in proportion to their ``sizes`` (Hamilton's method).

    Each stratum gets ``floor(count * size / total)``; the draws left over go one each to the
    strata with the largest remainders, ties broken at random with ``rng``. Computed in exact
    integer arithmetic. If ``count >= total`` every stratum gets its whole size.

    Returns:
        int64 array of per-stratum counts, summing to ``min(count, total)``, each ``<= size``.

    Raises:
        ConfigError: a size or ``count`` is negative.
    """
    count = _check_count(count)
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.ndim != 1 or (sizes < 0).any():
        raise ConfigError(f"stratum sizes must be a 1-D array of ints >= 0, got {sizes!r}",
                          key="sizes")
    total = int(sizes.sum())
    if count >= total:
        return sizes.copy()
    scaled = sizes * count  # exact: count < total and both are int64
    alloc = scaled // total
    remainder = scaled % total
    leftover = count - int(alloc.sum())
    # Largest remainder first; a random secondary key breaks ties fairly across rounds.
    order = np.lexsort((rng.random(sizes.size), -remainder))
    alloc[order[:leftover]] += 1
    return alloc


@dataclass(frozen=True)
class Stratified:
    """Proportional stratified sampling on one attribute, uniform within each stratum.

    Devices without the attribute form a stratum of their own. Stratum sizes are counted among
    the eligible rows, so filter first (e.g. wrap in :class:`AvailabilityAware`) if only
    the available population should set the proportions.

    Attributes:
        attribute: the attribute whose values define the strata (e.g. ``"region"``).
    """

    attribute: str

    def select(self, columns: Columns, count: int, rng: np.random.Generator, now: float,
               among: np.ndarray | None = None) -> np.ndarray:
        count = _check_count(count)
        n = _eligible(columns, among)
        if count >= n:
            return _everyone(columns, among)
        stratum, num = columns.strata(self.attribute)
        if among is not None:
            stratum = stratum[among]
        sizes = np.bincount(stratum, minlength=num)
        alloc = proportional_allocation(sizes, count, rng)
        # Rows grouped by stratum, in row order within each (a stable sort of small ints is
        # a radix sort: O(n)); then a uniform draw inside each stratum that gets any.
        narrow = np.uint16 if num <= np.iinfo(np.uint16).max else np.int64
        by_stratum = np.argsort(stratum.astype(narrow), kind="stable")
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        picked = [by_stratum[starts[h] + _uniform(int(sizes[h]), int(alloc[h]), rng)]
                  for h in np.flatnonzero(alloc).tolist()]
        return _rows(np.sort(np.concatenate([np.zeros(0, np.int64), *picked])), among)


@dataclass(frozen=True)
class AvailabilityAware:
    """Only devices whose availability window covers ``now``, then ``inner`` (uniform).

    A device that declared no window counts as always available, so over a population
    without windows (the simulator's) this selects exactly as ``inner`` does.
    """

    inner: Selector = field(default_factory=Uniform)

    def select(self, columns: Columns, count: int, rng: np.random.Generator, now: float,
               among: np.ndarray | None = None) -> np.ndarray:
        count = _check_count(count)
        up = columns.available(now)
        if among is not None:
            up = up[among]
        if up.all():
            return self.inner.select(columns, count, rng, now, among)
        return self.inner.select(columns, count, rng, now, _rows(np.flatnonzero(up), among))


@dataclass(frozen=True)
class FairnessAware:
    """Prefer devices that participated least (fewest accepted updates, the registry's
    ``participation`` column).

    Attributes:
        mode: ``"least"`` -- deterministic preference: the ``count`` least-used devices, ties
            at the boundary broken uniformly at random (a device with more participations is
            chosen only when every less-used device already is). ``"weighted"`` -- sample
            without replacement with weights ``1 / (1 + participation)`` (Efraimidis-Spirakis
            keys ``u ** (1 / w)``), so busy devices keep a chance and the cohort stays random.
    """

    mode: Literal["least", "weighted"] = "least"

    def __post_init__(self) -> None:
        if self.mode not in ("least", "weighted"):
            raise ConfigError(f"FairnessAware.mode must be 'least' or 'weighted', got "
                              f"{self.mode!r}", key="mode")

    def select(self, columns: Columns, count: int, rng: np.random.Generator, now: float,
               among: np.ndarray | None = None) -> np.ndarray:
        count = _check_count(count)
        n = _eligible(columns, among)
        if count >= n:
            return _everyone(columns, among)
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        used = columns.participation if among is None else columns.participation[among]
        if self.mode == "least":
            # the count-th smallest participation splits the population: everyone below it,
            # and a uniform draw among those at it for the places left (O(n), no sort)
            bound = np.partition(used, count - 1)[count - 1]
            below = np.flatnonzero(used < bound)
            tied = np.flatnonzero(used == bound)
            picked = np.concatenate((below, tied[_uniform(tied.size, count - below.size,
                                                          rng)]))
        else:
            # log(u ** (1 / w)) = log(u) * (1 + participation); the largest keys win.
            # 1 - random() lies in (0, 1], so the log is finite.
            keys = np.log1p(-rng.random(n)) * (1.0 + used)
            picked = np.argpartition(-keys, count - 1)[:count]
        return _rows(np.sort(picked), among)


# ---------------------------------------------------------------------------------------------
# Over-selection
# ---------------------------------------------------------------------------------------------


def over_selection_count(target: int, factor: float) -> int:
    """``ceil(factor * target)``: how many devices to ask so ``target`` report back.

    Products within 1e-9 of an integer count as that integer, so ``1.3 * 10`` (which is
    ``13.000000000000002`` in floating point) gives 13, not 14.

    Raises:
        ConfigError: ``target`` is not an int >= 0 or ``factor`` is not a finite number >= 1.
    """
    target = _check_count(target, "target")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
            or not math.isfinite(factor) or factor < 1.0:
        raise ConfigError(f"over_selection must be a finite number >= 1, got {factor!r}",
                          key="over_selection")
    return max(target, math.ceil(factor * target - 1e-9))
