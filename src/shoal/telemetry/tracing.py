"""OpenTelemetry traces of a run: :class:`TracingObserver`.

One trace per run. Its spans, from the coordinator's and the carrier's hooks:

* ``run`` -- the whole run (attributes: its name, strategy, policy, clients);
* ``round`` (``server step`` in buffered runs) -- from the first task of a round to its
  commit, child of ``run``; attributes: round, version, sampled, accepted, rejected,
  examples, closed_by, attempts, bytes up and down, check-ins and refused calls seen meanwhile,
  the privacy values the stages reported; an ``abandoned`` event per abandoned cohort and a
  ``secagg.dropouts`` event per secure-aggregation stage that lost clients;
* ``task`` -- one per task sent (a cohort, or one client in buffered runs), child of the
  round it was sent in, from sending to its last client's answer (or the round's commit);
  ``accepted``, ``rejected`` (reason, detail) and ``clients_failed`` (reason) events;
* ``device`` -- one per device and task in a deployment, child of its task, from the
  device's check-in to the commit that used its update (an ``accepted`` device) or to the
  moment it left the round (``outcome``: ``late``, ``dropped``, ...; a refused update is a
  ``refused`` event, as the device may send a corrected one);
  children, timed by the carrier: ``checkin``, ``download``, ``train`` (from the end of the
  download to the start of the upload, as the server sees it: the device's training and its
  idle time), ``upload``, ``validate`` and ``fold`` (ERROR status and an ``outcome`` when a
  step refused the device); a ``commit`` event with the version when its round commits;
* an ``evaluated`` event on ``run`` per evaluated version (its metrics): the hook tells when
  the run reports an evaluation, not how long it took (it runs on its own thread and is
  reported in version order), so it is no span;
* ``store.promote`` / ``store.rollback`` -- the dashboard's moves of the production pointer
  (:meth:`TracingObserver.span`).

What the hooks do not say is not traced: the timing of the SecAgg+ stages (their dropouts
are events) and the aggregator's store writes; simulated clients have no device spans (a
cohort is one matrix). docs/dashboard.md says what it would take.

Exporters (``[tracing]``): ``console`` (stderr), ``file`` (one JSON object per span and line,
OpenTelemetry's own span JSON), ``otlp`` (OTLP over HTTP to a collector). Spans are exported in
batches from the SDK's background thread; :meth:`TracingObserver.close` ends what is still
open and flushes. The tracer provider is the observer's own, never the global one.
Needs ``opentelemetry-sdk`` (and ``opentelemetry-exporter-otlp-proto-http`` for ``otlp``):
``pip install shoal[dashboard]``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, ConsoleSpanExporter,
                                            SpanExporter)
from opentelemetry.trace import Span, Status, StatusCode

from shoal.config import Config
from shoal.errors import ConfigError
from shoal.observers import CarrierObserver
from shoal.records import RoundRecord

__all__ = ["TracingObserver", "tracing_from_config"]

_DROPPED_AT = "secagg_dropped_at_"


def _json_line(span: ReadableSpan) -> str:
    return span.to_json(indent=None) + "\n"


class _Task:
    __slots__ = ("span", "round", "pending")

    def __init__(self, span: Span, round: int, pending: int) -> None:
        self.span, self.round, self.pending = span, round, pending


class _Device:
    """A device's span in a task. ``accepted``: its update was folded, the span waits for
    the commit; ``folding``: its update is with the coordinator (validated, no answer yet);
    ``committed``: a commit came while it was folding (the coordinator tells of the commit
    before the carrier tells of the acceptance that caused it)."""

    __slots__ = ("span", "context", "downloaded", "accepted", "folding", "committed")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.context = trace.set_span_in_context(span)
        self.downloaded: int | None = None
        self.accepted = self.folding = False
        self.committed: int | None = None


class TracingObserver(CarrierObserver):
    """Turns the run's hooks into OpenTelemetry spans (see the module docstring).

    Args:
        exporter: where finished spans go.
        run: attributes of the ``run`` span (its name, strategy, ...).
        service_name: the ``service.name`` resource attribute.
        batch: export from a background thread in batches (``False``: as each span ends,
            for tests).
        owned: a file the exporter writes to, closed by :meth:`close`.
    """

    def __init__(self, exporter: SpanExporter, *, run: Mapping[str, Any] | None = None,
                 service_name: str = "shoal", batch: bool = True,
                 owned: IO[str] | None = None) -> None:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name":
                                                                 service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter) if batch
                                         else SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("shoal")
        self.unit = "server step" if (run or {}).get("policy") == "buffered" else "round"
        self._lock = threading.Lock()
        self._run = self.tracer.start_span("run", attributes=dict(run or {}))
        self._run_ctx = trace.set_span_in_context(self._run)
        self._round: Span | None = None
        self._round_no = 1
        self._carrier: Counter[str] = Counter()
        self._tasks: dict[int, _Task] = {}
        self._devices: dict[tuple[int, str], _Device] = {}
        self._closed = False
        self._owned = owned

    # -- spans of rounds and tasks ----------------------------------------------------------

    def _open_round(self) -> Span:
        if self._round is None:
            self._round = self.tracer.start_span(self.unit, context=self._run_ctx,
                                                 attributes={"round": self._round_no})
            self._carrier.clear()
        return self._round

    def _end_task(self, task_id: int, error: str = "") -> None:
        # a device's span ends when the carrier says how it left (device_done), at the
        # commit its update was in, or here when its task's updates were thrown away
        for key in [k for k in self._devices if k[0] == task_id and error]:
            self._end_device(key, error)
        t = self._tasks.pop(task_id, None)
        if t is not None:
            if error:
                t.span.set_status(Status(StatusCode.ERROR, error))
            t.span.end()

    def task_sent(self, task_id: int, version: int, clients: int, now: float) -> None:
        with self._lock:
            parent = trace.set_span_in_context(self._open_round())
            span = self.tracer.start_span("task", context=parent, attributes={
                "task.id": task_id, "model.version": version, "clients": clients})
            self._tasks[task_id] = _Task(span, self._round_no, clients)

    def _answered(self, task_id: int, clients: int) -> None:
        t = self._tasks.get(task_id)
        if t is not None:
            t.pending -= clients
            if t.pending <= 0:
                self._end_task(task_id)

    def update_accepted(self, task_id: int, clients: int, staleness: int, now: float) -> None:
        with self._lock:
            t = self._tasks.get(task_id)
            if t is not None:
                t.span.add_event("accepted", {"clients": clients, "staleness": staleness})
            self._answered(task_id, clients)

    def update_rejected(self, task_id: int, reason: str, count: int, detail: str,
                        now: float) -> None:
        # a refused update leaves its task open: the client may send a corrected one
        with self._lock:
            t = self._tasks.get(task_id)
            target = t.span if t is not None else self._round
            if target is not None:
                target.add_event("rejected", {"reason": reason, "count": count,
                                              "detail": detail[:500]})

    def clients_failed(self, task_id: int, clients: int, reason: str, now: float) -> None:
        with self._lock:
            t = self._tasks.get(task_id)
            if t is not None:
                t.span.add_event("clients_failed", {"clients": clients, "reason": reason})
            self._answered(task_id, clients)

    # -- a device's path through its task -----------------------------------------------------

    def _device(self, device_id: str, task_id: int, start: int) -> _Device:
        key = (task_id, device_id)
        d = self._devices.get(key)
        if d is None:
            t = self._tasks.get(task_id)
            parent = t.span if t is not None else self._round or self._run
            span = self.tracer.start_span("device", context=trace.set_span_in_context(parent),
                                          start_time=start, attributes={
                                              "device.id": device_id, "task.id": task_id})
            d = self._devices[key] = _Device(span)
        return d

    def _end_device(self, key: tuple[int, str], outcome: str, end: int | None = None) -> None:
        d = self._devices.pop(key, None)
        if d is not None:
            d.span.set_attribute("outcome", outcome)
            if outcome != "committed":
                d.span.set_status(Status(StatusCode.ERROR, outcome))
            d.span.end(end_time=end)

    def device_step(self, device_id: str, task_id: int, step: str, seconds: float,
                    outcome: str = "") -> None:
        end = time.time_ns()
        start = end - max(0, int(seconds * 1e9))
        with self._lock:
            if self._closed:
                return
            d = self._device(device_id, task_id, start)
            if step == "upload" and d.downloaded is not None and d.downloaded <= start:
                self.tracer.start_span("train", context=d.context, start_time=d.downloaded,
                                       attributes={"measured": "between download and upload"}
                                       ).end(end_time=start)
                d.downloaded = None
            span = self.tracer.start_span(step, context=d.context, start_time=start)
            if outcome:
                span.set_attribute("outcome", outcome)
                span.set_status(Status(StatusCode.ERROR, outcome))
            span.end(end_time=end)
            if step == "download":
                d.downloaded = end
            d.folding = step == "validate" and not outcome

    def _commit_device(self, key: tuple[int, str], version: int) -> None:
        self._devices[key].span.add_event("commit", {"model.version": version})
        self._end_device(key, "committed")

    def device_done(self, device_id: str, task_id: int, outcome: str) -> None:
        with self._lock:
            key = (task_id, device_id)
            d = self._devices.get(key)
            if d is None:
                return
            d.folding = False
            if outcome == "accepted" and d.committed is not None:
                self._commit_device(key, d.committed)
            elif outcome == "accepted":
                d.accepted = True  # ends at the commit its update goes into
            elif outcome.startswith("rejected:"):  # the device may send a corrected update
                d.span.add_event("refused", {"reason": outcome.split(":", 1)[1]})
            else:
                self._end_device(key, outcome)

    def _round_attributes(self, span: Span, record: RoundRecord) -> None:
        span.set_attributes({
            "round": record.round, "model.version": record.version,
            "sampled": record.sampled, "accepted": record.accepted,
            "rejected": sum(record.rejected.values()), "examples": record.examples,
            "committed": record.committed, "closed_by": record.closed_by,
            "attempts": record.attempt + 1, "bytes.up": record.bytes_up,
            "bytes.down": record.bytes_down, "seconds": record.seconds,
            **{f"rejected.{k}": v for k, v in record.rejected.items()},
            **{f"privacy.{k}": v for k, v in record.privacy.items()
               if not k.startswith(_DROPPED_AT)},
            **{f"carrier.{k}": v for k, v in self._carrier.items()}})
        for key, value in record.privacy.items():
            if key.startswith(_DROPPED_AT) and value:
                span.add_event("secagg.dropouts", {"stage": key[len(_DROPPED_AT):],
                                                   "clients": int(value)})

    def version_committed(self, record: RoundRecord) -> None:
        with self._lock:
            span = self._open_round()
            self._round_attributes(span, record)
            for key, d in list(self._devices.items()):
                if d.accepted:
                    self._commit_device(key, record.version)
                elif d.folding:  # the update that closed the round: its answer follows
                    d.committed = record.version
            for task_id in [k for k, t in self._tasks.items() if t.round == self._round_no
                            and self.unit == "round"]:
                self._end_task(task_id)  # a synchronous round's stragglers are cancelled
            span.end()
            self._round = None
            self._round_no = record.round + 1

    def version_evaluated(self, record: RoundRecord) -> None:
        if record.eval:
            with self._lock:
                self._run.add_event("evaluated", {"model.version": record.version,
                                                  **{f"eval.{k}": v
                                                     for k, v in record.eval.items()}})

    def round_abandoned(self, record: RoundRecord, reason: str) -> None:
        with self._lock:
            span = self._open_round()
            span.add_event("abandoned", {"reason": reason, "attempt": record.attempt,
                                         "accepted": record.accepted})
            for task_id in [k for k, t in self._tasks.items() if t.round == self._round_no]:
                self._end_task(task_id, f"abandoned: {reason}")

    # -- the carrier's traffic: counted into the round's attributes -------------------------

    def checked_in(self, answer: str) -> None:
        with self._lock:
            self._carrier[f"checkins.{answer}"] += 1

    def call_refused(self, reason: str) -> None:
        with self._lock:
            self._carrier[f"refused.{reason}"] += 1

    def bytes_moved(self, direction: str, n: int) -> None:
        with self._lock:
            self._carrier[f"bytes.{direction}"] += n

    # -- other spans --------------------------------------------------------------------------

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Span]:
        """A span of its own under ``run`` (e.g. ``store.rollback``); records what raises."""
        with self.tracer.start_as_current_span(name, context=self._run_ctx,
                                               attributes=attributes) as span:
            yield span

    def close(self) -> None:
        """End every open span (the run's last) and flush the exporter."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for task_id in list(self._tasks):
                self._end_task(task_id, "run ended")
            for key in list(self._devices):
                self._end_device(key, "run ended")
            if self._round is not None:
                self._round.end()
                self._round = None
            self._run.end()
        self.provider.shutdown()
        if self._owned is not None:
            self._owned.close()


def _file(path: Path) -> IO[str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", buffering=1)
    except OSError as exc:
        raise ConfigError(f"cannot write traces to {path}: {exc.strerror or exc}",
                          key="tracing.file") from None


def tracing_from_config(cfg: Config, directory: Path, run: Mapping[str, Any] | None = None
                        ) -> TracingObserver | None:
    """The tracing observer ``cfg["tracing"]`` asks for, or ``None`` (exporter ``none``).

    Args:
        cfg: the run's configuration.
        directory: where ``traces.jsonl`` goes when ``tracing.file`` is empty.
        run: attributes of the ``run`` span.

    Raises:
        ConfigError: the trace file cannot be opened, or ``otlp`` without its exporter
            package.
    """
    t = cfg["tracing"]
    exporter: SpanExporter
    owned = None
    if t["exporter"] == "none":
        return None
    if t["exporter"] == "console":
        exporter = ConsoleSpanExporter(out=sys.stderr, formatter=_json_line)
    elif t["exporter"] == "file":
        owned = _file(Path(t["file"]) if t["file"] else directory / "traces.jsonl")
        exporter = ConsoleSpanExporter(out=owned, formatter=_json_line)
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter)
        except ImportError:
            raise ConfigError("tracing.exporter = 'otlp' needs opentelemetry-exporter-otlp-"
                              "proto-http (pip install shoal[dashboard])",
                              key="tracing.exporter") from None
        exporter = OTLPSpanExporter(endpoint=t["endpoint"])
    return TracingObserver(exporter, run=run, service_name=t["service_name"], owned=owned)
