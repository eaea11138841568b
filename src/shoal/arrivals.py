"""How the coordinator takes the updates that arrive for its training tasks.

The arrivals half of :class:`~shoal.coordinator.Coordinator` (a mixin, like the gateway's
:class:`~shoal.device_commands.CommandDesk`):

* :meth:`ArrivalDesk._arrived` checks an :class:`~shoal.events.UpdatesArrived` event against
  its task (unknown, closed, wrong base version) and the policy's staleness weight;
* :meth:`~ArrivalDesk._fold_rows` folds a client's update or a batch of them: rows from
  clients the task does not wait for (duplicates, not selected) and rows the pipeline's
  validation refuses are refused one by one, the rest folded into the open aggregation;
* :meth:`~ArrivalDesk._fold_partial` folds a group's sum (:class:`~shoal.events.PartialAggregate`),
  answered once for the clients it covers;
* :meth:`~ArrivalDesk._refuse` counts a refusal, tells the observers and emits an
  :class:`~shoal.events.UpdateRefused`.

A refused update changes nothing. Sans-I/O: it uses the coordinator's tasks, open aggregation,
tally, policy and pipeline, and emits commands into its output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from shoal.errors import UpdateRejected
from shoal.events import (ClientUpdate, Command, PartialAggregate, TrainTask, UpdateBatch,
                          UpdateRefused, UpdatesArrived)
from shoal.observers import Observers
from shoal.pipeline import Pipeline, PipelineRun, validate_rows
from shoal.policy import RoundPolicy
from shoal.strategy import ServerState
from shoal.tally import Tally

if TYPE_CHECKING:
    from shoal.policy import Engine

__all__ = ["ArrivalDesk"]


@dataclass
class _Task:
    """A training task the coordinator sent: the clients it asked and those it waits for."""

    task: TrainTask
    asked: np.ndarray
    pending: set[int]
    cancelled: bool = False


class ArrivalDesk:
    """The coordinator's handling of arrived updates (see the module docstring)."""

    # provided by Coordinator
    state: ServerState
    policy: RoundPolicy
    pipeline: Pipeline
    observers: Observers
    _tasks: dict[int, _Task]
    _tally: Tally
    _run: PipelineRun
    _now: float
    _out: list[Command]

    @property
    def _engine(self) -> Engine:
        """This desk as the coordinator it is part of (what the policy is handed)."""
        return cast("Engine", self)

    def _refuse(self, task_id: int, reason: str, count: int, detail: str,
                clients: np.ndarray | None = None) -> None:
        self._tally.rejected[reason] += count
        self.observers.update_rejected(task_id, reason, count, detail, self._now)
        ids = () if clients is None else tuple(int(c) for c in clients)
        self._out.append(UpdateRefused(task_id, ids, reason, detail))

    def _arrived(self, event: UpdatesArrived) -> None:
        item, task_id = event.arrival, event.task_id
        tally = self._tally
        down = item.metrics.get("download_bytes", 0)
        tally.bytes_down += int(down) if isinstance(down, (int, float)) else int(np.sum(down))
        t = self._tasks.get(task_id)
        n, who = _rows_of(item), _clients_of(item)
        if t is None:
            self._refuse(task_id, "unknown_task", n, f"no task {task_id} is open", who)
            return
        if t.cancelled:
            self._refuse(task_id, "late", n, "the round of this task has closed", who)
            return
        base = item.base_version if item.base_version is not None else t.task.version
        if base != t.task.version:
            self._refuse(task_id, "wrong_version", n, f"task {task_id} sent version "
                         f"{t.task.version}, the update says it trained from {base}", who)
            return
        staleness = self.state.version - base
        try:
            factor = self.policy.staleness_weight(staleness)
        except UpdateRejected as exc:
            self._refuse(task_id, exc.reason, n, exc.detail, who)
            self._done_clients(t, _clients_of(item))
            self.policy.on_end(self._engine, task_id, False)
            return
        if isinstance(item, PartialAggregate):
            self._fold_partial(t, item, factor, staleness)
        else:
            self._fold_rows(t, item, factor, staleness)
        self.policy.on_update(self._engine, task_id)

    def _done_clients(self, t: _Task, clients: np.ndarray | None) -> None:
        if clients is None:
            t.pending.clear()
        else:
            t.pending.difference_update(clients.tolist())

    def _fold_rows(self, t: _Task, item: ClientUpdate | UpdateBatch, factor: float,
                   staleness: int) -> None:
        metrics: Mapping[str, np.ndarray]
        if isinstance(item, ClientUpdate):
            ids = np.array([item.client_id], dtype=np.int64)
            delta = item.delta
            # one update is one row, whatever its shape: a 2-D delta is wrong_shape, not rows
            rows = delta[np.newaxis] if isinstance(delta, np.ndarray) else delta
            examples = np.array([item.num_examples])
            metrics = {k: np.array([v]) for k, v in item.metrics.items()}
        else:
            ids, rows = np.asarray(item.client_ids, np.int64), item.deltas
            examples, metrics = np.asarray(item.num_examples), item.metrics
        known = np.fromiter((int(c) in t.pending for c in ids), bool, len(ids))
        if not known.all():
            asked = set(t.asked.tolist())
            dup = ~known & np.fromiter((int(c) in asked for c in ids), bool, len(ids))
            if dup.any():
                self._refuse(t.task.task_id, "duplicate", int(dup.sum()),
                             "this client already reported for this task", ids[dup])
            if (~known & ~dup).any():
                self._refuse(t.task.task_id, "not_selected", int((~known & ~dup).sum()),
                             "the client was not asked to train this task", ids[~known & ~dup])
        # a refused row changes nothing: its client may still send a good update (the task
        # ends for it when it is accepted, fails, times out or the carrier ends the task)
        keep, refused = validate_rows(rows, examples, self.state.params.size,
                                      self.pipeline.validation)
        for r in refused:
            mask = r.rows & known
            if mask.any():
                self._refuse(t.task.task_id, r.reason, int(mask.sum()), r.detail, ids[mask])
        keep = keep & known
        if not keep.any():
            return
        every = bool(keep.all())
        kept = rows if every else rows[keep]
        weights = (examples if every else examples[keep]).astype(np.float64)
        if factor != 1.0:
            kept = kept * np.asarray(factor, dtype=kept.dtype)
        try:
            self._run.fold(kept, weights)
        except UpdateRejected as exc:
            self._refuse(t.task.task_id, exc.reason, int(keep.sum()), exc.detail, ids[keep])
            return
        self._done_clients(t, ids[keep])
        self._tally.rows_folded(keep, examples, weights, metrics, staleness)
        self.observers.update_accepted(t.task.task_id, int(keep.sum()), staleness, self._now)

    def _fold_partial(self, t: _Task, item: PartialAggregate, factor: float,
                      staleness: int) -> None:
        task_id, covered = t.task.task_id, _clients_of(item)
        if covered is not None and not all(int(c) in t.pending for c in covered):
            # a group answers once for clients the task still waits for: never counted twice
            asked = set(t.asked.tolist())
            again = any(int(c) in asked and int(c) not in t.pending for c in covered)
            self._refuse(task_id, "duplicate" if again else "not_selected", 1,
                         "the group answers for clients that already reported or failed"
                         if again else "the group answers for clients not asked this task",
                         covered)
            return
        self._done_clients(t, covered)
        if item.num_examples <= 0 or item.clients < 1:
            self._refuse(task_id, "no_data", 1, "the group had no examples", covered)
            return
        row = np.asarray(item.delta)[np.newaxis] if isinstance(item.delta, np.ndarray) \
            else item.delta
        keep, refused = validate_rows(row, np.array([item.num_examples]),
                                      self.state.params.size, self.pipeline.validation)
        for r in refused:
            self._refuse(task_id, r.reason, 1, r.detail, covered)
        if not keep.all():
            return
        clip = item.clip_norm
        if factor != 1.0:
            row = row * np.asarray(factor, dtype=row.dtype)
            clip = None if clip is None else clip * factor  # what the scaled group promises
        try:
            self._run.fold_partial(row[0], float(item.num_examples), int(item.clients), clip)
        except UpdateRejected as exc:
            self._refuse(task_id, exc.reason, 1, exc.detail, covered)
            return
        self._tally.group_folded(int(item.clients), int(item.num_examples), item.metrics,
                                 staleness)
        self.observers.update_accepted(task_id, int(item.clients), staleness, self._now)


def _rows_of(item: object) -> int:
    if isinstance(item, UpdateBatch):
        return len(item.client_ids)
    return 1


def _clients_of(item: object) -> np.ndarray | None:
    if isinstance(item, UpdateBatch):
        return np.asarray(item.client_ids, np.int64)
    if isinstance(item, ClientUpdate):
        return np.array([item.client_id], np.int64)
    if isinstance(item, PartialAggregate) and item.client_ids is not None:
        return np.asarray(item.client_ids, np.int64)
    return None
