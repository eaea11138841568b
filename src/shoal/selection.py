"""Client selection over registry records: uniform, stratified, availability- and fairness-aware.

A selector answers *with whom* a round runs: given candidate :class:`~shoal.registry.Device`
records, a cohort size, a ``numpy.random.Generator`` and the current time, it returns the chosen
device ids. Selectors are small frozen dataclasses with no I/O; the caller fetches candidates
from the registry (e.g. ``registry.list(seen_since=now - 3600)``) and derives ``rng`` from the
run seed and the round (``shoal.seeds.generator(seed, "select", round)``), so a resumed
aggregator picks the same cohort.

Conventions shared by every selector here:

* **Deterministic and order-independent.** Candidates are sorted by ``device_id`` before any
  random draw, so the same candidates and the same generator state give the same cohort
  whatever order the registry returned them in. Duplicate ids are refused.
* **Shortfall returns everyone eligible.** Asking for more devices than are eligible returns
  all eligible devices rather than raising: in deployment the population that is online
  fluctuates, and whether a short cohort is still worth a round is the round engine's call
  (compare ``len(cohort)`` with its minimum), not the sampler's.
* **Output** is the chosen ids sorted, like the simulator's ``UniformSampler``.

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
from shoal.registry.base import AttrValue, Device, RegistryError

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
    """Chooses up to ``count`` device ids from ``candidates``.

    Returns every eligible id (sorted) when fewer than ``count`` are eligible.
    """

    def select(self, candidates: Sequence[Device], count: int, rng: np.random.Generator,
               now: float) -> list[str]: ...


def _check_count(count: object, name: str = "count") -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ConfigError(f"{name} must be an int >= 0, got {count!r}", key=name)
    return int(count)


def _sorted_unique(candidates: Sequence[Device]) -> list[Device]:
    """Candidates in device-id order; the canonical order every draw is made in."""
    ordered = sorted(candidates, key=lambda d: d.device_id)
    for a, b in zip(ordered, ordered[1:]):
        if a.device_id == b.device_id:
            raise RegistryError(f"device {a.device_id!r} appears twice among the candidates",
                                device_id=a.device_id)
    return ordered


def _ids(devices: Sequence[Device], chosen: np.ndarray) -> list[str]:
    return sorted(devices[i].device_id for i in chosen.tolist())


# ---------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Uniform:
    """``count`` devices uniformly at random without replacement."""

    def select(self, candidates: Sequence[Device], count: int, rng: np.random.Generator,
               now: float) -> list[str]:
        count = _check_count(count)
        devices = _sorted_unique(candidates)
        if count >= len(devices):
            return [d.device_id for d in devices]
        return _ids(devices, rng.choice(len(devices), size=count, replace=False))


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


def _stratum_key(value: AttrValue | None) -> tuple[int, float | str]:
    # Missing < numbers < strings, so mixed-type strata still sort deterministically.
    if value is None:
        return (0, 0.0)
    if isinstance(value, str):
        return (2, value)
    return (1, float(value))


@dataclass(frozen=True)
class Stratified:
    """Proportional stratified sampling on one attribute, uniform within each stratum.

    Devices without the attribute form a stratum of their own. Stratum sizes are counted among
    the candidates given, so filter first (e.g. wrap in :class:`AvailabilityAware`) if only
    the available population should set the proportions.

    Attributes:
        attribute: the attribute whose values define the strata (e.g. ``"region"``).
    """

    attribute: str

    def select(self, candidates: Sequence[Device], count: int, rng: np.random.Generator,
               now: float) -> list[str]:
        count = _check_count(count)
        devices = _sorted_unique(candidates)
        if count >= len(devices):
            return [d.device_id for d in devices]
        values = [d.attributes.get(self.attribute) for d in devices]
        keys = sorted({_stratum_key(v) for v in values})
        index = {k: i for i, k in enumerate(keys)}
        stratum = np.fromiter((index[_stratum_key(v)] for v in values), dtype=np.int64,
                              count=len(values))
        sizes = np.bincount(stratum, minlength=len(keys))
        alloc = proportional_allocation(sizes, count, rng)
        # Uniform within each stratum, all strata at once: order devices by (stratum, random
        # key) and keep the first alloc[h] of stratum h.
        order = np.lexsort((rng.random(len(devices)), stratum))
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        rank = np.arange(len(devices)) - starts[stratum[order]]
        return _ids(devices, order[rank < alloc[stratum[order]]])


@dataclass(frozen=True)
class AvailabilityAware:
    """Only devices whose availability window covers ``now``, then ``inner`` (uniform).

    A device that declared no window counts as always available.
    """

    inner: Selector = field(default_factory=Uniform)

    def select(self, candidates: Sequence[Device], count: int, rng: np.random.Generator,
               now: float) -> list[str]:
        count = _check_count(count)
        return self.inner.select([d for d in candidates if d.available_at(now)], count, rng,
                                 now)


@dataclass(frozen=True)
class FairnessAware:
    """Prefer devices that participated least (fewest accepted updates).

    Attributes:
        mode: ``"least"`` -- deterministic preference: sort by participation count, ties in
            random order, take the first ``count`` (a device with more participations is
            chosen only when every less-used device already is). ``"weighted"`` -- sample
            without replacement with weights ``1 / (1 + participation)`` (Efraimidis-Spirakis
            keys ``u ** (1 / w)``), so busy devices keep a chance and the cohort stays random.
    """

    mode: Literal["least", "weighted"] = "least"

    def __post_init__(self) -> None:
        if self.mode not in ("least", "weighted"):
            raise ConfigError(f"FairnessAware.mode must be 'least' or 'weighted', got "
                              f"{self.mode!r}", key="mode")

    def select(self, candidates: Sequence[Device], count: int, rng: np.random.Generator,
               now: float) -> list[str]:
        count = _check_count(count)
        devices = _sorted_unique(candidates)
        if count >= len(devices):
            return [d.device_id for d in devices]
        used = np.fromiter((d.participation for d in devices), dtype=np.float64,
                           count=len(devices))
        if self.mode == "least":
            chosen = np.lexsort((rng.random(len(devices)), used))[:count]
        else:
            # log(u ** (1 / w)) = log(u) * (1 + participation); the largest keys win.
            # 1 - random() lies in (0, 1], so the log is finite.
            keys = np.log1p(-rng.random(len(devices))) * (1.0 + used)
            chosen = np.argpartition(-keys, count - 1)[:count] if count else keys[:0]
        return _ids(devices, np.asarray(chosen, dtype=np.int64))


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
