"""Federated evaluation and canary rollouts over gRPC: the deployed carrier of
:meth:`Coordinator.evaluate <shoal.coordinator.Coordinator.evaluate>`.

:class:`EvaluationCarrier` attaches a :class:`~shoal.gateway.DeviceGateway` to a running
:class:`~shoal.transport.server.AggregatorService` with a coordinator that does not train
(:meth:`DeviceGateway.serve <shoal.gateway.DeviceGateway.serve>` in a thread of its own) and
opens evaluation-only tasks on cohorts of devices. A device is offered such a task only if
it is served the version to evaluate (:class:`~shoal.transport.serving.ModelServing`: a
canary's candidate inside the canary, production outside); it fetches that model with
``GetModel``, verifies its signature, evaluates it on its held-out split and reports with
the task's id and key. The reports fold into the same
:class:`~shoal.evaluation.EvalResult` as in simulation: example-weighted metrics and a
breakdown by the segment attribute the devices declared at Hello (the service's
``segment_by``).

:func:`run_canary_deployed` is :func:`shoal.sim.rollout.run_canary` over this carrier: each
round the candidate goes to a cohort drawn inside the canary and production to an equally
large cohort outside it (:meth:`Canary.cohorts <shoal.lifecycle.canary.Canary.cohorts>`), both
evaluated at the same time, until the rule decides; the canary moves the store and appends
every step to its audit log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shoal import seeds
from shoal.coordinator import Coordinator
from shoal.errors import ConfigError, ProtocolError
from shoal.evaluation import EvalResult
from shoal.gateway import DeviceGateway, GatewaySettings
from shoal.lifecycle.canary import Canary, Verdict, in_canary
from shoal.sampling import UniformSampler
from shoal.strategy import FedAvg
from shoal.transport.server import AggregatorService
from shoal.transport.serving import ModelServing

__all__ = ["CanaryOutcome", "EvaluationCarrier", "run_canary_deployed"]


class EvaluationCarrier:
    """Evaluation tasks for the devices of ``service`` (a context manager: entering starts
    serving them, leaving stops).

    Args:
        service: the running service; it must have :attr:`~shoal.transport.server.
            AggregatorService.serving` (what devices are served decides who may evaluate).
        devices: the enrolled device ids (client id ``i`` is the ``i``-th in sorted order).
        seed: the coordinator's seed (cohorts it draws itself).
        poll_s: the longest the serving loop sleeps between checks of the clock.

    Raises:
        ConfigError: the service serves no model.
    """

    def __init__(self, service: AggregatorService, devices: Sequence[str], *, seed: int = 0,
                 poll_s: float = 0.1) -> None:
        if service.serving is None:
            raise ConfigError("federated evaluation over gRPC needs a service that serves "
                              "models (AggregatorService(serving=...))", key="serving")
        self.service = service
        #: what the devices are served (the service's, checked above)
        self.serving: ModelServing = service.serving
        st = service.settings
        self.gateway = DeviceGateway(
            devices, service.dim,
            GatewaySettings(idle_retry_s=st.idle_retry_s,
                            checkin_interval_s=st.checkin_interval_s),
            observer=service.metrics, on_progress=service.wake,
            serves=self.serving.version_for)
        self.coordinator = Coordinator(FedAvg(), self.gateway.num_clients,
                                       UniformSampler(self.gateway.num_clients), seed=seed)
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._results: dict[int, EvalResult] = {}
        self._error: BaseException | None = None

    @property
    def devices(self) -> tuple[str, ...]:
        return self.gateway.devices

    def __enter__(self) -> EvaluationCarrier:
        self.service.gateway = self.gateway
        self._thread = threading.Thread(target=self._serve, name="shoal-evaluation",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while self.gateway.coordinator is None and self._error is None:  # serve() attaches it
            if time.monotonic() > deadline:
                raise ProtocolError("the evaluation loop did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.service.flush_outcomes()

    def _serve(self) -> None:
        try:
            self.gateway.serve(self.coordinator, self.service.clock, until=self._stop.is_set,
                               poll_s=self.poll_s, after_each=self.service.flush_outcomes)
        except BaseException as exc:  # surfaced by evaluate()
            self._error = exc
            self._stop.set()

    def evaluate(self, arms: Sequence[tuple[int, np.ndarray]], *, timeout_s: float,
                 purpose: str = "") -> list[EvalResult]:
        """Evaluate each ``(served version, client ids)`` of ``arms`` at the same time;
        returns their results in order once every asked device reported or failed, or
        ``timeout_s`` (the tasks' deadline) passed.

        Raises:
            ConfigError: an empty cohort or a client outside the population.
            ProtocolError: the serving loop stopped.
        """
        now = self.service.clock()
        ids = [self.gateway.evaluate(self.serving.params(v), v, now,
                                     clients=np.asarray(c, np.int64),
                                     deadline=now + timeout_s,
                                     purpose=purpose or f"evaluate:{v}")
               for v, c in arms]
        self.service.wake()
        give_up = time.monotonic() + timeout_s + 10.0
        while any(i not in self._results for i in ids):
            if self._error is not None or self._stop.is_set():
                raise ProtocolError(f"the evaluation loop stopped: {self._error}")
            if time.monotonic() > give_up:
                raise ProtocolError(f"evaluation tasks {ids} did not close")
            for r in self.gateway.take_evaluations():
                self._results[r.task_id] = r
            time.sleep(0.05)
        return [self._results.pop(i) for i in ids]


@dataclass(frozen=True)
class CanaryOutcome:
    """What a deployed canary did.

    Attributes:
        verdict: the final verdict.
        rounds: evaluation rounds run.
        canary_devices: the devices inside the canary.
        reached: served version -> every device its bytes were sent to.
    """

    verdict: Verdict
    rounds: int
    canary_devices: frozenset[str]
    reached: dict[int, frozenset[str]]


def run_canary_deployed(canary: Canary, carrier: EvaluationCarrier, *, cohort: int,
                        seed: int, timeout_s: float = 60.0) -> CanaryOutcome:
    """Evaluate both arms each round until ``canary`` decides (its rule promotes or rolls
    back; the canary moves the store and writes the audit log).

    The service must be serving ``canary`` (``service.serving.canary = canary``) so that
    the devices inside it are served the candidate.

    Args:
        cohort: devices per arm per round (fewer when an arm has fewer).
        seed: the cohorts' random stream ``(seed, "canary", round)``, as in simulation.
        timeout_s: each round's evaluation deadline.
    """
    serving = carrier.service.serving
    if serving is None or serving.canary is not canary:
        raise ConfigError("serve the canary before running it (service.serving.canary = "
                          "canary): devices inside it must be served the candidate",
                          key="canary")
    devices = carrier.devices
    rounds = 0
    while not canary.decided:
        cand, prod = canary.cohorts(devices, cohort, seeds.generator(seed, "canary", rounds))
        for result in carrier.evaluate(((canary.candidate, cand), (canary.production, prod)),
                                       timeout_s=timeout_s, purpose="canary"):
            canary.record(result)
        rounds += 1
        canary.decide(carrier.service.clock())
    assert canary.verdict is not None
    inside = frozenset(d for d, m in zip(devices, in_canary(devices, canary.fraction,
                                                            canary.salt)) if m)
    return CanaryOutcome(canary.verdict, rounds, inside,
                         {v: serving.reached(v) for v in (canary.candidate,
                                                          canary.production)})
