"""Drift detection on what devices report, and the continual-training response.

Devices evaluate the production model on their fresh data (federated evaluation) and report
its loss and their label histogram. Two detectors watch those reports:

* :class:`PageHinkley` on the federated loss, one value per evaluation round (Page, "Continuous
  inspection schemes", Biometrika 1954; the form used for concept drift by Gama et al., "A
  survey on concept drift adaptation", ACM Computing Surveys 2014): with the running mean
  ``x̄_t``, ``m_t = Σ_{i≤t} (x_i - x̄_i - δ)`` and ``M_t = min_{i≤t} m_i``, an increase is
  raised when ``m_t - M_t > λ``. ``δ`` is the change too small to matter, ``λ`` trades
  detection delay against false alarms.
* :func:`population_stability` on the label mix: the population stability index
  ``PSI = Σ_k (a_k - e_k) ln(a_k / e_k)`` between the reference mix ``e`` (when production
  was deployed) and the current one ``a`` (Siddiqi, "Credit Risk Scorecards", 2006: below
  0.1 stable, 0.1-0.25 a moderate shift, above 0.25 a significant one). Empty classes are
  smoothed by ``eps``.

:class:`DriftMonitor` combines both and, on an alarm, its :class:`ContinualPolicy` answers
with a retraining order from production (:class:`Retrain`), then waits until the new model is
deployed, when the detectors restart against the new reference. Sans-I/O: reports and time
in, alarms and orders out; the simulator (:mod:`shoal.scenarios.drift`) carries them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from shoal.errors import ConfigError
from shoal.evaluation import EvalResult

__all__ = ["ContinualPolicy", "DriftAlarm", "DriftMonitor", "PageHinkley", "Retrain",
           "label_mix", "population_stability"]


@dataclass
class PageHinkley:
    """The Page–Hinkley test for an increase in the mean of a stream.

    Args:
        delta: the magnitude of change to ignore (``δ``).
        threshold: the alarm level (``λ``).
        min_samples: no alarm before this many values (the running mean settles).
    """

    delta: float = 0.01
    threshold: float = 0.5
    min_samples: int = 5
    n: int = field(default=0, init=False)
    mean: float = field(default=0.0, init=False)
    cum: float = field(default=0.0, init=False)
    low: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delta) and self.delta >= 0):
            raise ConfigError(f"delta must be >= 0, got {self.delta!r}", key="drift.delta")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ConfigError(f"threshold must be > 0, got {self.threshold!r}",
                              key="drift.threshold")

    def update(self, x: float) -> bool:
        """Take one value; True when the test raises (it then keeps raising until
        :meth:`reset`). Non-finite values are ignored."""
        if not math.isfinite(x):
            return False
        self.n += 1
        self.mean += (x - self.mean) / self.n
        self.cum += x - self.mean - self.delta
        self.low = min(self.low, self.cum)
        return self.n >= self.min_samples and self.statistic > self.threshold

    @property
    def statistic(self) -> float:
        """``m_t - M_t``."""
        return self.cum - self.low

    def reset(self) -> None:
        self.n, self.mean, self.cum, self.low = 0, 0.0, 0.0, 0.0


def population_stability(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4
                         ) -> float:
    """The population stability index between two histograms (counts or shares).

    Raises:
        ConfigError: the histograms differ in length or one has no mass.
    """
    e = np.asarray(expected, np.float64)
    a = np.asarray(actual, np.float64)
    if e.shape != a.shape or e.ndim != 1:
        raise ConfigError(f"histograms must be 1-D of one length, got {e.shape} and "
                          f"{a.shape}", key="drift")
    if e.sum() <= 0 or a.sum() <= 0:
        raise ConfigError("a histogram has no mass", key="drift")
    e = np.maximum(e / e.sum(), eps)
    a = np.maximum(a / a.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def label_mix(result: EvalResult) -> np.ndarray | None:
    """The cohort's label histogram (summed ``label_<k>`` reports), or ``None`` when the
    clients reported none."""
    keys = sorted((k for k in result.values if k.startswith("label_")),
                  key=lambda k: int(k.split("_", 1)[1]))
    if not keys:
        return None
    return np.array([float(np.nansum(result.values[k])) for k in keys])


@dataclass(frozen=True)
class DriftAlarm:
    """A detector raised.

    Attributes:
        at: when (the report's time).
        detector: ``"page_hinkley"`` or ``"psi"``.
        value: the statistic that crossed (``m_t - M_t`` or the PSI).
        threshold: the level it crossed.
    """

    at: float
    detector: str
    value: float
    threshold: float


@dataclass(frozen=True)
class Retrain:
    """Start continual training from the production ``version`` (on the clients' current
    data), because of ``alarm``."""

    version: int
    alarm: DriftAlarm


@dataclass
class ContinualPolicy:
    """When to retrain: on the first alarm, unless a retraining is under way or the last
    one was deployed less than ``cooldown`` seconds ago."""

    cooldown: float = 0.0
    training: bool = field(default=False, init=False)
    deployed_at: float = field(default=-math.inf, init=False)

    def order(self, alarm: DriftAlarm, production: int) -> Retrain | None:
        if self.training or alarm.at - self.deployed_at < self.cooldown:
            return None
        self.training = True
        return Retrain(production, alarm)

    def deployed(self, now: float) -> None:
        self.training, self.deployed_at = False, now


@dataclass
class DriftMonitor:
    """Both detectors over the federated evaluations of the production model.

    Args:
        page_hinkley: the loss detector.
        psi_threshold: the label-mix alarm level.
        policy: the continual-training policy.
    """

    page_hinkley: PageHinkley = field(default_factory=PageHinkley)
    psi_threshold: float = 0.25
    policy: ContinualPolicy = field(default_factory=ContinualPolicy)
    reference: np.ndarray | None = field(default=None, init=False)
    alarms: list[DriftAlarm] = field(default_factory=list, init=False)

    def observe(self, result: EvalResult, now: float, production: int
                ) -> tuple[list[DriftAlarm], Retrain | None]:
        """Take one federated evaluation of ``production``; returns the alarms it raised
        and, if the policy says so, the retraining order. The first label mix seen becomes
        the reference."""
        raised = []
        if self.page_hinkley.update(result.metrics.get("loss", math.nan)):
            raised.append(DriftAlarm(now, "page_hinkley", self.page_hinkley.statistic,
                                     self.page_hinkley.threshold))
        mix = label_mix(result)
        if mix is not None and mix.sum() > 0:
            if self.reference is None:
                self.reference = mix
            else:
                psi = population_stability(self.reference, mix)
                if psi > self.psi_threshold:
                    raised.append(DriftAlarm(now, "psi", psi, self.psi_threshold))
        self.alarms.extend(raised)
        order = None
        for alarm in raised:
            order = order or self.policy.order(alarm, production)
        return raised, order

    def deployed(self, now: float) -> None:
        """A retrained model is in production: restart the detectors against it (the next
        label mix becomes the reference)."""
        self.page_hinkley.reset()
        self.reference = None
        self.policy.deployed(now)
