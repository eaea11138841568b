"""Structured logs: one JSON object per line, for log shippers and `jq`.

Every record carries ``ts`` (UNIX seconds), ``level``, ``logger`` and ``msg``; extra fields
passed as ``logger.info("...", extra={"fields": {...}})`` are merged in, so events such as a
refused upload are machine-readable (device, round, reason) as well as readable.
:class:`LogObserver` logs what the coordinator reports this way, each record with an
``event`` field naming its hook, the ``round`` (or server step) it belongs to and the model
``version`` where the hook names one. In a deployment the carrier's hooks add each device's
path: ``device_step`` (check-in, download, upload, validate, fold: DEBUG, or INFO with the
``outcome`` when a step refused it) and ``device_done`` (how it left its task: DEBUG when
accepted, INFO otherwise), each with the ``device``, ``task``, ``round`` and ``version``; the
carrier's own records (refused uploads, registry errors, secure rounds) name devices too.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping
from typing import TextIO

from shoal.observers import CarrierObserver
from shoal.records import RoundRecord

__all__ = ["JsonFormatter", "LogObserver", "configure_json_logging"]


def _finite(v: object) -> object:
    # JSON has no NaN or infinity: null keeps every line parseable by strict readers
    return None if isinstance(v, float) and not math.isfinite(v) else v


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps({k: _finite(v) for k, v in out.items()}, default=str)


def configure_json_logging(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send the ``shoal`` loggers' records to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("shoal")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


class LogObserver(CarrierObserver):
    """Logs each hook as one record on ``logger`` (default ``shoal.run``).

    Tasks sent and updates accepted are DEBUG (one per arrival in buffered runs); rejections,
    failures, versions and privacy are INFO; abandoned rounds and secure-aggregation dropouts
    are WARNING. Cancelled clients (stragglers of a round that closed) are DEBUG. A device's
    steps are DEBUG unless one refused it (INFO).
    """

    _TASKS_KEPT = 4096  # task -> (round, version) for device records; oldest dropped

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("shoal.run")
        # the round (or server step) being collected: task events carry it
        self.round = 1
        self._tasks: dict[int, tuple[int, int]] = {}

    def _emit(self, level: int, msg: str, event: str, **fields: object) -> None:
        if self.log.isEnabledFor(level):
            self.log.log(level, msg, extra={"fields": {"event": event, **fields}})

    def task_sent(self, task_id: int, version: int, clients: int, now: float) -> None:
        self._tasks[task_id] = (self.round, version)
        if len(self._tasks) > self._TASKS_KEPT:
            del self._tasks[next(iter(self._tasks))]
        self._emit(logging.DEBUG, f"task {task_id} (version {version}) sent to {clients} "
                   "clients", "task_sent", round=self.round, task=task_id, version=version,
                   clients=clients, now=now)

    def update_accepted(self, task_id: int, clients: int, staleness: int, now: float) -> None:
        self._emit(logging.DEBUG, f"task {task_id}: {clients} updates accepted",
                   "update_accepted", round=self.round, task=task_id, clients=clients,
                   staleness=staleness, now=now)

    def update_rejected(self, task_id: int, reason: str, count: int, detail: str,
                        now: float) -> None:
        self._emit(logging.INFO, f"task {task_id}: {count} updates rejected: {reason} "
                   f"({detail})", "update_rejected", round=self.round, task=task_id,
                   reason=reason, count=count, detail=detail, now=now)

    def clients_failed(self, task_id: int, clients: int, reason: str, now: float) -> None:
        level = logging.DEBUG if reason == "cancelled" else logging.INFO
        self._emit(level, f"task {task_id}: {clients} clients {reason}", "clients_failed",
                   round=self.round, task=task_id, clients=clients, reason=reason, now=now)

    def _of_task(self, task_id: int) -> dict[str, object]:
        rnd, version = self._tasks.get(task_id, (self.round, None))
        return {"round": rnd, "task": task_id, "version": version}

    def device_step(self, device_id: str, task_id: int, step: str, seconds: float,
                    outcome: str = "") -> None:
        level = logging.INFO if outcome else logging.DEBUG
        self._emit(level, f"device {device_id}: {step} " + (f"refused: {outcome}" if outcome
                                                              else f"in {seconds:.3f} s"),
                   "device_step", device=device_id, step=step, seconds=seconds,
                   outcome=outcome, **self._of_task(task_id))

    def device_done(self, device_id: str, task_id: int, outcome: str) -> None:
        level = logging.DEBUG if outcome == "accepted" else logging.INFO
        self._emit(level, f"device {device_id}: {outcome}", "device_done", device=device_id,
                   outcome=outcome, **self._of_task(task_id))

    def version_committed(self, record: RoundRecord) -> None:
        self.round = record.round + 1
        self._emit(logging.INFO, f"version {record.version} committed: {record.accepted} "
                   f"updates of {record.sampled} asked ({record.closed_by})",
                   "version_committed", **_record_fields(record))

    def version_evaluated(self, record: RoundRecord) -> None:
        if record.eval:
            self._emit(logging.INFO, f"round {record.round} evaluated: "
                       + ", ".join(f"{k} {v:.4g}" for k, v in record.eval.items()),
                       "version_evaluated", round=record.round, version=record.version,
                       **{f"eval_{k}": v for k, v in record.eval.items()})

    def round_abandoned(self, record: RoundRecord, reason: str) -> None:
        self._emit(logging.WARNING, f"round {record.round} abandoned: {reason}",
                   "round_abandoned", reason=reason, **_record_fields(record))

    def privacy_spent(self, version: int, values: Mapping[str, float]) -> None:
        self._emit(logging.INFO, f"version {version}: privacy "
                   + ", ".join(f"{k} {v:.4g}" for k, v in values.items()), "privacy_spent",
                   version=version, **{f"privacy_{k}": v for k, v in values.items()})

    def secagg_dropouts(self, version: int, stage: str, count: int) -> None:
        self._emit(logging.WARNING, f"version {version}: secure aggregation lost {count} "
                   f"clients at {stage}", "secagg_dropouts", version=version, stage=stage,
                   count=count)


def _record_fields(record: RoundRecord) -> dict[str, object]:
    return {"round": record.round, "version": record.version, "sampled": record.sampled,
            "accepted": record.accepted, "rejected": dict(record.rejected),
            "examples": record.examples, "train_loss": _finite(record.train_loss),
            "seconds": record.seconds, "closed_by": record.closed_by,
            "attempt": record.attempt, "staleness_max": record.staleness_max}
