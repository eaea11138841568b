"""Robust stages that stream: norm bounding and centered clipping (memory O(model)).

* :class:`NormBound` clips every update to L2 norm ``C`` before the weighted sum; ``C`` is
  fixed, or adaptive: ``factor x`` the median norm of the previous round's updates (the
  defence of Z. Sun, P. Kairouz, A. T. Suresh, H. B. McMahan, "Can You Really Backdoor
  Federated Learning?", 2019). It bounds how far one update moves the model; it does not
  change the weights, so a client claiming many examples still weighs more.
* :class:`CenteredClipping` is one iteration of S. P. Karimireddy, L. He, M. Jaggi,
  "Learning from History for Byzantine Robust Optimization", ICML 2021: with the previous
  round's aggregate ``v`` as the center, the round's aggregate is
  ``v + (1/n) sum_i clip(x_i - v, tau)``, every client weighed equally. One iteration is
  what the paper runs in its experiments, and it streams: each row is clipped around a
  center fixed for the round. More iterations would need every update (the center moves).
  The paper's workers also keep momentum; here the center carries the history.

Both keep their state (the bound, the center) explicitly, threaded through the coordinator
and checkpointed. A group's mean (:class:`~shoal.events.PartialAggregate`) cannot be clipped
per client, so it is refused unless its clients promised to clip to the bound.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np

from shoal.errors import ConfigError, UpdateRejected
from shoal.pipeline import Sum

__all__ = ["NormBound", "NormState", "CenteredClipping", "clip_rows"]


def clip_rows(rows: np.ndarray, bound: float, center: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Rows with ``rows - center`` clipped to L2 norm ``bound`` (``center`` 0 if ``None``),
    and the norms of ``rows - center`` before clipping (float64)."""
    diff = rows if center is None else rows - center
    norms = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64))
    scale = np.where(norms > bound, bound / np.maximum(norms, 1e-300), 1.0)
    clipped = diff * scale.astype(diff.dtype)[:, None]
    return (clipped if center is None else clipped + center), norms


# --------------------------------------------------------------------------- norm bound


@dataclass(frozen=True)
class NormState:
    """The bound of the next round."""

    bound: float


class _NormRun:
    def __init__(self, stage: NormBound, state: NormState) -> None:
        self.stage, self.bound = stage, state.bound
        self.norms: list[np.ndarray] = []  # O(updates) floats, for the adaptive bound
        self.clipped = 0

    def rows(self, rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out, norms = clip_rows(rows, self.bound)
        self.norms.append(norms)
        self.clipped += int((norms > self.bound).sum())
        return out, weights

    def partial(self, rows: np.ndarray, weights: np.ndarray, clients: int,
                clip_norm: float | None) -> tuple[np.ndarray, np.ndarray]:
        if clip_norm is None or not clip_norm <= self.bound * (1 + 1e-9):
            raise UpdateRejected("not_clipped", f"norm bounding needs every update of a "
                                 f"group clipped to at most {self.bound:g} by its client; "
                                 f"the group promises {clip_norm!r}")
        return rows, weights

    def finish(self, total: Sum) -> tuple[Sum, NormState]:
        bound = self.bound
        if self.stage.adaptive and self.norms:
            bound = self.stage.factor * float(np.median(np.concatenate(self.norms)))
            bound = bound if bound > 0 else self.bound  # every update zero: keep the bound
        info = {**total.info, "norm_bound": self.bound, "norm_clipped": float(self.clipped)}
        return Sum(total.vector, total.weight, total.count, info), NormState(bound)


@dataclass(frozen=True)
class NormBound:
    """Clip each update to an L2 norm bound (see the module docstring).

    Args:
        bound: ``C`` (the first round's with ``adaptive``).
        adaptive: follow ``factor x`` the median norm of the previous round's updates.
        factor: the multiple of the median norm.

    Raises:
        ConfigError: a bound or factor that is not finite and > 0.
    """

    bound: float
    adaptive: bool = False
    factor: float = 1.0
    name: str = "norm_bound"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ConfigError(f"robust.norm_bound must be finite and > 0, got {self.bound!r}",
                              key="robust.norm_bound")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ConfigError(f"robust.norm_factor must be finite and > 0, got "
                              f"{self.factor!r}", key="robust.norm_factor")

    def init(self) -> NormState:
        return NormState(float(self.bound))

    def begin(self, state: NormState, step: int) -> _NormRun:
        return _NormRun(self, state)

    def allows_step(self, state: NormState) -> str:
        return ""

    def state_dict(self, state: NormState) -> dict:
        return {"bound": state.bound}

    def load_state_dict(self, d: dict) -> NormState:
        return NormState(float(d["bound"]))


# --------------------------------------------------------------------------- centered clipping


class _CenteredRun:
    def __init__(self, stage: CenteredClipping, center: np.ndarray | None) -> None:
        self.stage, self.center = stage, center
        self.clipped = 0

    def rows(self, rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        center = self.center
        if center is None or center.size != rows.shape[1]:
            center = self.center = np.zeros(rows.shape[1])
        out, norms = clip_rows(rows.astype(np.float64), self.stage.tau, center)
        self.clipped += int((norms > self.stage.tau).sum())
        return out, np.ones(len(rows))

    def partial(self, rows: np.ndarray, weights: np.ndarray, clients: int,
                clip_norm: float | None) -> tuple[np.ndarray, np.ndarray]:
        raise UpdateRejected("group_refused", "centered clipping clips every client's update "
                             f"around the center; a group's mean of {clients} clients cannot "
                             "be clipped per client")

    def finish(self, total: Sum) -> tuple[Sum, np.ndarray | None]:
        info = {**total.info, "cc_clipped": float(self.clipped)}
        center = total.vector / total.weight if total.weight > 0 else self.center
        return Sum(total.vector, total.weight, total.count, info), center


@dataclass(frozen=True)
class CenteredClipping:
    """One streaming iteration of centered clipping with radius ``tau`` (module docstring).

    Raises:
        ConfigError: ``tau`` not finite and > 0.
    """

    tau: float
    name: str = "centered_clip"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(f"robust.cc_tau must be finite and > 0, got {self.tau!r}",
                              key="robust.cc_tau")

    def init(self) -> np.ndarray | None:
        return None  # the first center is 0 (then the rule is plain clipping)

    def begin(self, state: np.ndarray | None, step: int) -> _CenteredRun:
        return _CenteredRun(self, state)

    def allows_step(self, state: np.ndarray | None) -> str:
        return ""

    def state_dict(self, state: np.ndarray | None) -> dict:
        if state is None:
            return {"center": None}
        raw = np.asarray(state, "<f8").tobytes()
        return {"center": base64.b64encode(raw).decode("ascii")}

    def load_state_dict(self, d: dict) -> np.ndarray | None:
        if d.get("center") is None:
            return None
        return np.frombuffer(base64.b64decode(d["center"]), "<f8").astype(np.float64)
