"""A run directory as a :class:`~shoal.dashboard.state.RunState`: replayed, and followed while
``shoal run`` is still writing it.

``metrics.jsonl`` gains one line per final round (the run directory's writer appends and
closes the file each time) and ``summary.json`` appears when the run ends, so following a run
is reading the lines that are new since the last look, and calling it finished once the
summary is there. Two more JSON-lines files are followed the same way when they exist:
``edges.jsonl`` (one line per edge and task of a run with edge aggregators,
:class:`~shoal.dashboard.edges.EdgeLog`) and an audit log (``audit.jsonl``, what a canary
rollout decided: :mod:`shoal.dashboard.canary`), in the directory or named apart -- a
``shoal launch --canary`` state directory is followed while its canary runs.

:class:`EdgeProcesses` follows the edge processes of ``shoal launch --edges`` the same way:
each edge writes its reports to ``edges.jsonl`` in its own directory, and an edge process
that dies is reported failed, its devices moved where the ring the devices follow moves them.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

from shoal.config import Config, load_config
from shoal.dashboard.edges import EDGES_FILE
from shoal.dashboard.state import RunInfo, RunState
from shoal.errors import DataError, ProtocolError
from shoal.hierarchy.ring import Ring

__all__ = ["EdgeProcesses", "JsonLines", "RunDirFollower"]


def _config_of(run_dir: Path) -> Config:
    path = run_dir / "config.toml"
    if not path.is_file():
        raise DataError(f"{run_dir} is not a run directory: it has no config.toml (a run "
                        f"directory holds config.toml and metrics.jsonl)", path=str(run_dir))
    return load_config(path)


class JsonLines:
    """The complete lines a JSON-lines file gained since the last look (a line still being
    written is read next time; a missing file has none yet).

    Args:
        path: the file.
        strict: a complete line that is not a JSON object is an error; else it is skipped
            (an audit log's torn line, as :func:`~shoal.lifecycle.audit.read_audit` does).
    """

    def __init__(self, path: Path, *, strict: bool = True) -> None:
        self.path = path
        self.strict = strict
        self._offset = 0
        self._line = 0

    @property
    def started(self) -> bool:
        """Whether anything was read yet."""
        return self._offset > 0

    def read(self) -> list[dict]:
        """The new objects, oldest first.

        Raises:
            DataError: (strict) a complete line is not a JSON object.
        """
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        out = []
        for raw in data[:end].splitlines():
            self._line += 1
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                if not self.strict:
                    continue
                raise DataError(f"{self.path}:{self._line} is not JSON: {exc}",
                                path=str(self.path)) from None
            if not isinstance(row, dict):
                if not self.strict:
                    continue
                raise DataError(f"{self.path}:{self._line} is not a JSON object",
                                path=str(self.path))
            out.append(row)
        self._offset += end
        return out


class _Poller:
    """Calls :meth:`poll` every ``interval_s`` seconds on a daemon thread (:meth:`start`)
    until :meth:`stop`; a :class:`DataError` marks the state failed and ends it."""

    state: RunState
    _thread: threading.Thread | None = None

    def poll(self) -> int:
        raise NotImplementedError

    def start(self, interval_s: float = 0.5) -> None:
        """Poll every ``interval_s`` seconds on a daemon thread until :meth:`stop`."""
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.poll()
                except DataError as exc:
                    self.state.set_status("failed", str(exc))
                    return

        self._thread = threading.Thread(target=loop, name="shoal-dashboard-follow",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (waiting for a poll under way)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)


class RunDirFollower(_Poller):
    """Reads a run directory into a :class:`RunState`, and keeps reading as it grows.

    Args:
        run_dir: the directory (``runs/<name>``, or a ``shoal launch`` state directory).
        history: rows the state keeps.
        audit: the audit log to follow (default: ``audit.jsonl`` in ``run_dir``).

    Raises:
        DataError: ``run_dir`` has no ``config.toml``.
        ConfigError: its ``config.toml`` does not load.
    """

    def __init__(self, run_dir: str | Path, *, history: int = 100_000,
                 audit: str | Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = _config_of(self.run_dir)
        summary = self._summary()
        self.state = RunState(RunInfo.of(self.cfg, self.run_dir.name, "replay",
                                         int(summary.get("num_params", 0) or 0)),
                              history=history)
        self._metrics = JsonLines(self.run_dir / "metrics.jsonl")
        self._edges = JsonLines(self.run_dir / "edges.jsonl")
        self.audit_path = Path(audit) if audit is not None else self.run_dir / "audit.jsonl"
        self._audit = JsonLines(self.audit_path, strict=False)
        self.poll()

    def _summary(self) -> dict:
        try:
            return json.loads((self.run_dir / "summary.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}  # not finished yet (or being written): try again at the next poll

    def poll(self) -> int:
        """Read what is new; returns the number of rows added.

        Raises:
            DataError: a complete line of ``metrics.jsonl`` or ``edges.jsonl`` is not a JSON
                object.
        """
        for entry in self._audit.read():
            self.state.add_audit(entry)
        for report in self._edges.read():  # before the rows: a round's edges are older
            self.state.add_edge_report(report)
        rows = self._metrics.read()
        for row in rows:
            self.state.add_row(row)
        canary = None if self._metrics.started else self.state.canary()
        if canary is not None:  # a canary's state directory: its latest canary's state
            status = "running" if canary["decision"] == "pending" else "finished"
            detail = f"canary of v{canary['candidate']}: {canary['decision']}"
            if (self.state.status, self.state.detail) != (status, detail):
                self.state.set_status(status, detail)
        elif self.state.status != "finished":
            summary = self._summary()
            if summary:
                stopped = summary.get("stopped") or ""
                self.state.set_status("finished", f"stopped early: {stopped}" if stopped
                                      else "")
            elif self.state.status == "starting" and self._metrics.started:
                self.state.set_status("running")
        return len(rows)


class EdgeProcesses(_Poller):
    """The edge processes of ``shoal launch --edges`` on the dashboard of their global
    aggregator.

    Args:
        state: the global's dashboard state.
        dirs: edge name -> its state directory (where it writes ``edges.jsonl``).
        ring: the ring the devices were placed on and follow (failed edges are taken off
            it here, as the devices move).
        exit_code: edge name -> its process's exit code (``None`` while it runs).

    A process that exits with a code other than 0 while followed is reported ``failed`` in
    the round after its last report; :meth:`stop` before stopping the processes.
    """

    def __init__(self, state: RunState, dirs: Mapping[str, Path], ring: Ring,
                 exit_code: Callable[[str], int | None]) -> None:
        self.state = state
        self.ring = ring
        self.exit_code = exit_code
        self._files = {name: JsonLines(Path(d) / EDGES_FILE) for name, d in dirs.items()}
        self._last: dict[str, int] = {}
        self.failed: list[str] = []

    def poll(self) -> int:
        """Read the edges' new reports and look for dead edges; returns the reports added.

        Raises:
            DataError: a complete line of an ``edges.jsonl`` is not a JSON object.
        """
        added = 0
        for name, lines in self._files.items():
            for report in lines.read():
                self._last[name] = int(report.get("round", 0) or 0)
                self.state.add_edge_report(report)
                added += 1
        for name in self._files:
            code = self.exit_code(name)
            if code in (None, 0) or name in self.failed:
                continue
            self.failed.append(name)
            try:
                moved = self.ring.fail(name)
            except ProtocolError:  # the last live edge: its devices have nowhere to go
                moved = []
            to = Counter(self.ring.edge_of(d) or "" for d in moved)
            self.state.add_edge_report({"round": self._last.get(name, 0) + 1, "edge": name,
                                        "assigned": 0, "asked": 0, "outcome": "failed",
                                        "moved_to": dict(to)})
            added += 1
        return added
