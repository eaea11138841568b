"""The canary panel: a canary rollout as the audit log tells it.

A canary (:class:`~shoal.lifecycle.canary.Canary`) appends every step to its audit log
(``audit.jsonl`` beside the model store, :class:`~shoal.lifecycle.audit.AuditLog`):
``canary_start`` (candidate, production, fraction, salt, rule), ``canary_evaluated`` per arm
and evaluation round (clients, examples, the example-weighted metrics), then the rule's
verdict of that round (``canary_wait``, ``canary_promote`` or ``canary_rollback``, with the
clients behind each arm, the statistic ``z`` and both one-sided p-values), logged once the
store has moved; a move the store refused is ``canary_promote_refused`` /
``canary_rollback_refused`` with the error, and the canary stays undecided. The log is the record
the operator keeps, so the panel reads it -- the same file while ``shoal launch --canary``
writes it and afterwards -- rather than hooks of its own: what the page shows is what was
decided on.

:class:`CanaryPanel` folds entries as they come into the view of the latest canary
(:meth:`CanaryPanel.view`) and keeps the last entries for the page's log table.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

__all__ = ["CanaryPanel", "DECISIONS"]

#: a verdict's action -> what became of the candidate
DECISIONS = {"canary_promote": "promoted", "canary_rollback": "rolled back",
             "canary_wait": "pending", "canary_promote_refused": "pending",
             "canary_rollback_refused": "pending"}
_ARM_FIELDS = ("clients", "examples", "missing", "task_id", "clipped")


class CanaryPanel:
    """The latest canary of an audit log, and the log's last entries.

    Not thread-safe: :class:`~shoal.dashboard.state.RunState` calls it under its lock.

    Args:
        keep: audit entries kept for the log table (the oldest are dropped).
    """

    def __init__(self, keep: int = 1000) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=keep)
        self.total = 0  # entries seen, dropped ones included
        self._canary: dict[str, Any] | None = None
        self._pending: dict[str, dict[str, Any]] = {}  # arm -> its evaluation this round

    def add(self, entry: Mapping[str, Any]) -> None:
        """Fold one audit entry (any action; those of a canary change the view)."""
        e = dict(entry)
        self.entries.append(e)
        self.total += 1
        action = e.get("action")
        if action == "canary_start":
            self._canary = {
                "candidate": e.get("candidate"), "production": e.get("production"),
                "fraction": e.get("fraction"), "salt": e.get("salt"),
                "rule": dict(e.get("rule") or {}), "started": e.get("at"),
                "decision": "pending", "reason": "", "decided": None, "evaluations": []}
            self._pending = {}
            return
        c = self._canary
        if c is None:
            return  # a drift alarm, or the middle of a log whose start was dropped
        if action == "canary_evaluated":
            arm = str(e.get("arm", ""))
            self._pending[arm] = {**{k: e.get(k) for k in _ARM_FIELDS},
                                  "version": e.get("version"),
                                  "metrics": dict(e.get("metrics") or {})}
        elif action in DECISIONS:
            c["evaluations"].append({
                "number": len(c["evaluations"]) + 1, "at": e.get("at"),
                "candidate": self._pending.get("candidate"),
                "production": self._pending.get("production"),
                "n_candidate": e.get("n_candidate"), "n_production": e.get("n_production"),
                "z": e.get("z"), "p_worse": e.get("p_worse"),
                "p_not_worse": e.get("p_not_worse"), "verdict": action[len("canary_"):],
                "reason": e.get("reason", "")})
            self._pending = {}
            reason = str(e.get("reason", ""))
            if action.endswith("_refused"):  # the store did not move: still undecided
                reason = f"{reason} -- the store refused: {e.get('error', '')}"
                c["evaluations"][-1]["reason"] = reason
            c["decision"], c["reason"] = DECISIONS[action], reason
            if c["decision"] != "pending":
                c["decided"] = e.get("at")

    def view(self) -> dict[str, Any] | None:
        """The latest canary: its versions, fraction, salt and rule; one row per evaluation
        round (each arm's clients and metrics, the rule's statistic and verdict so far);
        the decision (``pending``, ``promoted`` or ``rolled back``) and its reason; ``None``
        when the log has no canary."""
        if self._canary is None:
            return None
        c = self._canary
        return {**c, "rule": dict(c["rule"]), "evaluations": list(c["evaluations"])}

    def since(self, n: int) -> tuple[list[dict[str, Any]], int]:
        """``(entries numbered n and on, their first number)``: entries are numbered from 0
        over the whole log, dropped ones included."""
        first = self.total - len(self.entries)
        start = max(n - first, 0)
        return list(self.entries)[start:], first + start
