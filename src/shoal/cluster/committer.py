"""The aggregator cluster's committer: the run's one coordinator, its carrier the ingest
nodes' partial aggregates through Redis.

:class:`ClusterCarrier` is a :class:`~shoal.runner.PushCarrier`, like the gRPC carrier, with
devices it never talks to: the coordinator's ``SendTask`` is published on the
:class:`~shoal.cluster.rounds.RoundBoard` (the cohort's device ids, the model, the deadline
on the wall clock), the ingest nodes serve it to whichever devices come to them, and each
node's partial aggregate (the weighted mean of the updates it folded and the devices inside)
reaches the coordinator as one :class:`~shoal.events.PartialAggregate` whose ``client_ids``
are those devices. The coordinator folds it like that many updates, counts each client once
(a group naming a client already answered for is refused), and its policy decides when the
round closes and whether it commits -- exactly as in one process. ``CancelTask`` closes the
task on the board (no node folds for it any more); timers are the coordinator's deadlines.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from shoal.cluster.rounds import Partial, RoundBoard
from shoal.coordinator import Coordinator
from shoal.events import (AbortRound, CancelTask, Command, CommitVersion, Finished,
                          PartialAggregate, SendTask, Tick, UpdateRefused, UpdatesArrived,
                          WakeAt)
from shoal.records import RoundRecord
from shoal.strategy import ServerState

__all__ = ["ClusterCarrier"]

log = logging.getLogger("shoal.cluster")


class ClusterCarrier:
    """The committer's carrier (see the module docstring).

    Args:
        board: the cluster's round state.
        devices: the enrolled device ids (client id ``i`` is the ``i``-th in sorted order).
        dim: the model's length.
        poll_s: the longest the loop waits for a partial between checks of the clock.
        clock: wall-clock seconds (the deadlines the ingest nodes read).
    """

    def __init__(self, board: RoundBoard, devices: Sequence[str], dim: int, *,
                 poll_s: float = 0.5, clock: Callable[[], float] = time.time) -> None:
        self.board = board
        self.devices = tuple(sorted(devices))
        self._index = {d: i for i, d in enumerate(self.devices)}
        self.dim = int(dim)
        self.poll_s = poll_s
        self.clock = clock
        self.refused: list[tuple[str, str, str]] = []  # (task, node, reason) of partials
        self._open = 0  # the task open on the board

    @property
    def num_clients(self) -> int:
        return len(self.devices)

    def run(self, coordinator: Coordinator, state: ServerState, *,
            stage_states: tuple | None = None,
            on_commit: Callable[[ServerState, RoundRecord], None] | None = None,
            on_abort: Callable[[RoundRecord, str, bool], None] | None = None) -> str:
        """Serve ``coordinator`` until it finishes; returns why.

        Raises:
            RegistryUnavailable: Redis went away (the versions committed before are intact;
                a restarted committer resumes from the store's latest).
        """
        self.board.reset()
        self._open = 0
        todo: deque[Command] = deque(coordinator.start(state, self.clock(), stage_states))
        timers: list[float] = []
        try:
            while True:
                while todo:
                    cmd = todo.popleft()
                    if isinstance(cmd, Finished):
                        return cmd.reason
                    self._carry(coordinator, cmd, timers, on_commit, on_abort)
                wake = timers[0] if timers else math.inf
                partial = self.board.pop_partial(min(self.poll_s, wake - self.clock()),
                                                 self.dim)
                if partial is not None:
                    todo.extend(self._arrived(coordinator, partial))
                if timers and timers[0] <= self.clock():
                    while timers and timers[0] <= self.clock():
                        heapq.heappop(timers)
                    todo.extend(coordinator.handle(Tick(self.clock())))
        finally:
            if self._open:
                self.board.close_task(self._open)

    def _carry(self, coordinator: Coordinator, cmd: Command, timers: list[float],
               on_commit: Callable[[ServerState, RoundRecord], None] | None,
               on_abort: Callable[[RoundRecord, str, bool], None] | None) -> None:
        if isinstance(cmd, SendTask):
            policy = coordinator.policy
            asked = len(cmd.client_ids)
            target = min(getattr(policy, "target", None) or asked, asked)
            self.board.open(cmd.task, [self.devices[int(c)] for c in cmd.client_ids], target)
            self._open = cmd.task.task_id
        elif isinstance(cmd, CancelTask):
            self.board.close_task(cmd.task_id)
        elif isinstance(cmd, WakeAt):
            if math.isfinite(cmd.at):
                heapq.heappush(timers, cmd.at)
        elif isinstance(cmd, CommitVersion):
            if on_commit is not None:
                on_commit(cmd.state, cmd.record)
        elif isinstance(cmd, AbortRound):
            if on_abort is not None:
                on_abort(cmd.record, cmd.reason, cmd.retry)
        elif isinstance(cmd, UpdateRefused):
            log.warning("task %d: a partial aggregate refused (%s): %s", cmd.task_id,
                        cmd.reason, cmd.detail)

    def _arrived(self, coordinator: Coordinator, p: Partial) -> list[Command]:
        run, _, task = p.task.rpartition(".")
        known = [self._index.get(d) for d in p.devices]
        reason = ("another run" if run != self.board.run or not task.isdigit() else
                  "no device" if not p.devices else "an unknown device" if None in known
                  else "")
        if reason:
            self.refused.append((p.task, p.node, reason))
            log.warning("task %s: node %s sent a partial aggregate of %s", p.task, p.node,
                        reason)
            return []
        task_id = int(task)
        arrival = PartialAggregate(
            delta=p.delta, num_examples=int(p.num_examples), clients=len(p.devices),
            metrics=dict(p.metrics), base_version=p.base_version,
            client_ids=np.asarray(sorted(c for c in known if c is not None), np.int64))
        cmds = coordinator.handle(UpdatesArrived(task_id, arrival, self.clock()))
        for c in cmds:
            if isinstance(c, UpdateRefused):
                self.refused.append((p.task, p.node, c.reason))
        return cmds

