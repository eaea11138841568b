"""What the dashboard shows, kept up to date by an observer: :class:`RunState`.

A :class:`RunState` is a small, thread-safe picture of one run: what it is (:class:`RunInfo`),
its status, one row per final round (the same columns as the run directory's
``metrics.jsonl``, so a live run and a replayed one look alike), and counters of what happened
since it started and in the round that is open, plus the canary page's audit entries
(:mod:`shoal.dashboard.canary`) and the edges page's reports (:mod:`shoal.dashboard.edges`).
:class:`DashboardObserver` feeds it from the coordinator's and the carrier's hooks;
:mod:`shoal.dashboard.replay` feeds it from a run directory. The web app
(:mod:`shoal.dashboard.app`) reads :meth:`RunState.snapshot`.

Every hook takes one lock for a few dictionary updates (about a microsecond): the dashboard
must stay cheap at a thousand devices (docs/benchmarks.md measures it). Nothing here holds a
device token, a key or an update: hooks carry counts and reasons only.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from shoal.config import Config
from shoal.dashboard.canary import CanaryPanel
from shoal.dashboard.edges import EdgesPanel
from shoal.observers import CarrierObserver
from shoal.records import RoundRecord

__all__ = ["DashboardObserver", "RunInfo", "RunState", "finite"]


def finite(v: object) -> object:
    """``v`` with non-finite floats as ``None`` (JSON has no NaN), recursively."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v


@dataclass(frozen=True)
class RunInfo:
    """What a run is (shown in the page's header and used to label its charts).

    Attributes:
        name: the run directory's or the state directory's name.
        mode: ``"deployment"`` (a live aggregator), ``"simulation"`` (``shoal run
            --dashboard``) or ``"replay"`` (a run directory).
        policy: ``"sync"`` (rounds) or ``"buffered"`` (server steps).
        rounds: the versions the run will commit.
        clients, per_round: population and cohort size.
        strategy, model, dataset: as configured.
        epsilon_budget: ``privacy.epsilon_budget`` (0: none).
        dp: ``privacy.placement``.
        secure_aggregation: whether SecAgg+ is on.
        num_params: model size (0 when unknown), for the compression ratio.
        checkin_interval_s: ``deploy.checkin_interval_s`` (what "online" is measured against).
    """

    name: str
    mode: str
    policy: str = "sync"
    rounds: int = 0
    clients: int = 0
    per_round: int = 0
    strategy: str = ""
    model: str = ""
    dataset: str = ""
    epsilon_budget: float = 0.0
    dp: str = "none"
    secure_aggregation: bool = False
    num_params: int = 0
    checkin_interval_s: float = 5.0

    @classmethod
    def of(cls, cfg: Config, name: str, mode: str, num_params: int = 0) -> RunInfo:
        """The info of a run configured by ``cfg``."""
        return cls(name=name, mode=mode, policy=cfg["round"]["policy"], rounds=cfg.rounds,
                   clients=cfg["data"]["clients"], per_round=cfg["sampling"]["per_round"],
                   strategy=cfg["strategy"]["name"], model=cfg["model"]["name"],
                   dataset=cfg["data"]["dataset"],
                   epsilon_budget=cfg["privacy"]["epsilon_budget"],
                   dp=cfg["privacy"]["placement"],
                   secure_aggregation=cfg["secure_aggregation"]["enabled"],
                   num_params=num_params,
                   checkin_interval_s=cfg["deploy"]["checkin_interval_s"])


@dataclass
class _Open:
    """Counts of the round (or server step) being collected."""

    round: int = 1
    since: float = 0.0  # wall time it opened
    tasks: int = 0
    asked: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)


class RunState:
    """One run as the dashboard shows it; every method is thread-safe.

    Args:
        info: what the run is.
        history: rows kept (the oldest are dropped; :attr:`dropped_rows` counts them).
        clock: wall time (UNIX seconds), for "last seen" and the phase timings.
    """

    def __init__(self, info: RunInfo, *, history: int = 100_000,
                 clock: Callable[[], float] = time.time) -> None:
        self.info = info
        self.clock = clock
        self._lock = threading.Lock()
        self._changed = 0  # bumped by every change: the push loop sends nothing otherwise
        self.status = "starting"
        self.detail = ""
        self.version = 0
        self._rows: deque[dict[str, Any]] = deque(maxlen=history)
        self.dropped_rows = 0
        self._open = _Open(since=clock())
        self.totals: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.checkins: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.dropouts: Counter[str] = Counter()
        self.abandoned: Counter[str] = Counter()
        self.active_uploads = 0
        self._committed_at: dict[int, float] = {}
        self._phases: dict[int, dict[str, float]] = {}
        self._awaiting_first_task: int | None = None  # version whose next task ends "commit"
        self._canary = CanaryPanel()
        self._edges = EdgesPanel()

    # -- writers ----------------------------------------------------------------------------

    def set_status(self, status: str, detail: str = "") -> None:
        """``starting``, ``waiting`` (for devices), ``running``, ``finished`` or ``failed``."""
        with self._lock:
            self.status, self.detail = status, detail
            self._changed += 1

    def set_info(self, info: RunInfo) -> None:
        with self._lock:
            self.info = info
            self._changed += 1

    def add_row(self, row: Mapping[str, Any]) -> None:
        """A final round: a ``metrics.jsonl`` line (or :meth:`RoundRecord.to_dict`)."""
        clean = finite(dict(row))
        assert isinstance(clean, dict)
        with self._lock:
            version = int(clean.get("version", 0) or 0)
            clean.update(self._phases.pop(version, {}))
            clean.update(self._edges.columns(int(clean.get("round", 0) or 0)))
            if len(self._rows) == self._rows.maxlen:
                self.dropped_rows += 1
            self._rows.append(clean)
            self.version = max(self.version, version)
            if self.status in ("starting", "waiting"):
                self.status, self.detail = "running", ""
            self._changed += 1

    def add_audit(self, entry: Mapping[str, Any]) -> None:
        """An audit log entry (a canary's step, a drift alarm): :mod:`.canary`."""
        with self._lock:
            self._canary.add(finite(dict(entry)))  # type: ignore[arg-type]
            self._changed += 1

    def add_edge_report(self, report: Mapping[str, Any]) -> None:
        """An edge's part in one task (an ``EdgeReport`` as a dict): :mod:`.edges`."""
        with self._lock:
            self._edges.add(report)
            self._changed += 1

    def count(self, table: str, key: str, n: int = 1) -> None:
        """Add ``n`` to counter ``key`` of ``table`` (``checkins``, ``refused``, ...)."""
        with self._lock:
            getattr(self, table)[key] += n
            self._changed += 1

    # -- readers ----------------------------------------------------------------------------

    @property
    def changes(self) -> int:
        """A number that grows with every change (cheap to poll)."""
        return self._changed

    def canary(self) -> dict[str, Any] | None:
        """The latest canary of the audit entries (:meth:`.canary.CanaryPanel.view`)."""
        with self._lock:
            return self._canary.view()

    def rows(self) -> list[dict[str, Any]]:
        """Every row kept, oldest first."""
        with self._lock:
            return list(self._rows)

    def snapshot(self, since: int = 0, audit_since: int = 0) -> dict[str, Any]:
        """The state as JSON-ready data, with the rows from number ``since`` on and the
        audit entries from number ``audit_since`` on.

        Rows are numbered from 0 over the whole run (:attr:`dropped_rows` included), so a page
        that has rows ``0..n-1`` asks for ``since=n`` and gets only what is new; ``next`` is
        the number to ask for next time (``audit_next`` for audit entries).
        """
        with self._lock:
            audit, audit_first = self._canary.since(audit_since)
            first = self.dropped_rows
            start = max(since - first, 0)
            rows = list(self._rows)[start:] if start < len(self._rows) else []
            o = self._open
            return {
                "info": asdict(self.info), "status": self.status, "detail": self.detail,
                "version": self.version, "changes": self._changed, "now": self.clock(),
                "rows": rows, "first": first + start, "next": first + len(self._rows),
                "open": {"round": o.round, "since": o.since, "tasks": o.tasks,
                         "asked": o.asked, "accepted": o.accepted,
                         "rejected": dict(o.rejected), "failed": dict(o.failed)},
                "totals": dict(self.totals), "rejected": dict(self.rejected),
                "failed": dict(self.failed), "checkins": dict(self.checkins),
                "refused": dict(self.refused), "dropouts": dict(self.dropouts),
                "abandoned": dict(self.abandoned), "active_uploads": self.active_uploads,
                "canary": self._canary.view(), "audit": audit, "audit_first": audit_first,
                "audit_next": self._canary.total, "edges": self._edges.view(),
            }

    # -- what the observer reports ----------------------------------------------------------

    def _task_sent(self, clients: int) -> None:
        with self._lock:
            now = self.clock()
            if self._awaiting_first_task is not None:
                v = self._awaiting_first_task
                if v in self._committed_at:
                    self._phase(v, "phase_commit_s", now - self._committed_at[v])
                self._awaiting_first_task = None
            if self.status in ("starting", "waiting"):
                self.status, self.detail = "running", ""
            self._open.tasks += 1
            self._open.asked += clients
            self.totals["tasks"] += 1
            self.totals["asked"] += clients
            self._changed += 1

    def _phase(self, version: int, name: str, seconds: float) -> None:
        # a phase known after the row was added goes into the row itself (rows arrive in
        # version order and lag a commit by one evaluation at most: look at the last few)
        for row in itertools.islice(reversed(self._rows), 4):
            if row.get("version") == version and row.get("round") == version:
                row[name] = seconds
                return
        self._phases.setdefault(version, {})[name] = seconds
        for old in [v for v in self._phases if v < version - 8]:
            del self._phases[old]  # versions whose row will not come (none kept)

    def _accepted(self, clients: int) -> None:
        with self._lock:
            self._open.accepted += clients
            self.totals["accepted"] += clients
            self._changed += 1

    def _rejected(self, reason: str, count: int) -> None:
        with self._lock:
            self._open.rejected[reason] += count
            self.rejected[reason] += count
            self._changed += 1

    def _failed(self, reason: str, count: int) -> None:
        with self._lock:
            self._open.failed[reason] += count
            self.failed[reason] += count
            self._changed += 1

    def _committed(self, record: RoundRecord) -> None:
        with self._lock:
            now = self.clock()
            self.version = max(self.version, record.version)
            self._committed_at[record.version] = now
            # only the last few are needed (evaluation lags one version at most)
            for old in [v for v in self._committed_at if v < record.version - 8]:
                del self._committed_at[old]
            self._awaiting_first_task = record.version
            self._open = _Open(round=record.round + 1, since=now)
            self.totals["committed"] += 1
            self._changed += 1

    def _evaluated(self, record: RoundRecord) -> None:
        row = record.to_dict()
        row["at"] = self.clock()
        self.add_row(row)

    def _abandoned(self, reason: str) -> None:
        with self._lock:
            self.abandoned[reason] += 1
            # the retry is a fresh cohort of the same round
            self._open = _Open(round=self._open.round, since=self.clock())
            self._changed += 1

    def _bytes(self, direction: str, n: int) -> None:
        with self._lock:
            self.totals[f"bytes_{direction}"] += n
            self._changed += 1

    def _uploads(self, delta: int) -> None:
        with self._lock:
            self.active_uploads += delta
            self._changed += 1


class DashboardObserver(CarrierObserver):
    """Feeds a :class:`RunState` from the coordinator's and the carrier's hooks.

    Hand it to the run (``observers=[...]``); in a deployment the gRPC service's carrier
    hooks reach it too (check-ins, refused calls, bytes, active uploads).
    """

    def __init__(self, state: RunState) -> None:
        self.state = state

    def task_sent(self, task_id: int, version: int, clients: int, now: float) -> None:
        self.state._task_sent(clients)

    def update_accepted(self, task_id: int, clients: int, staleness: int, now: float) -> None:
        self.state._accepted(clients)

    def update_rejected(self, task_id: int, reason: str, count: int, detail: str,
                        now: float) -> None:
        self.state._rejected(reason, count)

    def clients_failed(self, task_id: int, clients: int, reason: str, now: float) -> None:
        self.state._failed(reason, clients)

    def version_committed(self, record: RoundRecord) -> None:
        self.state._committed(record)

    def version_evaluated(self, record: RoundRecord) -> None:
        self.state._evaluated(record)

    def round_abandoned(self, record: RoundRecord, reason: str) -> None:
        self.state._abandoned(reason)

    def secagg_dropouts(self, version: int, stage: str, count: int) -> None:
        self.state.count("dropouts", stage, count)

    def call_refused(self, reason: str) -> None:
        self.state.count("refused", reason)

    def checked_in(self, answer: str) -> None:
        self.state.count("checkins", answer)

    def bytes_moved(self, direction: str, n: int) -> None:
        self.state._bytes(direction, n)

    def uploads_active(self, delta: int) -> None:
        self.state._uploads(delta)

    def edge_reported(self, report: object) -> None:
        self.state.add_edge_report(report.to_dict())  # type: ignore[attr-defined]

