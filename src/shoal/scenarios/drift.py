"""The drift scenario: the label mix of the population shifts over simulated days; federated
evaluations of production feed a :class:`~shoal.lifecycle.drift.DriftMonitor`, whose alarm
starts continual training from production; the retrained model is committed and promoted in
the real model store once its (simulated) training time has passed.

The population: ``n`` clients, each with its own class preference ``q_c`` (Dirichlet(1)),
drawing fresh examples whose labels follow ``q_c ⊙ π(t)`` (normalized), where the population
mix ``π(t)`` moves linearly from ``π_0`` (classes 0-4 common) to ``π_1`` (classes 5-9 common)
between ``shift_hour`` and ``shift_hour + ramp_hours``. Evaluations draw from the test set,
training from the training set, so no example is both trained and evaluated on.

Measured: the detection delay (first alarm after the shift began), the served model's
federated accuracy before the shift, during (shift to deployment) and after the response,
and the accuracy the old model would have had without a response (evaluated on the same
cohorts: the counterfactual).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from shoal import seeds
from shoal.config import Config
from shoal.coordinator import Coordinator
from shoal.data import Dataset, FederatedData
from shoal.events import EvalDone, SendEval
from shoal.evaluation import EvalResult
from shoal.experiment import Experiment, RunResult
from shoal.lifecycle.audit import AuditLog
from shoal.lifecycle.drift import DriftMonitor, Retrain
from shoal.sampling import UniformSampler
from shoal.sim.evaluation import LocalEvaluator
from shoal.store import ModelStore
from shoal.strategy import FedAvg, ServerState

__all__ = ["DriftPoint", "DriftReport", "LabelShift", "drift_scenario"]


@dataclass(frozen=True)
class LabelShift:
    """The population's label mix over time (see the module docstring)."""

    shift_hour: float = 72.0
    ramp_hours: float = 24.0
    num_classes: int = 10

    def mix(self, hour: float) -> np.ndarray:
        half = self.num_classes // 2
        pi0 = np.r_[np.full(half, 0.9 / half), np.full(self.num_classes - half,
                                                        0.1 / (self.num_classes - half))]
        s = float(np.clip((hour - self.shift_hour) / self.ramp_hours, 0.0, 1.0))
        return (1 - s) * pi0 + s * pi0[::-1]


class _Population:
    """Clients drawing fresh examples (indices into a dataset) under a label shift."""

    def __init__(self, n: int, shift: LabelShift, seed: int) -> None:
        self.q = seeds.generator(seed, "drift", "prefs").dirichlet(np.ones(shift.num_classes),
                                                                   n)
        self.shift = shift
        self.seed = seed

    def draw(self, data: Dataset, hour: float, per_client: int, purpose: str
             ) -> list[np.ndarray]:
        by_class = [np.flatnonzero(data.y == k) for k in range(self.shift.num_classes)]
        mix = self.shift.mix(hour)
        out = []
        for c, q in enumerate(self.q):
            rng = seeds.generator(self.seed, "drift", purpose, int(hour * 60), c)
            p = q * mix
            labels = rng.choice(len(p), per_client, p=p / p.sum())
            out.append(np.sort(np.array([by_class[k][rng.integers(len(by_class[k]))]
                                         for k in labels], np.int64)))
        return out


@dataclass(frozen=True)
class DriftPoint:
    """One evaluation round: the served version's federated metrics, the counterfactual
    (the first production model, never replaced) and the detectors' statistics."""

    hour: float
    version: int
    accuracy: float
    loss: float
    accuracy_without_response: float
    page_hinkley: float
    psi: float


@dataclass
class DriftReport:
    """What the scenario measured (hours are simulated hours)."""

    points: list[DriftPoint]
    shift: LabelShift
    alarms: list[tuple[float, str, float]]  # (hour, detector, statistic)
    first_alarm_hour: float
    deployed_hour: float
    false_alarms: int
    audit: AuditLog = field(default_factory=AuditLog)

    @property
    def detection_delay_hours(self) -> float:
        return self.first_alarm_hour - self.shift.shift_hour

    def phase_accuracy(self, attr: str = "accuracy") -> dict[str, float]:
        """Mean federated accuracy before the shift, during it (shift start to deployment)
        and after the deployment of the retrained model."""
        def mean(sel: list[DriftPoint]) -> float:
            return float(np.mean([getattr(p, attr) for p in sel])) if sel else math.nan
        s, d = self.shift.shift_hour, self.deployed_hour
        return {"before": mean([p for p in self.points if p.hour < s]),
                "during": mean([p for p in self.points if s <= p.hour < d]),
                "after": mean([p for p in self.points if p.hour >= d])}


def drift_scenario(cfg: Config, train: Dataset, test: Dataset, store_root: str, *,
                   shift: LabelShift = LabelShift(), days: float = 8.0,
                   every_hours: float = 2.0, cohort: int = 20, eval_examples: int = 50,
                   train_examples: int = 500, retrain_rounds: int = 20,
                   minutes_per_round: float = 10.0,
                   monitor: DriftMonitor | None = None) -> DriftReport:
    """Run the drift scenario (see the module docstring).

    Args:
        cfg: the training run (clients, per round, rounds of the first production model).
        train, test: where training and evaluation examples are drawn from.
        shift: the label mix over time.
        days: simulated days.
        every_hours: simulated hours between federated evaluations.
        cohort: clients per evaluation.
        eval_examples, train_examples: fresh examples per client for an evaluation / for
            a training run.
        retrain_rounds: rounds of continual training after an alarm.
        minutes_per_round: the simulated duration of a training round (the new model is
            deployed ``retrain_rounds * minutes_per_round`` after the alarm).
        monitor: the detectors and policy (default :class:`DriftMonitor`).
    """
    n = cfg["data"]["clients"]
    people = _Population(n, shift, cfg.seed)
    monitor = monitor if monitor is not None else DriftMonitor()
    audit = AuditLog()

    def fit(hour: float, rounds: int, state: ServerState | None = None
            ) -> tuple[Experiment, RunResult]:
        parts = people.draw(train, hour, train_examples, "train")
        run_cfg = cfg.with_overrides({"rounds": rounds})
        exp = Experiment(run_cfg, FederatedData(train, test, tuple(parts)))
        return exp, exp.run(state=state)

    exp, first = fit(0.0, cfg.rounds)
    coordinator = Coordinator(FedAvg(), n, UniformSampler(cohort), seed=cfg.seed)
    evaluator = LocalEvaluator(exp.eval_model, test, [np.zeros(0, np.int64)] * n,
                               label_histogram=True)
    store = ModelStore(store_root)
    try:
        prod = store.commit(exp.checkpoint(first.state), round=first.state.version,
                            rounds=(1, first.state.version), metrics={}, now=0.0,
                            status="production")
        params = {prod.id: first.state.params}
        original = prod.id
        pending: tuple[float, object, object] | None = None
        points: list[DriftPoint] = []
        first_alarm, deployed, false_alarms = math.nan, math.inf, 0
        hour = 0.0
        while hour <= days * 24:
            now = hour * 3600.0
            if pending is not None and hour >= pending[0]:
                _, new_exp, new_run = pending
                parent = store.production()
                assert parent is not None
                v = store.commit(new_exp.checkpoint(new_run.state),  # type: ignore[attr-defined]
                                 round=new_run.state.version,  # type: ignore[attr-defined]
                                 rounds=(parent.round + 1,
                                         new_run.state.version),  # type: ignore[attr-defined]
                                 parent=parent.id, metrics={}, now=now)
                store.promote(v.id, now=now, reason="continual training after drift")
                params[v.id] = new_run.state.params  # type: ignore[attr-defined]
                audit.append(now, "deployed", version=v.id, parent=parent.id)
                monitor.deployed(now)
                deployed = min(deployed, hour)
                pending = None
            serving = store.production()
            assert serving is not None
            evaluator.held_out = people.draw(test, hour, eval_examples, "eval")
            clients = coordinator.sampler.sample(n, seeds.generator(cfg.seed, "drift-cohort",
                                                                    int(hour * 60)), cohort)
            results: dict[int, EvalResult] = {}
            for version in dict.fromkeys((serving.id, original)):
                for cmd in coordinator.evaluate(params[version], version, now,
                                                clients=clients, purpose="drift"):
                    if isinstance(cmd, SendEval):
                        for out in coordinator.handle(evaluator.answer(cmd, now)):
                            if isinstance(out, EvalDone):
                                results[version] = out.result
            served = results[serving.id]
            raised, order = monitor.observe(served, now, serving.id)
            for alarm in raised:
                audit.append(now, "drift_alarm", detector=alarm.detector, value=alarm.value,
                             threshold=alarm.threshold, version=serving.id)
                if hour < shift.shift_hour:
                    false_alarms += 1
                elif math.isnan(first_alarm):
                    first_alarm = hour
            if isinstance(order, Retrain):
                audit.append(now, "retrain", version=order.version,
                             detector=order.alarm.detector)
                base = store.load(order.version).state
                new_exp, new_run = fit(hour, base.version + retrain_rounds, state=base)
                ready = hour + retrain_rounds * minutes_per_round / 60.0
                pending = (ready, new_exp, new_run)
            psi = [a.value for a in raised if a.detector == "psi"]
            points.append(DriftPoint(hour, serving.id, served.metrics["accuracy"],
                                     served.metrics["loss"],
                                     results[original].metrics["accuracy"],
                                     monitor.page_hinkley.statistic,
                                     psi[0] if psi else math.nan))
            hour += every_hours
    finally:
        store.close()
    alarms = [(a.at / 3600.0, a.detector, a.value) for a in monitor.alarms]
    return DriftReport(points, shift, alarms, first_alarm, deployed, false_alarms, audit)
