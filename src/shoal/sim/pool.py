"""The in-process client pool: virtual clients that are index arrays into one dataset.

It trains a round's cohort with :class:`~shoal.sim.cohort.CohortTrainer`, in chunks of
clients with similar numbers of local steps so the stacked models stay cache-sized and the
padding waste stays small, and yields each chunk's updates as one
:class:`~shoal.events.UpdateBatch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

import torch

from shoal import seeds
from shoal.codec import Chain
from shoal.config import Config
from shoal.data import FederatedData
from shoal.events import TrainTask, UpdateBatch
from shoal.sim.cohort import CohortTrainer
from shoal.training import LocalTrainConfig
from shoal.uplink import Downlink, Uplink

__all__ = ["InProcessPool", "auto_chunk", "in_process_pool"]


def auto_chunk(model_size: int, budget_bytes: int = 96 << 20) -> int:
    """Clients per stacked chunk so the chunk's float32 models take about ``budget_bytes``.

    Larger chunks mean larger batched matmuls and fewer passes; the budget bounds memory
    (the stacked models and the chunk's (k, D) update matrix each take about this much).
    Measured on config L (2NN, 100 clients per round): chunks of 100 clients ran 1.5x faster
    than chunks of 31 and 2x faster than chunks of 16.
    """
    return max(4, budget_bytes // max(1, 4 * model_size))


class InProcessPool:
    """Virtual clients trained in this process.

    Args:
        trainer: the cohort trainer (model + shared training set).
        client_indices: per client id, its example ids in the shared training set.
        config: local training settings; a task's ``settings`` override them per round.
        seed: the run seed; client ``c`` in round ``r`` uses stream ``(seed, "train", r, c)``.
        chunk: clients trained together at most; 0 = :func:`auto_chunk`.
        uplink: what clients do to updates before upload (local DP, compression); by
            default raw float32.
        downlink: how models reach clients (full or delta); by default full float32.
    """

    def __init__(self, trainer: CohortTrainer, client_indices: Sequence[np.ndarray],
                 config: LocalTrainConfig, seed: int, chunk: int = 0,
                 uplink: Uplink | None = None, downlink: Downlink | None = None) -> None:
        self.trainer = trainer
        self.client_indices = list(client_indices)
        self.config = config
        self.seed = seed
        self.chunk = chunk or auto_chunk(trainer.spec.size)
        self.uplink = uplink or Uplink(trainer.spec.size)
        self.downlink = downlink or Downlink(trainer.spec.size)

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    def train(self, task: TrainTask, client_ids: np.ndarray) -> Iterator[UpdateBatch]:
        config = self.config.with_overrides(task.settings)
        ids = np.asarray(client_ids, dtype=np.int64)
        sizes = np.array([len(self.client_indices[c]) for c in ids], dtype=np.int64)
        # Longest first, so each chunk holds clients with similar step counts.
        ids = ids[np.argsort(-sizes, kind="stable")]
        down = self.downlink.send(task.version, task.params, ids)
        for start in range(0, len(ids), self.chunk):
            part = ids[start:start + self.chunk]
            rngs = [seeds.generator(self.seed, "train", task.round, int(c)) for c in part]
            res = self.trainer.train(task.params, [self.client_indices[c] for c in part],
                                     config, rngs)
            rows = part[res.positions]
            rngs_up = [] if self.uplink.identity else [
                seeds.generator(self.seed, "uplink", task.round, int(c)) for c in rows]
            deltas, up = self.uplink.process_rows(rows, res.deltas, rngs_up)
            yield UpdateBatch(client_ids=rows, deltas=deltas, num_examples=res.num_examples,
                              metrics={"loss": res.loss, "upload_bytes": up,
                                       "download_bytes": down[start:start + self.chunk]
                                       [res.positions]}, base_version=task.version)


def in_process_pool(cfg: Config, model: torch.nn.Module, data: FederatedData, dim: int,
                    local_dp=None) -> tuple[InProcessPool, str]:
    """The virtual clients of ``cfg`` (training, compression, local DP) and the name of the
    cohort engine they train with."""
    train = data.train
    trainer = CohortTrainer(model, torch.from_numpy(train.x), torch.from_numpy(train.y),
                            engine=cfg["sim"]["engine"])
    local = LocalTrainConfig(epochs=cfg["client"]["epochs"],
                             batch_size=cfg["client"]["batch_size"], lr=cfg["client"]["lr"])
    comp = cfg["compression"]
    uplink = Uplink(dim, Chain.parse(comp["upload"]), comp["error_feedback"], local_dp)
    downlink = Downlink(dim, comp["download"],
                        Chain.parse(comp["download_codec"], "compression.download_codec"),
                        comp["max_staleness"])
    pool = InProcessPool(trainer, data.client_indices, local, seed=cfg.seed, uplink=uplink,
                         downlink=downlink)
    return pool, trainer.engine
