"""The edges panel: a run with edge aggregators (docs/hierarchy.md) edge by edge.

A tier of edges tells its observer one :class:`~shoal.hierarchy.tiers.EdgeReport` per edge
and task (:meth:`~shoal.observers.Observer.edge_reported`): the devices the ring gives the
edge, the clients of the task in its group, the updates inside its upload, the bytes its
devices sent it and the bytes it sent up, and a failure with where the ring moved its
devices. :class:`EdgesPanel` sums them per edge for the page and counts each round's
uploads; :class:`EdgeLog` writes them to the run directory's ``edges.jsonl`` (one JSON object
per line) so that ``shoal dashboard runs/<dir>`` shows the same panel.

The global's side of the same traffic is in the round rows: ``bytes_up`` is what reached the
global server, ``privacy_edge_ingress_bytes`` what the devices sent their edges.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shoal.observers import Observer

__all__ = ["EdgeLog", "EdgesPanel", "EDGES_FILE"]

#: the run directory's file of edge reports
EDGES_FILE = "edges.jsonl"
_KEEP_ROUNDS = 8  # rounds whose row may still come (evaluation lags a commit by one)


def _order(name: str) -> tuple[str, int, str]:
    """``edge-2`` before ``edge-10``."""
    stem, _, tail = name.rpartition("-")
    return (stem, int(tail), "") if tail.isdigit() else (name, -1, name)


class EdgesPanel:
    """Edge reports summed per edge, and each round's uploads for its row.

    Not thread-safe: :class:`~shoal.dashboard.state.RunState` calls it under its lock.
    """

    def __init__(self) -> None:
        self._edges: dict[str, dict[str, Any]] = {}
        self.failures: list[dict[str, Any]] = []
        self._rounds: dict[int, dict[str, int]] = {}
        self.reports = 0

    def _edge(self, name: str) -> dict[str, Any]:
        e = self._edges.get(name)
        if e is None:
            e = self._edges[name] = {
                "edge": name, "assigned": 0, "tasks": 0, "uploads": 0, "accepted": 0,
                "asked": 0, "device_bytes": 0.0, "upload_bytes": 0.0, "no_round": 0,
                "failed_round": None, "moved_out": 0, "moved_in": 0, "last_round": 0,
                "last_outcome": ""}
        return e

    def add(self, report: Mapping[str, Any]) -> None:
        """Fold one report (an :class:`~shoal.hierarchy.tiers.EdgeReport` as a dict)."""
        name = str(report["edge"])
        rnd = int(report.get("round", 0) or 0)
        outcome = str(report.get("outcome", ""))
        e = self._edge(name)
        e["assigned"] = int(report.get("assigned", 0) or 0)
        e["tasks"] += 1
        e["asked"] += int(report.get("asked", 0) or 0)
        e["accepted"] += int(report.get("accepted", 0) or 0)
        e["device_bytes"] += float(report.get("device_bytes", 0) or 0)
        e["upload_bytes"] += float(report.get("upload_bytes", 0) or 0)
        e["last_round"], e["last_outcome"] = rnd, outcome
        per_round = self._rounds.setdefault(rnd, {"edge_uploads": 0, "edge_failed": 0})
        if outcome == "uploaded":
            e["uploads"] += 1
            per_round["edge_uploads"] += 1
        elif outcome == "no_round":
            e["no_round"] += 1
        elif outcome == "failed":
            e["failed_round"] = rnd
            per_round["edge_failed"] += 1
            moved = {str(k): int(v) for k, v in (report.get("moved_to") or {}).items()}
            e["moved_out"] += sum(moved.values())
            for other, n in moved.items():
                self._edge(other)["moved_in"] += n
            self.failures.append({"edge": name, "round": rnd, "moved": sum(moved.values()),
                                  "moved_to": moved})
        self.reports += 1
        for old in [r for r in self._rounds if r < rnd - _KEEP_ROUNDS]:
            del self._rounds[old]  # rounds whose row came (or will not)

    def columns(self, round_: int) -> dict[str, int]:
        """The round's edge counts for its row (``edge_uploads``, ``edge_failed``), taken
        once (empty when no edge reported for it)."""
        return self._rounds.pop(round_, {})

    def view(self) -> dict[str, Any] | None:
        """Every edge's totals (in name order) and the failures; ``None`` without edges."""
        if not self._edges:
            return None
        return {"edges": [dict(self._edges[k]) for k in sorted(self._edges, key=_order)],
                "failures": [dict(f) for f in self.failures], "reports": self.reports}


class EdgeLog(Observer):
    """Appends every edge report to ``edges.jsonl`` in a run directory.

    Args:
        run_dir: the run directory (the file is started empty).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / EDGES_FILE
        self.path.write_text("")

    def edge_reported(self, report: object) -> None:
        line = json.dumps(report.to_dict(), allow_nan=False)  # type: ignore[attr-defined]
        with open(self.path, "a") as f:
            f.write(line + "\n")
