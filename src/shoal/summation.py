"""The streaming weighted sum every plain aggregate is built on.

:class:`WeightedMean` folds updates into a float64 running sum as they arrive (memory
O(model), whatever the number of clients), validating each before it touches the sum.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from shoal.errors import ShoalError, SpecError, UpdateRejected

__all__ = ["EmptyAccumulator", "WeightedMean", "finite_rows", "norms_above"]

_REAL_TYPES = (int, float, np.integer, np.floating)
# float16/32/64 widen exactly to float64; longdouble would be silently rounded, so it is refused.
_ACCEPTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# a weight at most this times a finite float16/32 value is finite in float64, and so is a sum
# of 2**32 such products (float32's largest is 3.4e38; float64's 1.8e308)
_SAFE_WEIGHT = 1e250


def finite_rows(rows: np.ndarray) -> np.ndarray:
    """Which rows of a 2-D float array hold only finite values. A row's sum is finite only
    if every element is (inf and NaN propagate; inf - inf is NaN), so one BLAS pass (a
    matrix-vector product, ~2x faster than ``isfinite(rows).all(1)``) clears most rows; the
    rows it flags (a non-finite element, or finite values whose sum overflowed) get the
    exact check."""
    if rows.dtype == np.float16 or rows.shape[1] == 0:
        return np.isfinite(rows).all(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(rows @ _ones(rows.shape[1], rows.dtype))
    if not finite.all():
        suspect = np.flatnonzero(~finite)
        finite[suspect] = np.isfinite(rows[suspect]).all(axis=1)
    return finite


_U32 = 2.0 ** -24              # float32's unit roundoff
_TINY32 = float(np.finfo(np.float32).tiny)  # a square below it may be lost (underflow)


def norms_above(rows: np.ndarray, bound: float) -> np.ndarray:
    """Which rows of a 2-D float array have an L2 norm above ``bound``, their squares
    summed in float64 (NaN rows are not above).

    A float32 row's squared norm is first summed in float32 (a BLAS dot, ~9x faster than
    a float64 einsum; an einsum for many rows). An n-term dot product in any order is off
    by at most ``g_n = nu / (1 - nu)`` relative for terms of one sign (``u = 2**-24``; N. J.
    Higham, "Accuracy and Stability of Numerical Algorithms", 2002, sec. 3.1; ``g_(n+1)``
    is used, a margin), plus what squares below float32's smallest normal lose (``n x
    tiny``), so a row whose float32 result is outside ``bound**2 x (1 -+ g) -+ n x tiny`` is
    on the side it shows; the rest (near the bound, or overflowed to inf) are summed in
    float64."""
    b = float(bound)
    bound2 = b * b  # inf for a bound above ~1e154 (** would raise OverflowError)
    n = rows.shape[1]
    g = (n + 1) * _U32 / (1 - (n + 1) * _U32) if (n + 1) * _U32 < 0.5 else math.inf
    if rows.dtype != np.float32 or not math.isfinite(g):
        return _exact_sq_norms(rows) > bound2
    with np.errstate(over="ignore", invalid="ignore"):  # a few rows: BLAS; many: einsum
        fast = np.array([row @ row for row in rows], np.float64) if len(rows) <= 8 else \
            np.einsum("ij,ij->i", rows, rows).astype(np.float64)
    slack = n * _TINY32
    above = np.isfinite(fast) & (fast > bound2 * (1 + g) + slack)
    unsure = ~above & ~(fast <= bound2 * (1 - g) - slack)  # inf and NaN are unsure
    if unsure.any():
        idx = np.flatnonzero(unsure)
        above[idx] = _exact_sq_norms(rows[idx]) > bound2
    return above


def _exact_sq_norms(rows: np.ndarray) -> np.ndarray:
    """Squared L2 norms of the rows accumulated in float64 (squares of finite float32
    values can overflow float32)."""
    return np.einsum("ij,ij->i", rows, rows, dtype=np.float64)


@functools.lru_cache(maxsize=8)
def _ones(n: int, dtype: np.dtype) -> np.ndarray:
    """A read-only vector of ``n`` ones (the model length's, made once, not per update)."""
    out = np.ones(n, dtype)
    out.flags.writeable = False
    return out


class EmptyAccumulator(ShoalError):
    """A mean was requested from an accumulator that received no update."""


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
        # widen, then scale in place: the same float64 product as a casting multiply, faster
        scaled = self._scratch
        np.copyto(scaled, vector)
        with np.errstate(over="ignore", invalid="ignore"):  # reported below as "non_finite"
            np.multiply(scaled, w, out=scaled)
        # the product is finite when the update is and the weight cannot overflow it (one
        # BLAS pass over the float32 update); otherwise the exact check settles it
        if not (w <= _SAFE_WEIGHT and vector.dtype != np.float64
                and finite_rows(vector[np.newaxis])[0]) and not np.isfinite(scaled).all():
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

    def running_sum(self) -> np.ndarray:
        """The float64 sum of ``weight * update`` so far (a copy)."""
        return self._sum.copy()

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
