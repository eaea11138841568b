"""Device outcomes, from the gateway's sessions to the client registry.

The gateway notes what each device did for its task (``accepted``, ``rejected:<reason>``,
``late``, ``dropped``: :class:`~shoal.device_sessions.Outcome`); the aggregator writes them to
the registry (participation, fairness) from the carrier's driving thread, in batches, so that
no device's call waits on a registry transaction.
"""

from __future__ import annotations

import logging
from typing import Any

from shoal.device_sessions import Outcome
from shoal.store.disk import StorageError

__all__ = ["runs", "write_outcomes"]

log = logging.getLogger("shoal.aggregator")  # the aggregator's own log, as server.py's


def write_outcomes(registry: Any, outcomes: list[Outcome]) -> None:
    """Record ``outcomes`` in ``registry``, one write per run of the same round and outcome
    (:func:`runs`), stamped with the latest of the run's times.

    An outcome the registry refuses (the device was removed) is lost, never silently: the run
    is then written one by one, and the refused outcome logged at ERROR as ``registry_error``
    with the device, the round, the task, the outcome and the reason; the others are still
    written.

    Raises:
        StorageError: the registry's disk refused the write (the aggregator must stop).
    """
    for run in runs(outcomes):
        try:
            registry.record_outcomes([o.device_id for o in run], run[0].round, run[0].outcome,
                                     now=max(o.now for o in run))
            continue
        except StorageError:
            raise
        except Exception:  # noqa: BLE001 -- e.g. a removed device: one by one, to write
            pass           # the others and name (log) the one refused
        for o in run:
            _write_one(registry, o)


def runs(outcomes: list[Outcome]) -> list[list[Outcome]]:
    """``outcomes`` cut, in order, into runs of one round and outcome with no device twice:
    written run by run, they leave the registry as written one by one would."""
    out: list[list[Outcome]] = []
    devices: set[str] = set()
    for o in outcomes:
        if not out or (out[-1][0].round, out[-1][0].outcome) != (o.round, o.outcome) \
                or o.device_id in devices:
            out.append([])
            devices = set()
        out[-1].append(o)
        devices.add(o.device_id)
    return out


def _write_one(registry: Any, o: Outcome) -> None:
    try:
        registry.record_outcome(o.device_id, o.round, o.outcome, now=o.now)
    except StorageError:
        raise
    except Exception as exc:
        log.error("registry: could not record %s for device %s in round %d: %s",
                  o.outcome, o.device_id, o.round, exc,
                  extra={"fields": {"event": "registry_error", "device": o.device_id,
                                    "round": o.round, "task": o.task_id,
                                    "outcome": o.outcome, "error": str(exc)}})
