"""The aggregation pipeline: validate -> stages (clip, ...) -> sum -> stages (noise) -> mean.

One pipeline turns a round's (or a server step's) arriving updates into the mean delta the
server optimizer applies. It is built from small parts behind two protocols:

* a :class:`Stage` sees every batch of rows on the way in (it may rescale rows or reweight
  them, e.g. DP clipping) and the finished sum on the way out (it may change it, e.g. add
  noise and fix the denominator); it carries its own state across rounds (the clip norm, the
  privacy ledger) explicitly: ``begin(state)`` in, ``finish(...) -> (sum, new state)`` out;
* a :class:`SumRule` adds the rows up: the plain streaming weighted sum
  (:class:`PlainSum`), secure aggregation, or a robust rule (:mod:`shoal.robust`). A rule
  that must hold every update (memory O(updates x model)) says so in ``holds_updates``.

Validation is one path for every carrier (:func:`validate_rows`): wrong dtype, wrong shape,
non-finite values, a norm above the bound and an implausible weight are refused per row with
a reason, and a refused row changes nothing.

Stage order is the list order on the way in and the reverse on the way out, like middleware:
``Pipeline([CentralDP(...)], SecAggSum(...))`` clips before the secure sum and adds noise
after it.
"""

from __future__ import annotations


import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from shoal.errors import ConfigError, UpdateRejected
from shoal.summation import WeightedMean, finite_rows, norms_above

__all__ = ["Sum", "Stage", "StageRun", "SumRule", "SumRun", "PlainSum", "Validation",
           "validate_rows", "Refusal", "Pipeline", "PipelineRun", "StepInfo"]

_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Sum:
    """A finished sum: ``vector / weight`` is the mean delta.

    Attributes:
        vector: float64 ``(D,)``.
        weight: the denominator (total weight, or a fixed one such as DP's expected clients).
        count: contributions inside.
        info: values to record (e.g. ``epsilon``, ``secagg_dropped``).
    """

    vector: np.ndarray
    weight: float
    count: int
    info: Mapping[str, float] = field(default_factory=dict)

    def mean(self) -> np.ndarray:
        return self.vector / self.weight


class StageRun(Protocol):
    """One round of a stage."""

    def rows(self, rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Transform incoming rows ``(k, D)`` and weights ``(k,)`` (new arrays, or the same
        ones untouched)."""
        ...

    def finish(self, total: Sum) -> tuple[Sum, Any]:
        """Transform the finished sum; return it and the stage's state for the next round."""
        ...


class Stage(Protocol):
    """A pipeline stage with state carried across rounds (``None`` if stateless)."""

    @property
    def name(self) -> str: ...

    def init(self) -> Any: ...

    def begin(self, state: Any, step: int) -> StageRun: ...

    def allows_step(self, state: Any) -> str:
        """'' if one more step may run, else the reason it may not (e.g. a privacy budget)."""
        ...


class SumRun(Protocol):
    """One round of a sum rule."""

    @property
    def count(self) -> int:
        """Contributions added so far."""
        ...

    def add(self, rows: np.ndarray, weights: np.ndarray) -> None: ...

    def finish(self) -> Sum: ...


class SumRule(Protocol):
    """How rows are added up."""

    @property
    def name(self) -> str: ...

    @property
    def holds_updates(self) -> bool:
        """Whether the rule keeps every update until it finishes (O(updates x model))."""
        ...

    def begin(self, dim: int, step: int) -> SumRun: ...


# --------------------------------------------------------------------------- plain sum


class _PlainRun:
    def __init__(self, dim: int) -> None:
        self.acc = WeightedMean(dim)

    @property
    def count(self) -> int:
        return self.acc.count

    def add(self, rows: np.ndarray, weights: np.ndarray) -> None:
        if len(rows) == 1:
            self.acc.add(rows[0], float(weights[0]))
        else:
            self.acc.add_stacked(rows, weights)

    def finish(self) -> Sum:
        return Sum(self.acc.running_sum(), self.acc.total_weight, self.acc.count)


@dataclass(frozen=True)
class PlainSum:
    """The streaming weighted sum (float64, O(model) memory): FedAvg's aggregate."""

    name: str = "plain"
    holds_updates: bool = False

    def begin(self, dim: int, step: int) -> SumRun:
        return _PlainRun(dim)


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Validation:
    """The bounds every update is checked against.

    Attributes:
        max_norm: refuse rows whose L2 norm exceeds this; ``None`` = no bound.
        max_examples: refuse a claimed weight above this (a device claiming a huge example
            count would otherwise take over the mean).
    """

    max_norm: float | None = None
    max_examples: int = 10_000_000

    def __post_init__(self) -> None:
        if self.max_norm is not None and not (math.isfinite(self.max_norm)
                                              and self.max_norm > 0):
            raise ConfigError(f"max_norm must be a finite number > 0, got {self.max_norm!r}",
                              key="deploy.max_norm")
        if self.max_examples < 1:
            raise ConfigError(f"max_examples must be >= 1, got {self.max_examples!r}",
                              key="max_examples")


def validate_rows(rows: object, weights: object, dim: int, bounds: Validation
                  ) -> tuple[np.ndarray, list[Refusal]]:
    """Which rows of an arrival may be folded.

    Returns ``(keep, refused)``: a bool mask over rows, and one :class:`Refusal` per reason
    that refused any row (its rows as a mask, a readable detail of the first). A whole
    arrival of the wrong type or width is refused as one (``wrong_dtype`` / ``wrong_shape``).
    Rows with a weight of 0 are ``no_data`` (a client without examples contributes nothing;
    not an error of the client).
    """
    if not isinstance(rows, np.ndarray) or rows.dtype not in _DTYPES:
        what = rows.dtype if isinstance(rows, np.ndarray) else type(rows).__name__
        n = len(rows) if isinstance(rows, np.ndarray) and rows.ndim == 2 else 1
        return np.zeros(n, bool), [Refusal("wrong_dtype", np.ones(n, bool),
                                           f"updates must be float16, float32 or float64 "
                                           f"arrays, got {what}")]
    if rows.ndim != 2 or rows.shape[1] != dim:
        n = rows.shape[0] if rows.ndim == 2 else 1
        shape = rows.shape[1:] if rows.ndim == 2 else rows.shape
        return np.zeros(n, bool), [Refusal("wrong_shape", np.ones(n, bool),
                                           f"update has shape {shape}, expected ({dim},)")]
    k = rows.shape[0]
    w = np.asarray(weights)
    if w.shape != (k,) or w.dtype.kind not in "iuf":
        return np.zeros(k, bool), [Refusal("bad_weight", np.ones(k, bool),
                                           f"weights must be {k} numbers, got {w.dtype} "
                                           f"{w.shape}")]
    keep = np.ones(k, bool)
    refused: list[Refusal] = []

    def refuse(mask: np.ndarray, reason: str, detail: Callable[[int], str]) -> None:
        mask = mask & keep
        if mask.any():
            refused.append(Refusal(reason, mask, detail(int(np.flatnonzero(mask)[0]))))
            keep[mask] = False

    wf = w.astype(np.float64)
    refuse(wf == 0, "no_data", lambda i: f"row {i}: no examples")
    refuse(~np.isfinite(wf) | (wf < 0) | (wf > bounds.max_examples)
           | (wf != np.floor(wf)), "bad_weight",
           lambda i: f"row {i}: num_examples must be an integer in [1, "
                     f"{bounds.max_examples}], got {w[i]!r}")
    finite = finite_rows(rows)
    refuse(~finite, "non_finite", lambda i: f"row {i}: element "
           f"{int(np.argmin(np.isfinite(rows[i])))} is not finite")
    if bounds.max_norm is not None and keep.any():
        refuse(norms_above(rows, bounds.max_norm), "norm_too_large",
               lambda i: f"row {i}: L2 norm "
                         f"{math.sqrt(np.einsum('j,j->', rows[i], rows[i], dtype=np.float64)):.6g}"
                         f" exceeds max_norm = {bounds.max_norm}")
    return keep, refused


@dataclass(frozen=True)
class Refusal:
    """Rows of an arrival refused for one reason: ``rows`` is a bool mask over them."""

    reason: str
    rows: np.ndarray
    detail: str


# --------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class StepInfo:
    """What a finished pipeline run reports besides the mean."""

    count: int
    info: Mapping[str, float]


class PipelineRun:
    """One round's (or server step's) pass through the pipeline. Not thread-safe."""

    def __init__(self, pipeline: Pipeline, states: tuple, step: int, dim: int) -> None:
        self.pipeline = pipeline
        self.dim = dim
        self.stage_runs = [s.begin(st, step) for s, st in zip(pipeline.stages, states)]
        self.sum_run = pipeline.sum_rule.begin(dim, step)
        self.finished = False

    @property
    def count(self) -> int:
        return self.sum_run.count

    def fold(self, rows: np.ndarray, weights: np.ndarray) -> None:
        """Fold already-validated rows with their weights (float64, > 0).

        Raises:
            UpdateRejected: a stage or the sum refused the batch; nothing was folded.
        """
        for run in self.stage_runs:
            rows, weights = run.rows(rows, weights)
        self.sum_run.add(rows, weights)

    def fold_partial(self, mean: np.ndarray, weight: float, clients: int,
                     clip_norm: float | None) -> None:
        """Fold a group's already-aggregated mean (``weight`` behind it, ``clients`` updates
        inside, each clipped to ``clip_norm`` by its client when not ``None``).

        A stage with a ``partial`` method judges the group as a whole (central DP checks the
        clipping promise instead of clipping the mean); other stages see it as one row. A
        sum run with a ``refuse_partial(clients)`` method may refuse the group first (it
        raises), before any stage has counted it.

        Raises:
            UpdateRejected: a stage or the sum refused the group; nothing was folded.
        """
        refuse = getattr(self.sum_run, "refuse_partial", None)
        if refuse is not None:  # e.g. a robust rule, which must weigh every client itself
            refuse(clients)
        rows, weights = mean[np.newaxis], np.array([float(weight)])
        for run in self.stage_runs:
            partial = getattr(run, "partial", None)
            if partial is not None:
                rows, weights = partial(rows, weights, clients, clip_norm)
            else:
                rows, weights = run.rows(rows, weights)
        self.sum_run.add(rows, weights)

    def finish(self) -> tuple[np.ndarray | None, tuple, StepInfo]:
        """The mean delta (float64; ``None`` when nothing was folded and no stage releases
        anything), the stages' next states, and what to record.

        Raises:
            ProtocolError: the sum rule aborted (secure aggregation lost too many clients);
                nothing is revealed and the stages' states are unchanged.
        """
        if self.finished:
            raise UpdateRejected("duplicate", "this pipeline run already finished")
        self.finished = True
        count = self.sum_run.count
        if count == 0 and not self.pipeline.releases_empty:
            return None, (), StepInfo(0, {})
        total = self.sum_run.finish() if count else Sum(np.zeros(self.dim), 0.0, 0)
        states = []
        for run in reversed(self.stage_runs):
            total, st = run.finish(total)
            states.append(st)
        states.reverse()
        if total.weight <= 0:
            return None, tuple(states), StepInfo(count, dict(total.info))
        return total.mean(), tuple(states), StepInfo(count, dict(total.info))


@dataclass(frozen=True)
class Pipeline:
    """Stages around a sum rule, plus the validation bounds.

    Attributes:
        stages: applied in order to incoming rows, in reverse order to the finished sum.
        sum_rule: how rows are added (default :class:`PlainSum`).
        validation: the bounds of :func:`validate_rows`.
    """

    stages: Sequence[Stage] = ()
    sum_rule: SumRule = PlainSum()
    validation: Validation = Validation()

    @property
    def releases_empty(self) -> bool:
        """Whether a round with no update still releases a result (central DP releases
        noise alone: the release is accounted for whether or not anyone reported)."""
        return any(getattr(s, "releases_empty", False) for s in self.stages)

    @property
    def holds_updates(self) -> bool:
        return self.sum_rule.holds_updates

    def init(self) -> tuple:
        """The stages' states before the first step."""
        return tuple(s.init() for s in self.stages)

    def begin(self, states: tuple, step: int, dim: int) -> PipelineRun:
        return PipelineRun(self, states, step, dim)

    def client_clip_norm(self, states: tuple) -> float | None:
        """The L2 norm clients must clip their updates to before they leave them, or
        ``None``: the smallest a stage asks for (``stage.client_clip_norm(state)``), e.g.
        central DP's current clip norm, which the server cannot apply to updates it only
        sees summed under secure aggregation."""
        norms = [s.client_clip_norm(st) for s, st in zip(self.stages, states)
                 if hasattr(s, "client_clip_norm")]
        norms = [n for n in norms if n is not None]
        return min(norms) if norms else None

    def allows_step(self, states: tuple) -> str:
        for stage, st in zip(self.stages, states):
            why = stage.allows_step(st)
            if why:
                return why
        return ""

    def describe(self) -> str:
        parts = ["validate", *(s.name for s in self.stages), f"sum:{self.sum_rule.name}"]
        return " -> ".join(parts)


def stage_states_to_dict(pipeline: Pipeline, states: tuple) -> dict[str, Any]:
    """Checkpointable form of the stages' states (each stage's ``state_dict``)."""
    return {s.name: s.state_dict(st) for s, st in zip(pipeline.stages, states)
            if hasattr(s, "state_dict")}


def stage_states_from_dict(pipeline: Pipeline, saved: Mapping[str, Any]) -> tuple:
    """Rebuild states saved by :func:`stage_states_to_dict` (missing ones start fresh)."""
    out = []
    for s in pipeline.stages:
        if hasattr(s, "load_state_dict") and s.name in saved:
            out.append(s.load_state_dict(saved[s.name]))
        else:
            out.append(s.init())
    return tuple(out)

