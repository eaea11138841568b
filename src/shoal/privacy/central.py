"""Central DP-FedAvg: the server clips every update, sums, and adds noise once per round.

H. B. McMahan, D. Ramage, K. Talwar, L. Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018 (fixed denominator m = qN, uniform weights), with the adaptive
clipping of G. Andrew, O. Thakkar, H. B. McMahan, S. Ramaswamy, "Differentially Private Learning
with Adaptive Clipping", NeurIPS 2021 (see :mod:`shoal.privacy.dp` for the units and the
primitives). :meth:`CentralDP.release` is the mechanism itself; :class:`RoundAccumulator` is
the streaming clipped sum of one round for callers that sum here, and the pipeline stage
(:mod:`shoal.privacy.stages`) calls the same release after a sum made elsewhere (e.g. under
secure aggregation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shoal.errors import PrivacyError, UpdateRejected
from shoal.privacy.csprng import RandomSource
from shoal.privacy.discrete_gaussian import gridded_release
from shoal.privacy.dp import (AdaptiveClipping, ClipResult, _check_vector, _clip_scale, _norm,
                              _positive, gaussian_noise, next_clip_norm,
                              noised_unclipped_fraction, update_noise_multiplier)

__all__ = ["CentralDP", "CentralDPState", "RoundAccumulator", "RoundResult"]


@dataclass(frozen=True)
class CentralDPState:
    """What central DP carries between rounds (checkpoint these two numbers)."""

    clip_norm: float
    round: int = 0


@dataclass(frozen=True)
class RoundResult:
    """One finished central-DP round.

    Attributes:
        mean: the noised update mean Δ̄ (float32), to be applied as θ ← θ + Δ̄ or fed to a server
            optimizer (post-processing, no extra privacy cost).
        state: the state for the next round (clip norm updated if adaptive).
        clip_norm: C used this round.
        noise_std: std of the noise in ``mean`` (= z_Δ·C/m).
        unclipped_fraction: the DP estimate b̄ (``None`` without adaptive clipping). Safe to log.
        num_updates: updates folded in. Raw, *not* DP: keep inside the trust boundary.
        num_clipped: how many were clipped. Raw, *not* DP: keep inside the trust boundary.
    """

    mean: np.ndarray
    state: CentralDPState
    clip_norm: float
    noise_std: float
    unclipped_fraction: float | None
    num_updates: int
    num_clipped: int


@dataclass(frozen=True)
class CentralDP:
    """Server-side DP-FedAvg (fixed-denominator estimator, uniform weights).

    Attributes:
        noise_multiplier: z, the *total* noise multiplier the accountant is given. With adaptive
            clipping part of it pays for the count (see :func:`update_noise_multiplier`).
        clip_norm: C, or C_0 when ``adaptive`` is set (0.1 recommended).
        expected_clients: m = qN, the fixed denominator; must match the sampling rate given to
            the accountant.
        adaptive: learn C as a quantile of update norms, or ``None`` for a fixed C.
        discrete: release the noised sum on an exact grid with discrete Gaussian noise
            (:func:`~shoal.privacy.discrete_gaussian.gridded_release`, for deployment: no
            floating-point structure in the output) instead of adding float noise.

    Use::

        dp = CentralDP(noise_multiplier=1.0, clip_norm=0.1, expected_clients=100,
                       adaptive=AdaptiveClipping())
        state = dp.init()
        acc = dp.begin_round(state, dim)
        for delta in arriving_updates:        # streaming, O(dim) memory
            acc.add(delta, client_id=cid)
        result = acc.finish(rng)              # noised mean + next state
        state = result.state
    """

    noise_multiplier: float
    clip_norm: float
    expected_clients: float
    adaptive: AdaptiveClipping | None = None
    discrete: bool = False

    def __post_init__(self) -> None:
        _positive("noise_multiplier", self.noise_multiplier)
        _positive("clip_norm", self.clip_norm)
        _positive("expected_clients", self.expected_clients)
        if self.adaptive is not None:
            # validates the budget split now rather than at the first round
            update_noise_multiplier(self.noise_multiplier, self.count_noise_std)

    @property
    def count_noise_std(self) -> float:
        """σ_b in clients (0 without adaptive clipping)."""
        if self.adaptive is None:
            return 0.0
        return self.adaptive.resolved_count_noise_std(self.expected_clients)

    @property
    def update_noise_multiplier(self) -> float:
        """z_Δ: the multiplier actually applied to the update sum."""
        if self.adaptive is None:
            return float(self.noise_multiplier)
        return update_noise_multiplier(self.noise_multiplier, self.count_noise_std)

    def init(self) -> CentralDPState:
        """The state before round 0."""
        return CentralDPState(clip_norm=float(self.clip_norm), round=0)

    def release(self, total: np.ndarray, count: int, clipped: int, state: CentralDPState,
                rng: RandomSource
                ) -> tuple[np.ndarray, CentralDPState, float | None, float]:
        """The one noised release of a round's clipped sum: the mechanism itself, shared by
        :class:`RoundAccumulator` and the pipeline stage (which sums elsewhere, e.g. under
        secure aggregation).

        Adds N(0, (z_Δ·C)²) to ``total`` in place (a float64 buffer the caller hands over),
        then, with adaptive clipping, draws the count noise and moves C. Returns the noised
        sum, the next state, the noised unclipped fraction (``None`` without adaptive
        clipping) and the noise std of the sum.
        """
        c = state.clip_norm
        sum_std = self.update_noise_multiplier * c
        if self.discrete:
            total[:] = gridded_release(total, sum_std, c, rng)
        else:
            total += gaussian_noise(total.shape[0], sum_std, rng)
        fraction: float | None = None
        next_c = c
        if self.adaptive is not None:
            fraction = noised_unclipped_fraction(count - clipped, count, self.expected_clients,
                                                 self.count_noise_std, rng)
            next_c = next_clip_norm(c, fraction, self.adaptive.target_quantile,
                                    self.adaptive.learning_rate)
        return total, CentralDPState(clip_norm=next_c, round=state.round + 1), fraction, sum_std

    def begin_round(self, state: CentralDPState, dim: int) -> RoundAccumulator:
        """Start folding one round's updates of length ``dim`` under ``state``'s clip norm."""
        _positive("state.clip_norm", state.clip_norm)
        if dim < 1:
            raise PrivacyError(f"dim must be >= 1, got {dim}")
        return RoundAccumulator(self, state, int(dim))


class RoundAccumulator:
    """Streaming clipped sum for one central-DP round: O(dim) memory, whatever the cohort.

    It owns (and mutates) only its float64 running sum. :meth:`finish` may be called once:
    a second noised release of the same sum would double the privacy cost.
    """

    def __init__(self, dp: CentralDP, state: CentralDPState, dim: int) -> None:
        self.dp = dp
        self.state = state
        self.dim = dim
        self._sum = np.zeros(dim, dtype=np.float64)
        self._count = 0
        self._clipped = 0
        self._finished = False

    @property
    def num_updates(self) -> int:
        return self._count

    def add(self, update: np.ndarray, *, client_id: object = None) -> ClipResult:
        """Clip ``update`` to the round's C and add it to the sum (``update`` is not modified).

        Raises:
            UpdateRejected: wrong shape/dtype or non-finite values; the sum is unchanged.
            PrivacyError: the round was already finished.
        """
        self._check_open()
        _check_vector(update, client_id=client_id, round=self.state.round)
        if update.shape[0] != self.dim:
            raise UpdateRejected(
                "wrong_shape",
                f"expected {self.dim} values, got {update.shape[0]}",
                client_id=client_id,
                round=self.state.round,
            )
        norm = _norm(update, client_id=client_id, round=self.state.round)
        scale = _clip_scale(norm, self.state.clip_norm)
        was_clipped = scale != 1.0
        if was_clipped:
            self._sum += update * np.float64(scale)  # float64 product: no float32 rounding
        else:
            self._sum += update
        self._count += 1
        self._clipped += int(was_clipped)
        return ClipResult(norm=norm, was_clipped=was_clipped)

    def merge(self, other: RoundAccumulator) -> None:
        """Fold in another accumulator of the same round (an edge aggregator's partial sum).

        Raises:
            PrivacyError: ``other`` is this accumulator (its clients would count twice), either
                one is finished (a finished sum was already released), or they belong to
                different mechanisms, states or dimensions; nothing changes.
        """
        self._check_open()
        if other is self:
            raise PrivacyError("an accumulator cannot be merged into itself (its clients "
                               "would count twice)")
        if other._finished:
            raise PrivacyError("cannot merge a finished accumulator: its sum was already "
                               "released with noise")
        if other.dp != self.dp or other.state != self.state or other.dim != self.dim:
            raise PrivacyError("can only merge accumulators of the same CentralDP, state and dim")
        self._sum += other._sum
        self._count += other._count
        self._clipped += other._clipped

    def finish(self, rng: RandomSource) -> RoundResult:
        """Add noise once and return the noised mean and the next state.

        Draws the update noise (dim values) and then, with adaptive clipping, one count-noise
        value from ``rng``. A round with no updates still releases noise (the release happens
        and is accounted for whether or not anyone was sampled).
        """
        self._check_open()
        self._finished = True
        total, self._sum = self._sum, np.zeros(0)  # take the buffer: no second release
        noised, state, fraction, sum_std = self.dp.release(
            total, self._count, self._clipped, self.state, rng)
        noised /= self.dp.expected_clients
        return RoundResult(
            mean=noised.astype(np.float32),
            state=state,
            clip_norm=self.state.clip_norm,
            noise_std=sum_std / self.dp.expected_clients,
            unclipped_fraction=fraction,
            num_updates=self._count,
            num_clipped=self._clipped,
        )

    def _check_open(self) -> None:
        if self._finished:
            raise PrivacyError(
                f"central DP round {self.state.round} already finished; start a new round"
            )
