"""Adaptive server optimizers: FedAdagrad, FedAdam and FedYogi.

S. J. Reddi, Z. Charles, M. Zaheer, Z. Garrett, K. Rush, J. Konečný, S. Kumar, H. B. McMahan,
"Adaptive Federated Optimization", ICLR 2021, Algorithm 2. With Δ_t the weighted mean of the
round's client deltas:

    m_t     = β1 m_{t-1} + (1 - β1) Δ_t
    v_t     = v_{t-1} + Δ_t²                                    (FedAdagrad)
    v_t     = β2 v_{t-1} + (1 - β2) Δ_t²                        (FedAdam)
    v_t     = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)      (FedYogi)
    x_{t+1} = x_t + η m_t / (√v_t + τ)

The three differ only in the second-moment rule, so they share one implementation
(:class:`_AdaptiveOptimizer`) and each subclass supplies ``_second_moment``. As in the
paper there is no bias correction. Initial values: m_{-1} = 0 and v_{-1} = τ² (the paper asks
for v_{-1} ≥ τ²; τ² is the smallest allowed value, so the first steps are as large as the
paper permits and are not damped by an arbitrary constant).

The moments are kept as float32 slots ``"m"`` and ``"v"`` in :class:`ServerState` (the model's
dtype: optimizer state costs 2 × 4 bytes per parameter, not 2 × 8); each step computes in
float64 and rounds once when storing.

Defaults: β1 = 0.9 and β2 = 0.99, the values the paper fixes in its experiments; τ = 1e-3 (the
paper tunes τ per task on a logarithmic grid; 1e-3 is a moderate point of it). The server
learning rate η has no default on purpose: the paper tunes it per task on a logarithmic grid and
the best values differ by orders of magnitude between tasks, so any default would silently be
wrong for most models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from shoal.errors import SpecError
from shoal.strategy.fedavg import check_delta, check_hyperparameter
from shoal.strategy.state import ServerState, initial_params

__all__ = ["FedAdagrad", "FedAdam", "FedYogi"]

_SLOTS = ("m", "v")


@dataclass(frozen=True, kw_only=True)
class _AdaptiveOptimizer:
    """The shared FedOpt step of Reddi et al. (ICLR 2021, Algorithm 2); subclass to pick v_t.

    Args (keyword-only):
        server_lr: η, in (0, inf); required (see the module docstring).
        beta1: β1, first-moment decay, in [0, 1).
        tau: τ, adaptivity / numerical-stability constant, in (0, inf).

    Raises:
        ConfigError: a hyper-parameter is outside its range.
    """

    server_lr: float
    beta1: float = 0.9
    tau: float = 1e-3
    name: ClassVar[str] = "fedopt"

    def __post_init__(self) -> None:
        checked = {
            "server_lr": check_hyperparameter(
                self.name, "server_lr", self.server_lr, low=0.0, low_open=True
            ),
            "beta1": check_hyperparameter(self.name, "beta1", self.beta1, low=0.0, high=1.0),
            "tau": check_hyperparameter(self.name, "tau", self.tau, low=0.0, low_open=True),
        }
        for key, value in checked.items():
            object.__setattr__(self, key, value)

    def _second_moment(self, v_prev: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        """Return v_t from v_{t-1} and Δ_t² (both float64; may reuse ``v_prev``'s buffer)."""
        raise NotImplementedError

    def init(self, params: np.ndarray) -> ServerState:
        """Return the version-0 state: a float32 copy of ``params``, m = 0 and v = τ²."""
        x = initial_params(params)
        slots = {
            "m": np.zeros_like(x),
            "v": np.full_like(x, self.tau**2),
        }
        return ServerState(params=x, version=0, slots=slots)

    def client_config(self, state: ServerState) -> dict[str, float]:
        """The adaptive optimizers ask nothing extra of clients."""
        return {}

    def apply(self, state: ServerState, delta: np.ndarray) -> ServerState:
        """Return a new state one adaptive server step ahead; ``state`` is left untouched.

        Raises:
            SpecError: ``state`` lacks the ``"m"``/``"v"`` slots (it was not made by an
                adaptive optimizer's ``init``) or ``delta`` does not fit the model.
        """
        missing = [slot for slot in _SLOTS if slot not in state.slots]
        if missing:
            raise SpecError(
                f"{self.name} needs server-state slots {list(_SLOTS)}, missing {missing}; "
                f"build the state with {type(self).__name__}.init"
            )
        delta = check_delta(state, delta)  # fresh float64 array, owned here

        m = state.slots["m"].astype(np.float64)
        m *= self.beta1
        m += (1.0 - self.beta1) * delta

        np.square(delta, out=delta)  # Δ itself is no longer needed, only Δ²
        v = self._second_moment(state.slots["v"].astype(np.float64), delta)

        step = np.sqrt(v)
        step += self.tau
        np.divide(m, step, out=step)
        step *= self.server_lr
        step += state.params
        return ServerState(
            params=step.astype(np.float32),
            version=state.version + 1,
            slots={"m": m.astype(np.float32), "v": v.astype(np.float32)},
        )


@dataclass(frozen=True, kw_only=True)
class FedAdagrad(_AdaptiveOptimizer):
    """FedAdagrad: v_t = v_{t-1} + Δ_t² (Reddi et al., ICLR 2021)."""

    name: ClassVar[str] = "fedadagrad"

    def _second_moment(self, v_prev: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        v_prev += delta_sq
        return v_prev


@dataclass(frozen=True, kw_only=True)
class _DecayedSecondMoment(_AdaptiveOptimizer):
    """Adds β2, the second-moment decay shared by FedAdam and FedYogi, in [0, 1)."""

    beta2: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        beta2 = check_hyperparameter(self.name, "beta2", self.beta2, low=0.0, high=1.0)
        object.__setattr__(self, "beta2", beta2)


@dataclass(frozen=True, kw_only=True)
class FedAdam(_DecayedSecondMoment):
    """FedAdam: v_t = β2 v_{t-1} + (1 - β2) Δ_t² (Reddi et al., ICLR 2021)."""

    name: ClassVar[str] = "fedadam"

    def _second_moment(self, v_prev: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        v_prev *= self.beta2
        v_prev += (1.0 - self.beta2) * delta_sq
        return v_prev


@dataclass(frozen=True, kw_only=True)
class FedYogi(_DecayedSecondMoment):
    """FedYogi: v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²) (Reddi et al., ICLR 2021).

    Unlike Adam, v moves towards Δ² additively, so one large update cannot inflate v (and
    shrink later steps) as abruptly. v stays positive: it only decreases where v > Δ², and then
    by less than Δ².
    """

    name: ClassVar[str] = "fedyogi"

    def _second_moment(self, v_prev: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        v_prev -= (1.0 - self.beta2) * delta_sq * np.sign(v_prev - delta_sq)
        return v_prev
