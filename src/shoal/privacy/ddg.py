"""Distributed DP on SecAgg+: the distributed discrete Gaussian mechanism.

P. Kairouz, Z. Liu and T. Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation" (ICML 2021). Every client clips its update to C, rotates,
scales and conditionally rounds it, and adds its own share of discrete Gaussian noise before
masking (:func:`~shoal.privacy.rotated_encoding.privatize_and_encode`); secure aggregation
then reveals only a sum that already carries the noise of every included client, so the
server never holds a noiseless sum. The shares are calibrated for h clients: each adds
variance z²(1+η)²C²/h, and a round releases nothing unless at least h + f masked inputs are
in the sum (h honest survivors, f clients that may collude with the server and strip their
own share; dropouts count against h). With fewer, the server aborts before unmasking.

Units. With grid step γ, the rounded vector's norm is at most Δ₂ = (1+η)·C/γ (conditional
rounding) and each share has σ = z(1+η)C/(γ√h) in grid units, so h shares give a noise of
√h σ = z Δ₂: the noise multiplier the accountant sees is z whatever γ is, and γ can follow
the round's roster and the model's size. The price of rounding is the slack η: the noise is
(1 + η) times central DP's at the same z (1.6 % with η = 1/64), and a ring so coarse that
rounding cannot meet (1 + η)C/γ is refused. The noise scale in grid units is at least
:data:`~shoal.privacy.rotated_encoding.MIN_GRID_SIGMA` and D at most :data:`MAX_DIM`, which
bounds the paper's τ term for the accountant (:mod:`.ddg_accounting`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shoal.errors import ConfigError
from shoal.privacy.ddg_accounting import DistributedEvent
from shoal.privacy.rotated_encoding import MIN_GRID_SIGMA, RotatedPlan
from shoal.privacy.rotation import BLOCK

__all__ = ["MAX_DIM", "SLACK", "DistributedDiscreteGaussian"]

#: η: rounded vectors may exceed C/γ by this fraction (and the noise grows by as much)
SLACK = 1 / 64
#: the accountant's bound on the rotated length D (the rotation of :mod:`.rotation` pads
#: d by less than one block); larger models are refused
MAX_DIM = 2**32


@dataclass(frozen=True)
class DistributedDiscreteGaussian:
    """The mechanism's parameters (see the module docstring).

    Attributes:
        noise_multiplier: z: the noise of h shares is z times the sensitivity.
        clip_norm: C, the L2 norm each client clips its update to.
        honest: h, the fewest honest clients whose noise must be in a released sum.
        colluding: f, included clients that may collude with the server.
        slack: η.

    Raises:
        ConfigError: an argument out of range.
    """

    noise_multiplier: float
    clip_norm: float
    honest: int
    colluding: int = 0
    slack: float = SLACK

    def __post_init__(self) -> None:
        for name, value in (("noise_multiplier", self.noise_multiplier),
                            ("clip_norm", self.clip_norm)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be finite and > 0, got {value!r}",
                                  key=f"privacy.{name}")
        if self.honest < 1:
            raise ConfigError(f"honest clients must be >= 1, got {self.honest}",
                              key="privacy.honest_clients")
        if self.colluding < 0:
            raise ConfigError(f"colluding clients must be >= 0, got {self.colluding}",
                              key="privacy.colluding_clients")
        if not 0 < self.slack < 1:
            raise ConfigError(f"slack must be in (0, 1), got {self.slack}", key="slack")

    @property
    def client_noise_std(self) -> float:
        """Each client's noise std in real units: z(1 + η)C / √h."""
        return self.noise_multiplier * (1 + self.slack) * self.clip_norm / math.sqrt(self.honest)

    @property
    def min_inputs(self) -> int:
        """h + f: fewer masked inputs and the round releases nothing."""
        return self.honest + self.colluding

    def plan(self, bits: int, block: int = BLOCK) -> RotatedPlan:
        """How clients encode into a ``bits``-bit ring (γ follows each round's roster)."""
        return RotatedPlan(bits=bits, clip=self.clip_norm, noise_std=self.client_noise_std,
                           slack=self.slack, block=block)

    def event(self, sample_size: int, population: int) -> DistributedEvent:
        """One round for the accountant: ``sample_size`` of ``population`` clients sampled
        without replacement.

        Raises:
            ConfigError: a cohort smaller than h + f (every round would abort).
        """
        if sample_size < self.min_inputs:
            raise ConfigError(f"a cohort of {sample_size} clients can never hold the "
                              f"{self.honest} honest + {self.colluding} colluding inputs a "
                              f"release needs", key="privacy.honest_clients")
        return DistributedEvent(noise_multiplier=self.noise_multiplier, honest=self.honest,
                                grid_sigma=MIN_GRID_SIGMA, dim=MAX_DIM,
                                sample_size=sample_size, population=population)

    def sum_noise_std(self, shares: int) -> float:
        """Noise std of a sum of ``shares`` clients, real units."""
        return math.sqrt(shares) * self.client_noise_std
