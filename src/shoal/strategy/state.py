"""The server's state: the global model version and the server optimizer's slots.

A :class:`ServerState` is immutable: a strategy's ``apply`` returns a new one. Its
``version`` counts the server steps applied (0 right after ``init``): a synchronous round or
a buffered server step each make one version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from shoal.errors import SpecError

__all__ = ["ServerState", "initial_params"]

_PARAMS_KEY = "params"
_VERSION_KEY = "version"
_LEGACY_VERSION_KEY = "round"  # checkpoints written before versions were named
_SLOT_PREFIX = "slot."


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
    """The global model and the server optimizer's state after ``version`` server steps.

    The arrays are stored as read-only views, so nothing holding a state can change it in
    place; a strategy's ``apply`` always builds new arrays. The constructor does not copy: a
    caller that keeps a writable reference to an array it passed in must not mutate it.

    Attributes:
        params: the flat float32 global model.
        version: the model version: server steps applied so far (0 right after ``init``).
        slots: named optimizer vectors of the model's length (``"m"``, ``"v"`` for the adaptive
            optimizers); empty for FedAvg and FedProx.

    Raises:
        SpecError: an array is not a 1-D float32 ndarray of the model's length, a slot name is
            not a non-empty string, or ``version`` is not a non-negative integer.
    """

    params: np.ndarray
    version: int = 0
    slots: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        params = _read_only_vector("ServerState.params", self.params, None)
        if isinstance(self.version, bool) or not isinstance(self.version, (int, np.integer)):
            raise SpecError(f"ServerState.version must be an int, got "
                            f"{type(self.version).__name__}")
        if self.version < 0:
            raise SpecError(f"ServerState.version must be >= 0, got {self.version}")
        slots: dict[str, np.ndarray] = {}
        for name, array in self.slots.items():
            if not isinstance(name, str) or not name:
                raise SpecError(f"ServerState slot names must be non-empty strings, got {name!r}")
            slots[name] = _read_only_vector(f"ServerState.slots[{name!r}]", array, params.size)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "version", int(self.version))
        object.__setattr__(self, "slots", MappingProxyType(slots))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flatten the state into named arrays for a checkpoint (e.g. ``np.savez``).

        Keys: ``"params"``, ``"version"`` (0-d int64) and ``"slot.<name>"`` per slot. The arrays
        are the state's own read-only views; nothing is copied.
        """
        arrays = {_PARAMS_KEY: self.params, _VERSION_KEY: np.asarray(self.version, dtype=np.int64)}
        for name, array in self.slots.items():
            arrays[_SLOT_PREFIX + name] = array
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ServerState:
        """Rebuild a state written by :meth:`to_arrays`, bit for bit (the arrays are copied).

        Raises:
            SpecError: a key is missing or unknown, ``version`` is not an integer scalar, or an
                array does not have the dtype and length a state requires.
        """
        if _VERSION_KEY not in arrays and _LEGACY_VERSION_KEY in arrays:
            arrays = {(_VERSION_KEY if k == _LEGACY_VERSION_KEY else k): v
                      for k, v in arrays.items()}
        missing = [key for key in (_PARAMS_KEY, _VERSION_KEY) if key not in arrays]
        if missing:
            raise SpecError(f"server-state arrays lack {missing}; found {sorted(arrays)}")
        def known(key: str) -> bool:
            is_slot = key.startswith(_SLOT_PREFIX) and len(key) > len(_SLOT_PREFIX)
            return is_slot or key in (_PARAMS_KEY, _VERSION_KEY)

        unknown = sorted(key for key in arrays if not known(key))
        if unknown:
            raise SpecError(
                f"server-state arrays have unknown keys {unknown}; expected 'params', 'version' "
                f"and '{_SLOT_PREFIX}<name>'"
            )
        version = np.asarray(arrays[_VERSION_KEY])
        if version.shape != () or version.dtype.kind not in "iu":
            raise SpecError(
                f"'version' must be an integer scalar, got dtype {version.dtype} shape "
                f"{version.shape}"
            )
        slots = {
            key[len(_SLOT_PREFIX):]: np.array(array, copy=True)
            for key, array in arrays.items()
            if key.startswith(_SLOT_PREFIX)
        }
        return cls(
            params=np.array(arrays[_PARAMS_KEY], copy=True), version=int(version),
            slots=slots
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
