"""The server optimizer interface and FedAvg and FedProx.

FedAvg: H. B. McMahan, E. Moore, D. Ramage, S. Hampson, B. Agüera y Arcas,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.
FedProx: T. Li, A. K. Sahu, M. Zaheer, M. Sanjabi, A. Talwalkar, V. Smith,
"Federated Optimization in Heterogeneous Networks", MLSys 2020.

A strategy is the last stage of the aggregation pipeline and nothing more: ``init`` builds a
:class:`~shoal.strategy.state.ServerState`, ``client_config`` says what clients need to
train (FedProx's ``mu``), and ``apply`` turns the old state and one mean delta (what the
pipeline made of a round's or a server step's updates) into a *new* state. No strategy owns
a round loop, an accumulator, a clock or a socket, so the same objects serve synchronous
rounds, buffered asynchronous aggregation, secure and private pipelines alike.

A *delta* is ``client_params - received_global_params``, a flat vector of the model's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from shoal.errors import ConfigError, SpecError
from shoal.strategy.state import ServerState, initial_params

__all__ = ["FedAvg", "FedProx", "Strategy", "check_delta", "check_hyperparameter"]

_REAL_TYPES = (int, float, np.integer, np.floating)


@runtime_checkable
class Strategy(Protocol):
    """A server optimizer: state in, state out, no round loop inside.

    For each new version the coordinator calls ``state = strategy.apply(state, delta)`` with
    the pipeline's mean delta. Clients train with the extra settings of
    ``strategy.client_config(state)``.
    """

    @property
    def name(self) -> str:
        """Registry name, e.g. ``"fedavg"``."""
        ...

    def init(self, params: np.ndarray) -> ServerState:
        """Return the version-0 state for the initial flat model ``params`` (copied)."""
        ...

    def client_config(self, state: ServerState) -> dict[str, float]:
        """Return the extra local-training settings clients need (a new dict)."""
        ...

    def apply(self, state: ServerState, delta: np.ndarray) -> ServerState:
        """Return the next state (version + 1) from ``state`` and the mean delta.

        Never mutates ``state``, its arrays or ``delta``. Raises SpecError if ``delta`` does
        not fit the model.
        """
        ...


def check_hyperparameter(
    strategy: str,
    name: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    """Return ``value`` as a float if it lies in the interval, else raise ConfigError.

    The message names the strategy, the parameter and the interval; the error's ``key`` is
    ``"strategy.<name>"``.
    """
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    interval = f"{left}{low:g}, {high:g}{right}"
    if isinstance(value, _REAL_TYPES) and not isinstance(value, (bool, np.bool_)):
        number = float(value)
    else:
        number = math.nan
    inside = (
        math.isfinite(number)
        and (number > low if low_open else number >= low)
        and (number < high if high_open else number <= high)
    )
    if not inside:
        raise ConfigError(
            f"{strategy}: {name} must be a finite number in {interval}, got {value!r}",
            key=f"strategy.{name}",
        )
    return number


def check_delta(state: ServerState, delta: np.ndarray) -> np.ndarray:
    """Return ``delta`` as a fresh float64 vector after checking it fits ``state``.

    Raises:
        SpecError: ``delta`` is not a finite 1-D float vector of the model's length.
    """
    if not isinstance(delta, np.ndarray) or delta.dtype.kind != "f":
        kind = delta.dtype if isinstance(delta, np.ndarray) else type(delta).__name__
        raise SpecError(f"the mean delta must be a floating numpy.ndarray, got {kind}")
    if delta.shape != state.params.shape:
        raise SpecError(f"the mean delta has shape {delta.shape} but the model has "
                        f"{state.params.size} parameters")
    if not np.isfinite(delta).all():
        raise SpecError("the mean delta holds NaN or infinity")
    return np.array(delta, dtype=np.float64, copy=True)


# ---------------------------------------------------------------------------------------------
# FedAvg and FedProx
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FedAvg:
    """Federated averaging (McMahan et al., AISTATS 2017), with an optional server step size.

    ``params <- params + server_lr * delta`` where ``delta`` is the pipeline's mean (the
    example-weighted mean of the client deltas for the plain pipeline). With ``server_lr = 1``
    the new model is the example-weighted mean of the client models, as in the paper. The sum
    is rounded to float32 once, at the end.

    Args:
        server_lr: step size applied to the mean delta, in (0, inf).

    Raises:
        ConfigError: ``server_lr`` is not a finite number > 0.
    """

    server_lr: float = 1.0
    name: ClassVar[str] = "fedavg"

    def __post_init__(self) -> None:
        lr = check_hyperparameter(self.name, "server_lr", self.server_lr, low=0.0, low_open=True)
        object.__setattr__(self, "server_lr", lr)

    def init(self, params: np.ndarray) -> ServerState:
        """Return the version-0 state: a float32 copy of ``params`` and no slots."""
        return ServerState(params=initial_params(params), version=0)

    def client_config(self, state: ServerState) -> dict[str, float]:
        """FedAvg asks nothing extra of clients."""
        return {}

    def apply(self, state: ServerState, delta: np.ndarray) -> ServerState:
        """Return a new state one server step ahead; ``state`` is left untouched.

        Raises:
            SpecError: ``delta`` does not fit the model.
        """
        step = check_delta(state, delta)
        step *= self.server_lr  # `step` is a fresh float64 array owned here
        step += state.params
        return ServerState(params=step.astype(np.float32), version=state.version + 1,
                           slots=state.slots)


@dataclass(frozen=True)
class FedProx:
    """FedProx (Li et al., MLSys 2020): FedAvg on the server, a proximal term on the clients.

    Clients minimise ``F_k(w) + (mu / 2) * ||w - w_t||^2`` locally; the server aggregates
    exactly as :class:`FedAvg` does, to which every server-side method delegates. The only
    difference is :meth:`client_config`, which carries ``mu`` to the clients.

    Args:
        mu: proximal coefficient, in [0, inf) (0 makes the local objective FedAvg's).
        server_lr: as for FedAvg.

    Raises:
        ConfigError: ``mu`` is negative or not finite, or ``server_lr`` is invalid.
    """

    mu: float
    server_lr: float = 1.0
    name: ClassVar[str] = "fedprox"

    def __post_init__(self) -> None:
        mu = check_hyperparameter(self.name, "mu", self.mu, low=0.0)
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "server_lr", self._fedavg.server_lr)

    @property
    def _fedavg(self) -> FedAvg:
        return FedAvg(server_lr=self.server_lr)

    def init(self, params: np.ndarray) -> ServerState:
        """Return the version-0 state, as FedAvg does."""
        return self._fedavg.init(params)

    def client_config(self, state: ServerState) -> dict[str, float]:
        """Return ``{"mu": mu}``, the proximal coefficient for local training."""
        return {"mu": self.mu}

    def apply(self, state: ServerState, delta: np.ndarray) -> ServerState:
        """Aggregate exactly as FedAvg does (see :meth:`FedAvg.apply`)."""
        return self._fedavg.apply(state, delta)
