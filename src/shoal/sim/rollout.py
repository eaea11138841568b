"""Simulated canary rollouts: the coordinator's evaluation tasks, answered by virtual clients
on their held-out data, judged by a :class:`~shoal.lifecycle.canary.Canary` that moves a real
model store.

:func:`run_canary` is the carrier loop: each evaluation round it sends the candidate to a
cohort drawn from the canary's devices and production to an equally large cohort drawn from
the devices outside it (both uniform draws from populations split by a hash independent of
the data, so the two cohorts are comparable), feeds the reports back, and asks for a verdict.
It records every device the candidate was sent to, so a test can check that no device
outside the canary ever received it.

The scenario end to end (train production, a candidate, run the canary) is
:func:`shoal.scenarios.canary.canary_scenario`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from shoal import seeds
from shoal.coordinator import Coordinator
from shoal.data import Dataset
from shoal.events import EvalDone, SendEval
from shoal.lifecycle.canary import Canary, Verdict
from shoal.sampling import UniformSampler
from shoal.sim.evaluation import LocalEvaluator
from shoal.strategy import FedAvg

__all__ = ["CanaryRun", "corrupt_labels", "run_canary"]


@dataclass
class CanaryRun:
    """What a simulated canary did.

    Attributes:
        verdict: the final verdict.
        rounds: evaluation rounds run.
        sent_candidate: every client the candidate was sent to.
        sent_production: every client production was sent to for evaluation.
        canary_clients: the clients inside the canary.
        accuracy: version -> central test accuracy (scenario only).
    """

    verdict: Verdict
    rounds: int
    sent_candidate: set[int]
    sent_production: set[int]
    canary_clients: set[int]
    accuracy: dict[int, float] = field(default_factory=dict)


def run_canary(canary: Canary, evaluator: LocalEvaluator,
               params_of: Callable[[int], np.ndarray], device_ids: Sequence[str], *,
               cohort: int, seed: int, now: float = 0.0, hours: float = 1.0) -> CanaryRun:
    """Evaluate both arms each simulated ``hours`` until the canary decides.

    Args:
        canary: the rollout (its store holds both versions).
        evaluator: the virtual clients (client ``i`` is device ``device_ids[i]``).
        params_of: version -> its flat parameters (the store's checkpoint).
        cohort: clients per arm per round (fewer if the canary is smaller).
        seed: the cohorts' random stream ``(seed, "canary", round)``.
    """
    n = len(device_ids)
    coordinator = Coordinator(FedAvg(), n, UniformSampler(cohort), seed=seed)
    inside = np.flatnonzero(canary.in_canary(device_ids))
    sent: dict[int, set[int]] = {canary.candidate: set(), canary.production: set()}
    rounds = 0
    verdict = canary.verdict
    while not canary.decided:
        cand, prod = canary.cohorts(device_ids, cohort, seeds.generator(seed, "canary", rounds))
        for version, clients in ((canary.candidate, cand), (canary.production, prod)):
            for cmd in coordinator.evaluate(params_of(version), version, now,
                                            clients=clients,
                                            purpose=f"canary:{version}"):
                if isinstance(cmd, SendEval):
                    sent[version].update(cmd.client_ids.tolist())
                    for out in coordinator.handle(evaluator.answer(cmd, now)):
                        if isinstance(out, EvalDone):
                            canary.record(out.result)
        rounds += 1
        now += hours * 3600.0
        verdict = canary.decide(now)
    assert verdict is not None
    return CanaryRun(verdict, rounds, sent[canary.candidate], sent[canary.production],
                     set(inside.tolist()))


def corrupt_labels(data: Dataset, rng: np.random.Generator) -> Dataset:
    """``data`` with every label replaced by a different class drawn uniformly (a candidate
    "trained on corrupted labels")."""
    shift = rng.integers(1, data.num_classes, len(data.y))
    return replace(data, y=((data.y + shift) % data.num_classes).astype(np.int64),
                   name=f"{data.name} (corrupted labels)")
