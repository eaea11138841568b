"""What the hierarchy tests watch: the device pool under a tier, recording every task it
trains (the tier's tasks reach the devices through it unchanged)."""

from __future__ import annotations

import numpy as np


class TrainedTasks:
    """The devices, recording each task's (version, model, round key, clients) as it is
    trained."""

    def __init__(self, below) -> None:
        self.below = below
        self.tasks: list[tuple[int, np.ndarray, int, tuple[int, ...]]] = []

    @property
    def num_clients(self) -> int:
        return self.below.num_clients

    def train(self, task, client_ids):
        ids = tuple(int(c) for c in np.asarray(client_ids).tolist())
        self.tasks.append((task.version, np.array(task.params, copy=True), task.round, ids))
        yield from self.below.train(task, client_ids)

    def count(self) -> dict[tuple[int, int], int]:
        """How often each client trained under each round key: ``(key, client) -> n``."""
        out: dict[tuple[int, int], int] = {}
        for _, _, key, ids in self.tasks:
            for c in ids:
                out[key, c] = out.get((key, c), 0) + 1
        return out
