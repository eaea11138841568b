"""Federated evaluation: what an evaluation task's reports add up to.

An evaluation task (:class:`~shoal.events.EvalTask`) asks a cohort of clients to evaluate one
model version on their own held-out data and report metrics, never training and never
uploading a model. :class:`EvalTally` folds their :class:`~shoal.events.EvalReports` as they
arrive (refusing clients that were not asked, or that already reported) and closes into an
:class:`EvalResult`: every metric's example-weighted mean over the cohort, the same broken
down by segment (a client attribute the carrier reports, e.g. device class or region), and
the per-client values that statistical rules (the canary's test) need. The coordinator owns
the tallies of its open evaluation tasks; carriers only deliver reports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from shoal.errors import ProtocolError
from shoal.events import EvalReports

__all__ = ["EvalResult", "EvalTally", "weighted_means"]


def weighted_means(values: Mapping[str, np.ndarray], weights: np.ndarray
                   ) -> dict[str, float]:
    """Each metric's mean weighted by ``weights``, over the rows where it is finite (NaN
    when no such row has weight)."""
    out = {}
    for name, v in values.items():
        v = np.asarray(v, np.float64)
        ok = np.isfinite(v) & (weights > 0)
        total = float(weights[ok].sum())
        out[name] = float((v[ok] * weights[ok]).sum() / total) if total > 0 else math.nan
    return out


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation task measured.

    Attributes:
        task_id: the evaluation task.
        version: the model version evaluated.
        purpose: the requester's label (e.g. ``"canary:candidate"``).
        client_ids: int64 ``(k,)``, the clients that reported, in report order.
        num_examples: int64 ``(k,)``, their held-out examples (the weights).
        values: metric -> float64 ``(k,)`` per-client values.
        segments: ``(k,)`` each client's segment (``""`` when the carrier has none).
        metrics: metric -> example-weighted mean over every reporting client.
        by_segment: segment -> metric -> weighted mean, plus ``clients`` and ``examples``.
        missing: clients asked that never reported (failed, timed out).
        refused: reports refused (not asked, duplicate, malformed), by reason.
        closed_by: ``"complete"`` (all reported), ``"deadline"`` or ``"ended"``.
    """

    task_id: int
    version: int
    purpose: str
    client_ids: np.ndarray
    num_examples: np.ndarray
    values: Mapping[str, np.ndarray]
    segments: tuple[str, ...]
    metrics: Mapping[str, float]
    by_segment: Mapping[str, Mapping[str, float]]
    missing: int
    refused: Mapping[str, int] = field(default_factory=dict)
    closed_by: str = "complete"

    @property
    def clients(self) -> int:
        return len(self.client_ids)

    @property
    def examples(self) -> int:
        return int(self.num_examples.sum())

    def to_dict(self) -> dict:
        """The aggregate figures, JSON-ready (per-client values left out)."""
        return {"task_id": self.task_id, "version": self.version, "purpose": self.purpose,
                "clients": self.clients, "examples": self.examples,
                "metrics": dict(self.metrics),
                "by_segment": {k: dict(v) for k, v in self.by_segment.items()},
                "missing": self.missing, "refused": dict(self.refused),
                "closed_by": self.closed_by}


class EvalTally:
    """The open state of one evaluation task: who is still due, what has been reported.

    Args:
        task_id, version, purpose: copied into the result.
        asked: the clients the task went to.
    """

    def __init__(self, task_id: int, version: int, purpose: str, asked: np.ndarray) -> None:
        self.task_id, self.version, self.purpose = task_id, version, purpose
        self.asked = frozenset(int(c) for c in np.asarray(asked).tolist())
        self.pending = set(self.asked)
        self._ids: list[np.ndarray] = []
        self._n: list[np.ndarray] = []
        self._values: dict[str, list[np.ndarray]] = {}
        self._segments: list[str] = []
        self.refused: dict[str, int] = {}

    @property
    def done(self) -> bool:
        return not self.pending

    def _refuse(self, reason: str, count: int) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + count

    def fold(self, reports: EvalReports) -> tuple[np.ndarray, str]:
        """Take the reports of clients still due; returns the ids refused and why
        (``not_selected``, ``duplicate`` or ``malformed``; empty when all were taken).

        A client is done once its report is taken. Metrics every report must carry are the
        ones of the first report taken (a later report missing one is ``malformed``).
        """
        ids = np.asarray(reports.client_ids, np.int64)
        n = np.asarray(reports.num_examples, np.int64)
        k = len(ids)
        try:
            reports.check()
        except ProtocolError:
            self._refuse("malformed", k)
            return ids, "malformed"
        if self._values and set(reports.metrics) != set(self._values):
            self._refuse("malformed", k)
            return ids, "malformed"
        due = np.fromiter((int(c) in self.pending for c in ids), bool, k)
        # one report per client: a second report of one client in the same batch is a dup
        first = np.zeros(k, bool)
        first[np.unique(ids, return_index=True)[1]] = True
        take = due & first
        refused = ids[~take]
        reason = ""
        if (~take).any():
            asked = np.fromiter((int(c) in self.asked for c in ids), bool, k)
            dup = ~take & asked
            if dup.any():
                self._refuse("duplicate", int(dup.sum()))
                reason = "duplicate"
            if (~take & ~asked).any():
                self._refuse("not_selected", int((~take & ~asked).sum()))
                reason = reason or "not_selected"
        if take.any():
            self._ids.append(ids[take])
            self._n.append(n[take])
            for name, v in reports.metrics.items():
                self._values.setdefault(name, []).append(np.asarray(v, np.float64)[take])
            self._segments.extend(s for s, t in zip(reports.segments_or_blank(), take) if t)
            self.pending.difference_update(ids[take].tolist())
        return refused, reason

    def drop(self, client_ids: np.ndarray | None) -> None:
        """Stop waiting for ``client_ids`` (all still due when ``None``)."""
        if client_ids is None:
            self.pending.clear()
        else:
            self.pending.difference_update(np.asarray(client_ids).tolist())

    def close(self, closed_by: str) -> EvalResult:
        """The result of what was reported; clients still due count as missing."""
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
        n = np.concatenate(self._n) if self._n else np.zeros(0, np.int64)
        values = {k: np.concatenate(v) for k, v in self._values.items()}
        weights = n.astype(np.float64)
        segs = tuple(self._segments)
        by_segment: dict[str, Mapping[str, float]] = {}
        for seg in sorted(set(segs)):
            rows = np.array([s == seg for s in segs], bool)
            means = weighted_means({k: v[rows] for k, v in values.items()}, weights[rows])
            by_segment[seg] = MappingProxyType(
                means | {"clients": float(rows.sum()), "examples": float(weights[rows].sum())})
        missing = len(self.asked) - len(ids)
        return EvalResult(self.task_id, self.version, self.purpose, ids, n,
                          MappingProxyType(values), segs,
                          MappingProxyType(weighted_means(values, weights)),
                          MappingProxyType(by_segment), missing,
                          MappingProxyType(dict(self.refused)), closed_by)
