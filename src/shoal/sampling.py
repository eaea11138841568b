"""Who trains: samplers of a cohort from a population of ``num_clients`` clients.

A sampler draws from the generator it is given, so cohorts are reproducible from (run seed,
round, attempt) in simulation and unpredictable (``os.urandom``) where differential privacy
needs them to be. Selection over a registry of devices (attributes, availability,
participation) lives in :mod:`shoal.selection` and plugs in through the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from shoal.errors import ConfigError

__all__ = ["Sampler", "UniformSampler", "PoissonSampler"]


class Sampler(Protocol):
    """Chooses a cohort (sorted int64 client ids) from ``num_clients`` using ``rng``;
    ``count`` overrides the sampler's own cohort size (over-selection)."""

    def sample(self, num_clients: int, rng: np.random.Generator,
               count: int | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class UniformSampler:
    """``per_round`` clients uniformly at random without replacement (sorted ids)."""

    per_round: int

    def sample(self, num_clients: int, rng: np.random.Generator,
               count: int | None = None) -> np.ndarray:
        k = self.per_round if count is None else count
        if not 1 <= k <= num_clients:
            raise ConfigError(f"sampling.per_round = {k} must be between 1 and the number "
                              f"of clients ({num_clients})", key="sampling.per_round")
        return np.sort(rng.choice(num_clients, size=k, replace=False))


@dataclass(frozen=True)
class PoissonSampler:
    """Each client joins independently with probability ``q`` (the sampling that
    differential-privacy accounting assumes); the cohort size varies and may be 0."""

    q: float

    def sample(self, num_clients: int, rng: np.random.Generator,
               count: int | None = None) -> np.ndarray:
        if not 0.0 < self.q <= 1.0:
            raise ConfigError(f"sampling.q = {self.q} must be in (0, 1]", key="sampling.q")
        if count is not None:
            raise ConfigError("Poisson sampling has no fixed cohort size to over-select; "
                              "use sampling.method = 'uniform' with round.over_selection",
                              key="round.over_selection")
        return np.flatnonzero(rng.random(num_clients) < self.q)
