"""Devices behind the gRPC aggregator as the coordinator's carrier.

:class:`GrpcCarrier` is what :func:`~shoal.runner.drive` (and so
:class:`~shoal.experiment.Experiment`) runs a deployment over: a
:class:`~shoal.runner.PushCarrier` that attaches a :class:`~shoal.gateway.DeviceGateway` to a
running :class:`~shoal.transport.server.AggregatorService` and serves the coordinator on the
service's clock (the one the devices' deadlines are on) until the run finishes. Round rules
(target, over-selection, deadline, minimum fraction, abandon-and-retry, FedBuff) are the
coordinator's policy; this module only wires.

With ``secure`` (the run's :class:`~shoal.privacy.secagg_rounds.SecAggAggregation`) every task
is a secure-aggregation round run by the devices: the server never sees one device's update,
only the unmasked sum, which reaches the coordinator as one
:class:`~shoal.events.PartialAggregate`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from shoal.coordinator import Coordinator
from shoal.device_ckks import CkksSetup
from shoal.errors import ConfigError
from shoal.gateway import DeviceGateway, GatewaySettings
from shoal.privacy.secagg_rounds import SecAggAggregation
from shoal.records import RoundRecord
from shoal.strategy import ServerState
from shoal.transport.server import AggregatorService

__all__ = ["GrpcCarrier", "wait_for_devices"]


def wait_for_devices(registry: Any, want: int | Collection[str], timeout_s: float,
                     service: AggregatorService | None = None,
                     stop: threading.Event | None = None) -> list[str]:
    """Wait until the devices a run starts with have said Hello (enrolled in ``registry``).

    Args:
        registry: the device registry (``list()`` gives the enrolled devices).
        want: how many devices (``deploy.wait_devices``), or exactly which ones (a deployed
            edge's group).
        service: its registry's disk failing meanwhile stops the wait.
        stop: set: give up at once.

    Returns:
        With a count, the ids enrolled once there are that many; with ids, those ids sorted.

    Raises:
        ConfigError: not all of them within ``timeout_s`` (naming how many did), or
            ``stop`` was set.
        StorageError: ``service``'s registry disk failed meanwhile.
    """
    deadline = time.monotonic() + timeout_s
    named = None if isinstance(want, int) else set(want)
    need = want if isinstance(want, int) else len(named or ())
    while True:
        if service is not None and service.failure is not None:
            raise service.failure
        enrolled = [dev.device_id for dev in registry.list()]
        seen = len(enrolled) if named is None else len(named.intersection(enrolled))
        if seen >= need:
            return enrolled if named is None else sorted(named)
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            raise ConfigError(f"only {seen} of the {need} devices awaited said Hello within "
                              f"{timeout_s:g} s", key="deploy.wait_devices" if named is None
                              else "deploy.wait_timeout_s")
        time.sleep(0.05 if named is not None else 0.2)


class GrpcCarrier:
    """The coordinator's carrier for the devices of ``service``.

    Args:
        service: the running service.
        devices: the enrolled device ids clients are sampled from (client id ``i`` is the
            ``i``-th in sorted order).
        secure: secure-aggregation parameters (k, t and the encoding per roster size).
        poll_s: the longest the driving loop sleeps between checks of the clock.
        rng: come-back jitter (default: a fresh OS-seeded generator).
    """

    def __init__(self, service: AggregatorService, devices: Sequence[str], *,
                 secure: SecAggAggregation | CkksSetup | None = None, poll_s: float = 0.2,
                 rng: np.random.Generator | None = None) -> None:
        self.service = service
        self._devices, self._secure, self._rng = list(devices), secure, rng
        for device in service.registry.list():
            # the sizes devices declared in an earlier Hello (the weight cap's median)
            examples = device.capabilities.get("examples")
            if isinstance(examples, str) and examples.isdigit():
                service.weights.note(device.device_id, int(examples))
        self.gateway = self._new_gateway()
        self.poll_s = poll_s

    def _new_gateway(self) -> DeviceGateway:
        svc, st = self.service, self.service.settings
        return DeviceGateway(
            self._devices, svc.dim,
            GatewaySettings(idle_retry_s=st.idle_retry_s,
                            checkin_interval_s=st.checkin_interval_s,
                            roster_wait_s=st.roster_wait_s, stage_timeout_s=st.stage_timeout_s,
                            absent_after_s=st.absent_after_s),
            secure=self._secure, rng=self._rng, observer=svc.metrics, on_progress=svc.wake,
            on_publish=svc.publish, weights=svc.weights)

    @property
    def devices(self) -> tuple[str, ...]:
        return self.gateway.devices

    @property
    def num_clients(self) -> int:
        return self.gateway.num_clients

    @property
    def aggregates_securely(self) -> bool:
        """The coordinator must not simulate secure aggregation on top: the devices run it."""
        return self.gateway.aggregates_securely

    def run(self, coordinator: Coordinator, state: ServerState, *,
            stage_states: tuple | None = None,
            on_commit: Callable[[ServerState, RoundRecord], None] | None = None,
            on_abort: Callable[[RoundRecord, str, bool], None] | None = None) -> str:
        """Serve ``coordinator`` to the devices until it finishes; returns why. Each run
        gets a fresh :attr:`gateway` (sessions belong to one coordinator), so one carrier
        may serve several runs one after another.

        Raises:
            StorageError: the aggregator's state could not be written (the service's
                :attr:`~shoal.transport.server.AggregatorService.failure`); the versions
                committed before it are intact.
        """
        svc = self.service
        if self.gateway.coordinator is not None:
            self.gateway = self._new_gateway()
        svc.gateway = self.gateway
        if svc.failure is not None:
            raise svc.failure
        try:
            reason = self.gateway.run(coordinator, state, svc.clock,
                                      stage_states=stage_states, on_commit=on_commit,
                                      on_abort=on_abort, poll_s=self.poll_s,
                                      after_each=svc.flush_outcomes)
        finally:
            svc.flush_outcomes()
            svc.wake()
        if svc.failure is not None:  # the registry's disk failed mid-run: nothing to resume
            raise svc.failure
        return reason
