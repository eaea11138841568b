"""The in-memory registry's recent outcomes: a fixed block of ``history`` slots per device.

Only devices that reported get a block, so an idle device costs one int32 (its block number,
``-1``) and nothing else. Recording the outcomes of a cohort is a handful of vector operations
over the cohort's blocks -- O(cohort x history), whatever the population or the number of
rounds run so far -- which is what lets the simulator record every round's outcomes for
fairness-aware selection.

Rules (those of :meth:`~shoal.registry.Registry.record_outcome`): one outcome per device and
round; the same outcome again is a replay (not recorded); ``accepted`` is final for its round;
any other outcome is replaced by a later different one (a device refused once may upload
again, and a retried round may ask it again). A block keeps the ``history`` most recent
rounds: a new round evicts the oldest, and a round older than every kept one is counted but
not kept.
"""

from __future__ import annotations

import numpy as np

__all__ = ["OutcomeLog", "Recorded"]

_EMPTY = -1  # the round of an unused slot


class Recorded:
    """What :meth:`OutcomeLog.record` changed, one entry per recorded row.

    Attributes:
        changed: the row's outcome for the round is new or replaced an earlier one.
        counts: the change adds a participation (an ``accepted`` outcome that is new).
    """

    __slots__ = ("changed", "counts")

    def __init__(self, changed: np.ndarray, counts: np.ndarray) -> None:
        self.changed, self.counts = changed, counts


class OutcomeLog:
    """Recent outcomes of every device that reported (see the module docstring).

    Args:
        history: slots per device (the most recent rounds kept).
    """

    def __init__(self, history: int) -> None:
        self.history = history
        self.names: list[str] = ["accepted"]  # outcome code -> text; code 0 is "accepted"
        self._code_of: dict[str, int] = {"accepted": 0}
        self.block_of = np.zeros(0, dtype=np.int32)  # registry row -> block, -1 = none
        self._free: list[int] = []  # blocks of removed devices, reused first
        self._used = 0
        self.round = np.full((0, history), _EMPTY, dtype=np.int64)
        self.code = np.zeros((0, history), dtype=np.int32)
        self.ts = np.zeros((0, history), dtype=np.float64)

    # -- rows of the registry ------------------------------------------------------------

    def insert_rows(self, pos: np.ndarray) -> None:
        """New registry rows were inserted before the old rows ``pos`` (``np.insert``)."""
        self.block_of = np.insert(self.block_of, pos, np.full(pos.size, -1, np.int32))

    def delete_row(self, row: int) -> None:
        """Registry row ``row`` was removed: forget its outcomes."""
        block = int(self.block_of[row])
        if block >= 0:
            self.round[block] = _EMPTY
            self._free.append(block)
        self.block_of = np.delete(self.block_of, row)

    # -- outcomes ------------------------------------------------------------------------

    def _code(self, outcome: str) -> int:
        code = self._code_of.get(outcome)
        if code is None:
            code = self._code_of[outcome] = len(self.names)
            self.names.append(outcome)
        return code

    def of_row(self, row: int) -> list[tuple[int, str, float]]:
        """``(round, outcome, ts)`` of the row's kept outcomes, oldest round first."""
        block = int(self.block_of[row])
        if block < 0:
            return []
        keep = np.flatnonzero(self.round[block] != _EMPTY)
        keep = keep[np.argsort(self.round[block, keep])]
        return [(int(self.round[block, i]), self.names[int(self.code[block, i])],
                 float(self.ts[block, i])) for i in keep.tolist()]

    def record(self, rows: np.ndarray, round: int, outcome: str, now: float) -> Recorded:
        """Record ``outcome`` in ``round`` for ``rows`` (unique registry rows), vectorized.

        Returns which rows changed (see :class:`Recorded`); the caller adds the
        participations.
        """
        code = self._code(outcome)
        blocks = self._blocks(rows)
        kept = self.round[blocks]                                     # (k, history)
        hit = kept == round
        has = hit.any(axis=1)
        at = hit.argmax(axis=1)
        prev = self.code[blocks, at]
        # an outcome already kept for the round: a replay, final (accepted), or replaced
        replace = has & (prev != code) & (prev != 0)
        empty = kept == _EMPTY
        room = empty.any(axis=1)
        oldest = np.where(empty, np.iinfo(np.int64).max, kept).argmin(axis=1)
        newer = round > kept[np.arange(len(rows)), oldest]
        store = ~has & (room | newer)
        col = np.where(has, at, np.where(room, empty.argmax(axis=1), oldest))
        write = replace | store
        self.round[blocks[write], col[write]] = round
        self.code[blocks[write], col[write]] = code
        self.ts[blocks[write], col[write]] = now
        # a round older than every kept one is not kept, but it happened: it still counts
        changed = replace | ~has
        return Recorded(changed, changed & (code == 0))

    def _blocks(self, rows: np.ndarray) -> np.ndarray:
        """The rows' blocks, giving one to each row without."""
        blocks = self.block_of[rows].astype(np.int64)
        new = np.flatnonzero(blocks < 0)
        if new.size:
            reuse = [self._free.pop() for _ in range(min(len(self._free), new.size))]
            fresh = np.arange(self._used, self._used + new.size - len(reuse), dtype=np.int64)
            self._grow(self._used + fresh.size)
            self._used += fresh.size
            blocks[new] = np.concatenate((np.asarray(reuse, np.int64), fresh))
            self.block_of[rows[new]] = blocks[new]
        return blocks

    def _grow(self, need: int) -> None:
        have = self.round.shape[0]
        if need <= have:
            return
        extra = max(need, 2 * have, 16) - have
        self.round = np.concatenate((self.round, np.full((extra, self.history), _EMPTY,
                                                         np.int64)))
        self.code = np.concatenate((self.code, np.zeros((extra, self.history), np.int32)))
        self.ts = np.concatenate((self.ts, np.zeros((extra, self.history), np.float64)))

    @property
    def nbytes(self) -> int:
        return self.block_of.nbytes + self.round.nbytes + self.code.nbytes + self.ts.nbytes
