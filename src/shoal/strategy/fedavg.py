"""Server state, the streaming weighted mean, and the FedAvg and FedProx strategies.

FedAvg: H. B. McMahan, E. Moore, D. Ramage, S. Hampson, B. Agüera y Arcas,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.
FedProx: T. Li, A. K. Sahu, M. Zaheer, M. Sanjabi, A. Talwalkar, V. Smith,
"Federated Optimization in Heterogeneous Networks", MLSys 2020.

A strategy is pure: ``init`` builds a :class:`ServerState`, ``accumulator`` hands out an empty
:class:`WeightedMean` for one round, the coordinator folds client deltas into it as they arrive,
and ``apply`` turns the old state and the filled accumulator into a *new* state. No strategy
owns a round loop, a clock or a socket, so the same objects serve the synchronous coordinator,
buffered asynchronous aggregation and the in-process simulator.

A *delta* is ``client_params - received_global_params``, a flat vector of the model's length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from shoal.errors import ConfigError, ShoalError, SpecError, UpdateRejected

__all__ = [
    "EmptyAccumulator",
    "FedAvg",
    "FedProx",
    "ServerState",
    "Strategy",
    "WeightedMean",
]

_PARAMS_KEY = "params"
_ROUND_KEY = "round"
_SLOT_PREFIX = "slot."
_REAL_TYPES = (int, float, np.integer, np.floating)
# float16/32/64 widen exactly to float64; longdouble would be silently rounded, so it is refused.
_ACCEPTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class EmptyAccumulator(ShoalError):
    """A mean was requested from an accumulator that received no update."""


# ---------------------------------------------------------------------------------------------
# Server state
# ---------------------------------------------------------------------------------------------


def _read_only_vector(what: str, array: object, dim: int | None) -> np.ndarray:
    """Return a read-only view of a 1-D float32 array, or raise SpecError naming ``what``."""
    if not isinstance(array, np.ndarray):
        raise SpecError(f"{what} must be a numpy.ndarray, got {type(array).__name__}")
    if array.dtype != np.float32:
        raise SpecError(f"{what} must have dtype float32, got {array.dtype}")
    if array.ndim != 1:
        raise SpecError(f"{what} must be 1-D, got shape {array.shape}")
    if dim is not None and array.shape[0] != dim:
        raise SpecError(f"{what} has length {array.shape[0]}, expected {dim} (the model length)")
    view = array.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True, eq=False)
class ServerState:
    """The global model and the server optimizer's state after ``round`` aggregations.

    The arrays are stored as read-only views, so nothing holding a state can change it in
    place; a strategy's ``apply`` always builds new arrays. The constructor does not copy: a
    caller that keeps a writable reference to an array it passed in must not mutate it.

    Attributes:
        params: the flat float32 global model.
        round: number of aggregations applied so far (0 right after ``init``).
        slots: named optimizer vectors of the model's length (``"m"``, ``"v"`` for the adaptive
            optimizers); empty for FedAvg and FedProx.

    Raises:
        SpecError: an array is not a 1-D float32 ndarray of the model's length, a slot name is
            not a non-empty string, or ``round`` is not a non-negative integer.
    """

    params: np.ndarray
    round: int = 0
    slots: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        params = _read_only_vector("ServerState.params", self.params, None)
        if isinstance(self.round, bool) or not isinstance(self.round, (int, np.integer)):
            raise SpecError(f"ServerState.round must be an int, got {type(self.round).__name__}")
        if self.round < 0:
            raise SpecError(f"ServerState.round must be >= 0, got {self.round}")
        slots: dict[str, np.ndarray] = {}
        for name, array in self.slots.items():
            if not isinstance(name, str) or not name:
                raise SpecError(f"ServerState slot names must be non-empty strings, got {name!r}")
            slots[name] = _read_only_vector(f"ServerState.slots[{name!r}]", array, params.size)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "round", int(self.round))
        object.__setattr__(self, "slots", MappingProxyType(slots))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flatten the state into named arrays for a checkpoint (e.g. ``np.savez``).

        Keys: ``"params"``, ``"round"`` (0-d int64) and ``"slot.<name>"`` per slot. The arrays
        are the state's own read-only views; nothing is copied.
        """
        arrays = {_PARAMS_KEY: self.params, _ROUND_KEY: np.asarray(self.round, dtype=np.int64)}
        for name, array in self.slots.items():
            arrays[_SLOT_PREFIX + name] = array
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ServerState:
        """Rebuild a state written by :meth:`to_arrays`, bit for bit (the arrays are copied).

        Raises:
            SpecError: a key is missing or unknown, ``round`` is not an integer scalar, or an
                array does not have the dtype and length a state requires.
        """
        missing = [key for key in (_PARAMS_KEY, _ROUND_KEY) if key not in arrays]
        if missing:
            raise SpecError(f"server-state arrays lack {missing}; found {sorted(arrays)}")
        def known(key: str) -> bool:
            is_slot = key.startswith(_SLOT_PREFIX) and len(key) > len(_SLOT_PREFIX)
            return is_slot or key in (_PARAMS_KEY, _ROUND_KEY)

        unknown = sorted(key for key in arrays if not known(key))
        if unknown:
            raise SpecError(
                f"server-state arrays have unknown keys {unknown}; expected 'params', 'round' "
                f"and '{_SLOT_PREFIX}<name>'"
            )
        round_ = np.asarray(arrays[_ROUND_KEY])
        if round_.shape != () or round_.dtype.kind not in "iu":
            raise SpecError(
                f"'round' must be an integer scalar, got dtype {round_.dtype} shape {round_.shape}"
            )
        slots = {
            key[len(_SLOT_PREFIX):]: np.array(array, copy=True)
            for key, array in arrays.items()
            if key.startswith(_SLOT_PREFIX)
        }
        return cls(
            params=np.array(arrays[_PARAMS_KEY], copy=True), round=int(round_), slots=slots
        )


def initial_params(params: np.ndarray) -> np.ndarray:
    """Copy a user's initial model into a fresh float32 vector, checking it is usable.

    Raises:
        SpecError: ``params`` is not a 1-D floating ndarray with at least one element, or
            holds NaN or infinity.
    """
    if not isinstance(params, np.ndarray) or params.dtype.kind != "f":
        kind = params.dtype if isinstance(params, np.ndarray) else type(params).__name__
        raise SpecError(f"params must be a floating numpy.ndarray, got {kind}")
    if params.ndim != 1 or params.size == 0:
        raise SpecError(f"params must be a non-empty flat (1-D) vector, got shape {params.shape}")
    if not np.isfinite(params).all():
        bad = int(np.flatnonzero(~np.isfinite(params))[0])
        raise SpecError(f"params must be finite; element {bad} is {params[bad]}")
    return params.astype(np.float32, copy=True)


# ---------------------------------------------------------------------------------------------
# Streaming weighted mean
# ---------------------------------------------------------------------------------------------


def _check_weight(weight: object) -> float:
    """Return ``weight`` as a finite positive float or raise ``UpdateRejected("bad_weight")``."""
    if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, _REAL_TYPES):
        raise UpdateRejected("bad_weight", f"weight must be a real number, got {weight!r}")
    value = float(weight)
    if not math.isfinite(value) or value <= 0.0:
        raise UpdateRejected("bad_weight", f"weight must be finite and > 0, got {value!r}")
    return value


class WeightedMean:
    """Streaming weighted mean of vectors of one fixed length; memory O(dim), not O(n * dim).

    Each accepted update is validated first and only then folded into a running float64 sum, so
    a rejected update leaves the accumulator exactly as it was. The sum is float64 because it
    adds up many float32 vectors with weights such as example counts: in float32 the rounding
    error of a running sum grows with the number of terms (24-bit mantissa, ~6e-8 per add) and
    depends on arrival order, whereas in float64 it stays ~1e-16 per add, far below the float32
    resolution of the result. The mean is therefore the same, to within one float32 rounding,
    whatever order the updates arrive in, and adding one update or merging partial sums gives
    the same answer.

    Not thread-safe: one accumulator belongs to one coordinator task; concurrent producers should
    each fill their own and :meth:`merge` them.
    """

    __slots__ = ("_count", "_dim", "_scratch", "_sum", "_total_weight")

    def __init__(self, dim: int) -> None:
        """Create an empty accumulator for vectors of length ``dim`` (>= 1).

        Raises:
            SpecError: ``dim`` is not a positive integer.
        """
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise SpecError(f"WeightedMean dim must be a positive int, got {dim!r}")
        self._dim = int(dim)
        self._sum = np.zeros(self._dim, dtype=np.float64)
        # Reused for weight * update so a busy aggregator does not allocate (and the allocator
        # does not map and unmap) one dim-sized float64 buffer per upload.
        self._scratch: np.ndarray | None = None
        self._count = 0
        self._total_weight = 0.0

    @property
    def dim(self) -> int:
        """Length of the vectors this accumulator takes."""
        return self._dim

    @property
    def count(self) -> int:
        """Number of updates folded in so far (merged accumulators included)."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights folded in so far."""
        return self._total_weight

    def _check_dtype(self, array: object, what: str) -> np.ndarray:
        if not isinstance(array, np.ndarray):
            raise UpdateRejected(
                "wrong_dtype", f"{what} must be a numpy.ndarray, got {type(array).__name__}"
            )
        if array.dtype not in _ACCEPTED_DTYPES:
            raise UpdateRejected(
                "wrong_dtype", f"{what} must be float16, float32 or float64, got {array.dtype}"
            )
        return array

    def add(self, update: np.ndarray, weight: float) -> None:
        """Fold ``weight * update`` into the running sum.

        Args:
            update: a 1-D float16/32/64 vector of length ``dim``, every element finite.
            weight: a finite weight > 0 (typically the client's number of examples).

        Raises:
            UpdateRejected: with reason ``"wrong_dtype"``, ``"wrong_shape"``, ``"bad_weight"`` or
                ``"non_finite"`` (NaN or infinity, or ``weight * update`` overflowing float64).
                The accumulator is then exactly as it was before the call.
        """
        vector = self._check_dtype(update, "update")
        if vector.ndim != 1 or vector.shape[0] != self._dim:
            raise UpdateRejected(
                "wrong_shape", f"update has shape {vector.shape}, expected ({self._dim},)"
            )
        w = _check_weight(weight)
        if self._scratch is None:
            self._scratch = np.empty(self._dim, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # reported below as "non_finite"
            scaled = np.multiply(vector, w, out=self._scratch, dtype=np.float64)
        if not np.isfinite(scaled).all():
            raise UpdateRejected("non_finite", _describe_non_finite(vector[np.newaxis], w))
        self._sum += scaled
        self._count += 1
        self._total_weight += w

    def add_stacked(self, updates: np.ndarray, weights: np.ndarray) -> None:
        """Fold a whole cohort at once: ``weights @ updates`` in float64, then one add.

        Meant for the in-process simulator, which already holds its cohort as one ``(k, dim)``
        array. Validation is per row, and a single bad row rejects the whole call.

        Args:
            updates: ``(k, dim)`` float16/32/64 array, one client delta per row.
            weights: ``(k,)`` array of finite weights > 0.

        Raises:
            UpdateRejected: as :meth:`add`, the detail naming the first offending row; nothing
                is folded in.
        """
        matrix = self._check_dtype(updates, "updates")
        if matrix.ndim != 2 or matrix.shape[1] != self._dim:
            raise UpdateRejected(
                "wrong_shape", f"updates has shape {matrix.shape}, expected (k, {self._dim})"
            )
        rows = matrix.shape[0]
        w = np.asarray(weights)
        if w.shape != (rows,):
            raise UpdateRejected(
                "bad_weight", f"weights has shape {w.shape}, expected ({rows},), one per row"
            )
        if w.dtype.kind not in "iuf":
            raise UpdateRejected("bad_weight", f"weights must be real numbers, got {w.dtype}")
        w = w.astype(np.float64)
        bad = np.flatnonzero(~(np.isfinite(w) & (w > 0.0)))
        if bad.size:
            row = int(bad[0])
            raise UpdateRejected(
                "bad_weight", f"row {row}: weight must be finite and > 0, got {w[row]!r}"
            )
        if rows == 0:
            return
        with np.errstate(over="ignore", invalid="ignore"):  # reported below as "non_finite"
            folded = _weighted_row_sum(w, matrix)
        # With every weight finite and > 0, any NaN or infinity in a row makes its column of
        # `folded` non-finite, so checking the folded vector checks every row.
        if not np.isfinite(folded).all():
            raise UpdateRejected("non_finite", _describe_non_finite(matrix, None))
        self._sum += folded
        self._count += rows
        self._total_weight += float(w.sum())

    def merge(self, other: WeightedMean) -> None:
        """Fold another accumulator's partial sum into this one (``other`` is not changed).

        The result is as if every update added to ``other`` had been added here: this is how an
        edge aggregator's partial sum joins the global one.

        Raises:
            TypeError: ``other`` is not a WeightedMean.
            UpdateRejected: ``"wrong_shape"`` if the lengths differ, ``"duplicate"`` if
                ``other`` is this accumulator; nothing is changed.
        """
        if not isinstance(other, WeightedMean):
            raise TypeError(f"can only merge a WeightedMean, got {type(other).__name__}")
        if other is self:
            raise UpdateRejected("duplicate", "an accumulator cannot be merged into itself")
        if other._dim != self._dim:
            raise UpdateRejected(
                "wrong_shape", f"merged accumulator has dim {other._dim}, expected {self._dim}"
            )
        self._sum += other._sum
        self._count += other._count
        self._total_weight += other._total_weight

    def mean(self, dtype: type[np.floating] = np.float32) -> np.ndarray:
        """Return the weighted mean ``sum_i w_i u_i / sum_i w_i`` as a new array.

        Args:
            dtype: float32 (default, the model's dtype) or float64 for callers that keep
                computing before rounding to float32.

        Raises:
            EmptyAccumulator: no update was accumulated.
        """
        if self._count == 0:
            raise EmptyAccumulator("no updates were accumulated")
        mean = self._sum / self._total_weight
        return mean if np.dtype(dtype) == np.float64 else mean.astype(dtype)

    def __repr__(self) -> str:
        return (
            f"WeightedMean(dim={self._dim}, count={self._count}, "
            f"total_weight={self._total_weight!r})"
        )


#: Rows folded per float32 partial sum (bounds its rounding error to about this many ulps).
_F32_BLOCK = 64


def _weighted_row_sum(w: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``w @ matrix`` as a float64 vector, in O(dim) extra memory.

    float32 matrices (the simulator's cohorts) go through BLAS ``sgemv`` on blocks of
    :data:`_F32_BLOCK` rows, with the weights scaled into [0, 1] so they lose nothing to float32
    range; the block sums are then accumulated in float64. That is 4-5x faster than a float64
    einsum and keeps each block's relative rounding error near ``_F32_BLOCK * 2**-24``. Other
    dtypes use einsum, which casts through small buffers instead of copying the matrix to
    float64.
    """
    if matrix.dtype != np.float32:
        return np.einsum("k,kd->d", w, matrix, dtype=np.float64, casting="safe")
    out = np.zeros(matrix.shape[1], dtype=np.float64)
    for start in range(0, matrix.shape[0], _F32_BLOCK):
        wb = w[start:start + _F32_BLOCK]
        top = float(wb.max())
        out += (wb / top).astype(np.float32) @ matrix[start:start + _F32_BLOCK] * top
    return out


def _describe_non_finite(rows: np.ndarray, weight: float | None) -> str:
    """Name the first non-finite element (error path only, so clarity beats speed)."""
    finite = np.isfinite(rows)
    if finite.all():
        scale = f" times weight {weight!r}" if weight is not None else " times its weight"
        return f"the update{scale} overflows float64"
    row, col = (int(i) for i in np.argwhere(~finite)[0])
    where = f"row {row}, element {col}" if rows.shape[0] > 1 or weight is None else f"element {col}"
    return f"{where} is {rows[row, col]}"


# ---------------------------------------------------------------------------------------------
# The strategy interface
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class Strategy(Protocol):
    """A server-side aggregation rule: state in, state out, no round loop inside.

    Per round the coordinator calls ``acc = strategy.accumulator(state)``, then ``acc.add(delta,
    weight)`` for each arriving client update, then ``state = strategy.apply(state, acc)``.
    Clients train with the extra settings of ``strategy.client_config(state)``.
    """

    @property
    def name(self) -> str:
        """Registry name, e.g. ``"fedavg"``."""
        ...

    def init(self, params: np.ndarray) -> ServerState:
        """Return the round-0 state for the initial flat model ``params`` (copied)."""
        ...

    def client_config(self, state: ServerState) -> dict[str, float]:
        """Return the extra local-training settings clients need this round (a new dict)."""
        ...

    def accumulator(self, state: ServerState) -> WeightedMean:
        """Return an empty accumulator sized for ``state``'s model."""
        ...

    def apply(self, state: ServerState, acc: WeightedMean) -> ServerState:
        """Return the next state from ``state`` and the round's accumulated deltas.

        Never mutates ``state`` or its arrays. Raises EmptyAccumulator if ``acc`` is empty and
        SpecError if ``acc`` or ``state`` does not fit this strategy.
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
    bad = isinstance(value, (bool, np.bool_)) or not isinstance(value, _REAL_TYPES)
    number = math.nan if bad else float(value)  # type: ignore[arg-type]
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


def mean_delta(state: ServerState, acc: WeightedMean) -> np.ndarray:
    """Return the round's weighted-mean delta in float64 after checking it fits ``state``.

    Raises:
        SpecError: ``acc`` was made for a model of another length.
        EmptyAccumulator: no update was accumulated.
    """
    if not isinstance(acc, WeightedMean):
        raise TypeError(f"acc must be a WeightedMean, got {type(acc).__name__}")
    if acc.dim != state.params.size:
        raise SpecError(
            f"accumulator has dim {acc.dim} but the model has {state.params.size} parameters"
        )
    return acc.mean(np.float64)


# ---------------------------------------------------------------------------------------------
# FedAvg and FedProx
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FedAvg:
    """Federated averaging (McMahan et al., AISTATS 2017), with an optional server step size.

    ``params <- params + server_lr * sum_k w_k delta_k / sum_k w_k``. With ``server_lr = 1`` and
    weights equal to example counts, the new model is the example-weighted mean of the client
    models, as in the paper. The sum is rounded to float32 once, at the end.

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
        """Return the round-0 state: a float32 copy of ``params`` and no slots."""
        return ServerState(params=initial_params(params), round=0)

    def client_config(self, state: ServerState) -> dict[str, float]:
        """FedAvg asks nothing extra of clients."""
        return {}

    def accumulator(self, state: ServerState) -> WeightedMean:
        """Return an empty accumulator for ``state``'s model length."""
        return WeightedMean(state.params.size)

    def apply(self, state: ServerState, acc: WeightedMean) -> ServerState:
        """Return a new state one server step ahead; ``state`` is left untouched.

        Raises:
            EmptyAccumulator: no update was accumulated this round.
            SpecError: ``acc`` was made for a model of another length.
        """
        delta = mean_delta(state, acc)
        delta *= self.server_lr  # `delta` is a fresh float64 array owned here
        delta += state.params
        return ServerState(
            params=delta.astype(np.float32), round=state.round + 1, slots=state.slots
        )


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
        """Return the round-0 state, as FedAvg does."""
        return self._fedavg.init(params)

    def client_config(self, state: ServerState) -> dict[str, float]:
        """Return ``{"mu": mu}``, the proximal coefficient for local training."""
        return {"mu": self.mu}

    def accumulator(self, state: ServerState) -> WeightedMean:
        """Return an empty accumulator, as FedAvg does."""
        return self._fedavg.accumulator(state)

    def apply(self, state: ServerState, acc: WeightedMean) -> ServerState:
        """Aggregate exactly as FedAvg does (see :meth:`FedAvg.apply`)."""
        return self._fedavg.apply(state, acc)
