"""Canary rollout: a candidate model served to a stable fraction of devices, compared with
production by a stated statistical rule, then promoted or rolled back automatically.

* **Who is in the canary**: :func:`canary_bucket` maps a device id to ``[0, 1)`` by SHA-256
  of ``salt:id``; a device is in the canary of fraction ``f`` when its bucket is below ``f``.
  The same device is always in (or out), whichever server asks, and raising ``f`` only adds
  devices. A new salt per rollout keeps the same devices from always going first.
* **The rule** (:class:`CanaryRule`): the canary's devices evaluate the candidate, a
  comparable cohort of devices outside the canary evaluates production, both on their own
  held-out data (federated evaluation, :mod:`shoal.evaluation`). Per-client mean losses are
  the samples (one per client, its latest: a client evaluated twice is not two samples),
  each bounded to ``[0, cap]`` (a device's report is its own claim). Each arm's mean is
  ``trim``-trimmed, with the winsorised standard error of K. K. Yuen, "The two-sample
  trimmed t for unequal population variances" (Biometrika, 1974) -- Welch's test (B. L.
  Welch, Biometrika, 1947) at ``trim = 0``; with ``d = mean_candidate - mean_production``
  and ``se`` the root of both arms' squared errors, two one-sided tests at level ``alpha``
  (normal approximation of the t statistic, sound at the minimum sample of ``min_clients``
  per arm):
  *worse* if ``d / se > z_(1-alpha)`` -> roll back; else *not worse* (non-inferior within
  ``margin``) if ``(d - margin) / se < -z_(1-alpha)`` -> promote; else wait for more
  evaluations, and after ``max_rounds`` without a verdict roll back (production is the safe
  default). The test that rolls back comes first, so a candidate significantly worse is
  never promoted.
* **Acting**: :class:`Canary` moves the real :class:`~shoal.store.models.ModelStore`
  (``promote`` with the verdict as its reason, or ``reject``: the candidate is marked
  rolled back and production never moved) and appends every step to an
  :class:`~shoal.lifecycle.audit.AuditLog`.

Sans-I/O: :class:`Canary` takes evaluation results and time, and says which version a
device is served; the simulator (:mod:`shoal.sim.rollout`) and, later, the gRPC transport
carry that out.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from shoal.errors import ConfigError
from shoal.evaluation import EvalResult
from shoal.lifecycle.audit import AuditLog
from shoal.store.disk import StorageError
from shoal.store.model_versions import ModelStoreError

__all__ = ["Canary", "CanaryRule", "Verdict", "arm_cohorts", "canary_bucket", "in_canary",
           "normal_cdf"]


def canary_bucket(device_id: str | int, salt: str) -> float:
    """The device's stable position in ``[0, 1)``: SHA-256 of ``salt:device_id``, first
    8 bytes as an unsigned integer over 2**64."""
    digest = hashlib.sha256(f"{salt}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def in_canary(device_ids: Iterable[str | int], fraction: float, salt: str) -> np.ndarray:
    """Boolean mask: which of ``device_ids`` are in the canary of ``fraction``."""
    return np.fromiter((canary_bucket(d, salt) < fraction for d in device_ids), bool)


def arm_cohorts(inside: np.ndarray, outside: np.ndarray, cohort: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(candidate's clients, production's clients)``: equally many uniform draws without
    replacement from the clients ``inside`` the canary and those ``outside`` it (``cohort``
    each, fewer when an arm has fewer), sorted. The split is a hash independent of the data,
    so the two cohorts are comparable.

    Raises:
        ConfigError: an arm has no client (the canary's fraction is too small or too large
            for this population).
    """
    k = min(cohort, len(inside), len(outside))
    if k < 1:
        raise ConfigError(f"a canary needs clients on both sides: {len(inside)} inside, "
                          f"{len(outside)} outside; change its fraction", key="canary.fraction")
    return (np.sort(rng.choice(inside, k, replace=False)),
            np.sort(rng.choice(outside, k, replace=False)))


def normal_cdf(z: float) -> float:
    """The standard normal distribution function."""
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


@dataclass(frozen=True)
class Verdict:
    """What the rule concluded from the evaluations so far.

    Attributes:
        decision: ``"promote"``, ``"rollback"`` or ``"wait"``.
        reason: one line, with the figures (kept in the store's history and the audit log).
        n_candidate, n_production: clients behind each arm.
        mean_candidate, mean_production: their mean per-client metric.
        z: Welch's statistic of ``mean_candidate - mean_production`` (NaN while waiting for
            the minimum sample).
        p_worse: one-sided p-value of "the candidate is worse".
        p_not_worse: one-sided p-value of "the candidate is not worse by ``margin``".
    """

    decision: str
    reason: str
    n_candidate: int
    n_production: int
    mean_candidate: float = math.nan
    mean_production: float = math.nan
    z: float = math.nan
    p_worse: float = math.nan
    p_not_worse: float = math.nan


@dataclass(frozen=True)
class CanaryRule:
    """The statistical rule of a canary (see the module docstring).

    Attributes:
        metric: the per-client metric compared; lower is better (``loss``).
        min_clients: clients per arm before any verdict.
        alpha: level of each one-sided test.
        margin: how much worse (in ``metric``) the candidate may be and still count as not
            worse.
        max_rounds: evaluations of each arm before an undecided canary is rolled back.
        cap: reported values are bounded to ``[0, cap]`` before anything else (a loss is
            never negative; a device reporting ``-1e6`` counts as 0, one reporting ``1e6``
            as ``cap``). Default 10: over four times the loss of a uniform guess among 10
            classes (``ln 10 = 2.3``), so an honest device of a sane model is never cut.
        trim: the share of each arm cut from either end before comparing (Yuen's trimmed
            means with winsorised variances; 0 is Welch's test on plain means). Default
            0.1: up to ``floor(0.1 n)`` colluding devices per arm and side are cut away.
    """

    metric: str = "loss"
    min_clients: int = 30
    alpha: float = 0.05
    margin: float = 0.0
    max_rounds: int = 10
    cap: float = 10.0
    trim: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.min_clients, bool) or not isinstance(self.min_clients, int) \
                or self.min_clients < 2:
            raise ConfigError(f"min_clients must be an int >= 2, got {self.min_clients!r}",
                              key="canary.min_clients")
        if not 0 < self.alpha < 0.5:
            raise ConfigError(f"alpha must be in (0, 0.5), got {self.alpha!r}",
                              key="canary.alpha")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ConfigError(f"margin must be a finite number >= 0, got {self.margin!r}",
                              key="canary.margin")
        if not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ConfigError(f"max_rounds must be an int >= 1, got {self.max_rounds!r}",
                              key="canary.max_rounds")
        if not (math.isfinite(self.cap) and self.cap > 0):
            raise ConfigError(f"cap must be a finite number > 0, got {self.cap!r}",
                              key="canary.cap")
        if not 0 <= self.trim < 0.5:
            raise ConfigError(f"trim must be in [0, 0.5), got {self.trim!r}",
                              key="canary.trim")

    def bounded(self, values: np.ndarray) -> np.ndarray:
        """``values`` without non-finite entries, each bounded to ``[0, cap]``."""
        v = np.asarray(values, np.float64)
        return np.clip(v[np.isfinite(v)], 0.0, self.cap)

    def _location(self, x: np.ndarray) -> tuple[float, float]:
        """``(trimmed mean, squared standard error)`` of one arm: Yuen's estimator, the
        mean of the values left after cutting ``g = floor(trim n)`` from each end, and
        ``(n - 1) s_w^2 / (h (h - 1))`` with ``s_w^2`` the variance of the sample
        winsorised at the same points and ``h = n - 2g`` (Welch's ``s^2 / n`` at
        ``trim = 0``)."""
        n = len(x)
        g = int(math.floor(self.trim * n))
        h = n - 2 * g
        s = np.sort(x)
        wins = np.clip(s, s[g], s[n - g - 1])
        return float(s[g:n - g].mean()), float((n - 1) * wins.var(ddof=1) / (h * (h - 1)))

    def judge(self, candidate: np.ndarray, production: np.ndarray, rounds: int) -> Verdict:
        """The verdict on per-client values of each arm after ``rounds`` evaluations (each
        value first :meth:`bounded`; the means compared are ``trim``-trimmed)."""
        c, p = self.bounded(candidate), self.bounded(production)
        n_c, n_p = len(c), len(p)
        if min(n_c, n_p) < self.min_clients:
            decision = "rollback" if rounds >= self.max_rounds else "wait"
            return Verdict(decision, f"{n_c} candidate / {n_p} production clients, fewer "
                           f"than the minimum {self.min_clients} per arm"
                           + (f" after {rounds} evaluations" if decision != "wait" else ""),
                           n_c, n_p)
        (mc, vc), (mp, vp) = self._location(c), self._location(p)
        se = math.sqrt(vc + vp)
        d = mc - mp
        if se == 0:
            z = 0.0 if d == 0 else math.copysign(math.inf, d)
            z_ni = -math.inf if d < self.margin else (0.0 if d == self.margin else math.inf)
        else:
            z, z_ni = d / se, (d - self.margin) / se
        p_worse, p_not_worse = 1.0 - normal_cdf(z), normal_cdf(z_ni)
        figures = (f"{self.metric} {mc:.4f} (candidate, {n_c} clients) vs {mp:.4f} "
                   f"(production, {n_p}); z = {z:.2f}")
        if p_worse < self.alpha:
            return Verdict("rollback", f"worse: {figures}, p = {p_worse:.2g} < {self.alpha}",
                           n_c, n_p, mc, mp, z, p_worse, p_not_worse)
        if p_not_worse < self.alpha:
            return Verdict("promote", f"not worse (margin {self.margin}): {figures}, p = "
                           f"{p_not_worse:.2g} < {self.alpha}", n_c, n_p, mc, mp, z,
                           p_worse, p_not_worse)
        if rounds >= self.max_rounds:
            return Verdict("rollback", f"undecided after {rounds} evaluations, keeping "
                           f"production: {figures}", n_c, n_p, mc, mp, z, p_worse,
                           p_not_worse)
        return Verdict("wait", f"undecided: {figures}", n_c, n_p, mc, mp, z, p_worse,
                       p_not_worse)


@dataclass
class Canary:
    """One canary rollout of ``candidate`` against the store's production version.

    Args:
        store: the real model store (a writer).
        candidate: the candidate version (status ``candidate``).
        fraction: the share of devices served the candidate, in (0, 1).
        salt: the rollout's bucket salt (default: ``"canary-v<candidate>"``).
        rule: the statistical rule.
        audit: where every step is appended.
        now: when the rollout starts.

    Raises:
        ConfigError: no production version, a candidate that is not a candidate, or a
            fraction outside (0, 1).
    """

    store: object
    candidate: int
    fraction: float
    now: float
    rule: CanaryRule = field(default_factory=CanaryRule)
    audit: AuditLog = field(default_factory=AuditLog)
    salt: str = ""
    production: int = field(init=False)
    verdict: Verdict | None = field(init=False, default=None)
    _values: dict[str, dict[int, float]] = field(init=False, default_factory=dict)
    _rounds: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ConfigError(f"the canary fraction must be in (0, 1), got {self.fraction!r}",
                              key="canary.fraction")
        prod = self.store.production()  # type: ignore[attr-defined]
        if prod is None:
            raise ConfigError("a canary needs a production version to compare with; promote "
                              "one first", key="canary")
        if self.store.get(self.candidate).status != "candidate":  # type: ignore[attr-defined]
            raise ConfigError(f"version {self.candidate} is not a candidate", key="canary")
        self.production = prod.id
        self.salt = self.salt or f"canary-v{self.candidate}"
        self._values = {"candidate": {}, "production": {}}
        self._rounds = {"candidate": 0, "production": 0}
        self.audit.append(self.now, "canary_start", candidate=self.candidate,
                          production=self.production, fraction=self.fraction, salt=self.salt,
                          rule=vars(self.rule))

    @property
    def decided(self) -> bool:
        return self.verdict is not None and self.verdict.decision != "wait"

    def in_canary(self, device_ids: Iterable[str | int]) -> np.ndarray:
        """Which devices are in this canary (always false once it is decided)."""
        ids = list(device_ids)
        if self.decided:
            return np.zeros(len(ids), bool)
        return in_canary(ids, self.fraction, self.salt)

    def cohorts(self, device_ids: Iterable[str | int], cohort: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
        """One evaluation round's comparable cohorts: :func:`arm_cohorts` of this canary's
        split of ``device_ids`` (client ids are positions in ``device_ids``)."""
        inside = self.in_canary(device_ids)
        return arm_cohorts(np.flatnonzero(inside), np.flatnonzero(~inside), cohort, rng)

    def serves(self, device_id: str | int) -> int:
        """The version ``device_id`` is served now: the candidate inside the canary while it
        runs; afterwards the store's production (the candidate if it was promoted)."""
        if self.decided:
            prod = self.store.production()  # type: ignore[attr-defined]
            return prod.id
        return self.candidate if canary_bucket(device_id, self.salt) < self.fraction \
            else self.production

    def record(self, result: EvalResult) -> None:
        """Add a federated evaluation of the candidate or of production (one with no
        report still counts towards ``max_rounds``).

        Raises:
            ConfigError: the result is of another version, or lacks the rule's metric.
        """
        arm = {self.candidate: "candidate", self.production: "production"}.get(result.version)
        if arm is None:
            raise ConfigError(f"evaluation of version {result.version}: this canary compares "
                              f"{self.candidate} with {self.production}", key="version")
        if result.clients == 0:  # nobody reported in time: a round without samples
            self._rounds[arm] += 1
            self.audit.append(self.now, "canary_evaluated", arm=arm, version=result.version,
                              task_id=result.task_id, clients=0, missing=result.missing)
            return
        if self.rule.metric not in result.values:
            raise ConfigError(f"the evaluation has no {self.rule.metric!r}",
                              key="canary.metric")
        # one sample per client (its latest value): a client evaluated twice is not two
        # independent samples
        raw = np.asarray(result.values[self.rule.metric], np.float64)
        # a device's report is its own claim: bounded to [0, cap] here, so no single
        # device moves an arm by more than cap / n (a non-finite value counts as cap)
        values = np.clip(np.nan_to_num(raw, nan=self.rule.cap, posinf=self.rule.cap,
                                       neginf=0.0), 0.0, self.rule.cap)
        clipped = int(np.count_nonzero(values != raw))
        self._values[arm].update(zip(result.client_ids.tolist(), values.tolist()))
        self._rounds[arm] += 1
        self.audit.append(self.now, "canary_evaluated", arm=arm, version=result.version,
                          task_id=result.task_id, clients=result.clients, clipped=clipped,
                          examples=result.examples, metrics=dict(result.metrics),
                          by_segment={k: dict(v) for k, v in result.by_segment.items()})

    def decide(self, now: float) -> Verdict:
        """Judge the evaluations so far; on a verdict move the store and stop the canary.
        Deciding again after a verdict returns it unchanged.

        The store is moved first and the verdict logged (``canary_promote``,
        ``canary_rollback``) only once it has moved; a move the store refuses is logged as
        ``canary_promote_refused`` / ``canary_rollback_refused`` and leaves the canary
        undecided.

        Raises:
            PointerMoved: the verdict is to promote but production is no longer the
                version the candidate was compared with (nothing changed in the store).
            ModelStoreError: the store refused to reject the candidate (e.g. someone
                promoted or rejected it meanwhile).
            StorageError: the store's disk refused the change.
        """
        if self.decided:
            assert self.verdict is not None
            return self.verdict
        self.now = now
        c = np.fromiter(self._values["candidate"].values(), np.float64)
        p = np.fromiter(self._values["production"].values(), np.float64)
        verdict = self.rule.judge(c, p, min(self._rounds.values()))
        figures = dict(candidate=self.candidate, production=self.production,
                       reason=verdict.reason, n_candidate=verdict.n_candidate,
                       n_production=verdict.n_production, z=verdict.z,
                       p_worse=verdict.p_worse, p_not_worse=verdict.p_not_worse)
        try:
            if verdict.decision == "promote":
                # compare-and-set: if someone moved production during the canary, the
                # comparison no longer holds and the store refuses (PointerMoved)
                self.store.promote(self.candidate, now=now,  # type: ignore[attr-defined]
                                   reason=f"canary: {verdict.reason}",
                                   expected=self.production)
            elif verdict.decision == "rollback":
                self.store.reject(self.candidate, now=now,  # type: ignore[attr-defined]
                                  reason=f"canary: {verdict.reason}")
        except (ModelStoreError, StorageError) as exc:
            # the store did not move: the log says so, and the canary stays undecided
            self.audit.append(now, f"canary_{verdict.decision}_refused", **figures,
                              error=f"{type(exc).__name__}: {exc}")
            raise
        # logged once the store has moved: the audit log never claims a move that failed
        self.verdict = verdict
        self.audit.append(now, f"canary_{verdict.decision}", **figures)
        return verdict
