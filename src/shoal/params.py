"""Model parameters as one flat vector plus a small spec.

Every model update in shoal travels and aggregates as a single contiguous float32 vector.
The :class:`ParamSpec` records where each named tensor lives inside that vector (name, shape,
dtype, offset), so aggregation, clipping, noise, compression and secure-aggregation masking
are written once, as vector operations, and never loop over layers.

Unflattening returns *views* into the flat vector (no copy): going back to named arrays costs
nothing, and writing through a view writes the vector.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shoal.errors import SpecError

__all__ = ["ParamSpec", "TensorSpec", "flatten", "unflatten"]

#: The dtype of every flat vector. Models with other parameter dtypes are cast on the way in.
FLAT_DTYPE = np.dtype(np.float32)


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor inside the flat vector."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def stop(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes, dtypes and offsets of a model's tensors in its flat vector.

    Build one with :meth:`from_shapes` (or ``shoal.frameworks.torch.spec_of`` for a module).
    Specs compare by value, so two processes that built the same model agree on its spec;
    :attr:`fingerprint` is a short stable digest to send over the wire instead of the spec.
    """

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, Sequence[int]] | Sequence[tuple[str, Sequence[int]]],
        dtype: str = "float32",
    ) -> ParamSpec:
        """Lay tensors out back to back, in the given order."""
        items = list(shapes.items()) if isinstance(shapes, Mapping) else list(shapes)
        tensors = []
        offset = 0
        seen: set[str] = set()
        for name, shape in items:
            if name in seen:
                raise SpecError(f"duplicate tensor name {name!r} in spec")
            seen.add(name)
            shape_t = tuple(int(s) for s in shape)
            if any(s < 0 for s in shape_t):
                raise SpecError(f"tensor {name!r} has a negative dimension: {shape_t}")
            t = TensorSpec(name, shape_t, dtype, offset)
            tensors.append(t)
            offset = t.stop
        return cls(tuple(tensors))

    @property
    def size(self) -> int:
        """Total number of scalars: the length of the flat vector."""
        return self.tensors[-1].stop if self.tensors else 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def __getitem__(self, name: str) -> TensorSpec:
        """The tensor called ``name``.

        Raises:
            SpecError: no tensor has that name (the message lists those that do).
        """
        for t in self.tensors:
            if t.name == name:
                return t
        raise SpecError(f"no tensor named {name!r} in the spec; it has {list(self.names)}")

    @property
    def fingerprint(self) -> str:
        """A 16-hex-digit digest of names, shapes and dtypes (offsets follow from them)."""
        blob = json.dumps([(t.name, t.shape, t.dtype) for t in self.tensors]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
                            for t in self.tensors]}

    @classmethod
    def from_dict(cls, d: Mapping) -> ParamSpec:
        try:
            entries = d["tensors"]
            spec = cls.from_shapes([(e["name"], e["shape"]) for e in entries])
        except (KeyError, TypeError) as exc:
            raise SpecError(f"malformed parameter spec: {exc!r}") from exc
        dtypes = {e.get("dtype", "float32") for e in entries}
        if len(dtypes) > 1:
            raise SpecError(f"mixed dtypes are not supported in one flat vector: {sorted(dtypes)}")
        return spec

    def check_vector(self, vec: np.ndarray, what: str = "vector") -> None:
        """Raise :class:`SpecError` unless ``vec`` is a 1-D vector of this spec's length."""
        if not isinstance(vec, np.ndarray) or vec.ndim != 1:
            shape = getattr(vec, "shape", type(vec).__name__)
            raise SpecError(f"{what} must be a 1-D array, got shape {shape}")
        if vec.shape[0] != self.size:
            raise SpecError(f"{what} has {vec.shape[0]} elements, the spec needs {self.size}")


def flatten(arrays: Mapping[str, np.ndarray], spec: ParamSpec, out: np.ndarray | None = None
            ) -> np.ndarray:
    """Copy named arrays into one float32 vector laid out by ``spec``.

    Args:
        arrays: one array per spec name (extra names are an error, so typos surface).
        spec: the layout.
        out: optional preallocated vector of length ``spec.size`` to fill.

    Raises:
        SpecError: a name is missing or unexpected, or a shape differs from the spec.
    """
    missing = [n for n in spec.names if n not in arrays]
    extra = [n for n in arrays if n not in set(spec.names)]
    if missing or extra:
        raise SpecError(f"parameter names differ from the spec: missing {missing}, "
                        f"unexpected {extra}")
    if out is None:
        out = np.empty(spec.size, dtype=FLAT_DTYPE)
    else:
        spec.check_vector(out, "out")
    for t in spec.tensors:
        a = np.asarray(arrays[t.name])
        if a.shape != t.shape:
            raise SpecError(f"tensor {t.name!r} has shape {a.shape}, the spec says {t.shape}")
        out[t.offset:t.stop] = a.reshape(-1)
    return out


def unflatten(vec: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
    """Named views into ``vec`` (no copy): writing a view writes the vector.

    Raises:
        SpecError: ``vec`` is not a 1-D vector of ``spec.size`` elements.
    """
    spec.check_vector(vec)
    return {t.name: vec[t.offset:t.stop].reshape(t.shape) for t in spec.tensors}
