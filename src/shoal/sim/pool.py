"""The in-process client pool: virtual clients that are index arrays into one dataset.

It trains a round's cohort with :class:`~shoal.sim.cohort.CohortTrainer`, in chunks of
clients with similar numbers of local steps so the stacked models stay cache-sized and the
padding waste stays small, and yields each chunk's updates as one
:class:`~shoal.events.UpdateBatch`.

Who trains the chunks is the pool's :class:`Workers`: :class:`LocalWorkers` in this process
(the default), or Ray actors (:class:`~shoal.sim.ray_backend.RayWorkers`,
``sim.backend = "ray"``), which train slices of the cohort with the same
:func:`train_chunk` and hand the rows back. Everything else -- which clients, their random
streams, downloads, what the uplink does to an update -- stays here, so both give the same
updates.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from shoal import seeds
from shoal.codec import Chain
from shoal.config import Config
from shoal.data import Dataset, FederatedData, GeneratedClients
from shoal.errors import ProtocolError
from shoal.privacy.dp import LocalDP
from shoal.events import TrainTask, UpdateBatch
from shoal.sim.cohort import CohortResult, CohortTrainer
from shoal.training import LocalTrainConfig
from shoal.uplink import Downlink, Uplink, raw_wire_size

__all__ = ["ClientData", "InProcessPool", "LocalWorkers", "Trained", "Workers", "auto_chunk",
           "in_process_pool", "train_chunk"]


def auto_chunk(model_size: int, budget_bytes: int = 96 << 20) -> int:
    """Clients per stacked chunk so the chunk's float32 models take about ``budget_bytes``.

    Larger chunks mean larger batched matmuls and fewer passes; the budget bounds memory
    (the stacked models and the chunk's (k, D) update matrix each take about this much).
    Measured on config L (2NN, 100 clients per round): chunks of 100 clients ran 1.5x faster
    than chunks of 31 and 2x faster than chunks of 16.
    """
    return max(4, budget_bytes // max(1, 4 * model_size))


class ClientData(Protocol):
    """Where the pool finds a client's examples: a partitioned dataset
    (:class:`~shoal.data.FederatedData`) or a generated population
    (:class:`~shoal.data.GeneratedClients`)."""

    @property
    def num_clients(self) -> int: ...

    def sizes_of(self, client_ids: np.ndarray) -> np.ndarray: ...

    def examples_of(self, client_ids: np.ndarray) -> tuple[Dataset | None,
                                                           Sequence[np.ndarray]]: ...


class _IndexLists:
    """Plain index arrays into the trainer's dataset, one per client."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = list(parts)

    @property
    def num_clients(self) -> int:
        return len(self.parts)

    def sizes_of(self, client_ids: np.ndarray) -> np.ndarray:
        return np.fromiter((len(self.parts[c]) for c in np.asarray(client_ids).tolist()),
                           np.int64, len(client_ids))

    def examples_of(self, client_ids: np.ndarray) -> tuple[None, list[np.ndarray]]:
        return None, [self.parts[c] for c in np.asarray(client_ids).tolist()]


@dataclass(frozen=True)
class Trained:
    """The updates of some of the clients a :class:`Workers` was asked to train.

    Attributes:
        index: int64 ``(k,)``, per row the client's position in the ids given to
            :meth:`Workers.train`.
        deltas: float32 ``(k, D)`` (possibly a buffer reused by the next chunk: fold or copy
            it first).
        num_examples: int64 ``(k,)``.
        loss: float64 ``(k,)`` mean local training loss.
    """

    index: np.ndarray
    deltas: np.ndarray
    num_examples: np.ndarray
    loss: np.ndarray


class Workers(Protocol):
    """Who trains a pool's clients: this process (:class:`LocalWorkers`) or Ray actors."""

    @property
    def chunk(self) -> int:
        """Clients worth handing over at once (the carrier loop groups due clients by it)."""
        ...

    def train(self, params: np.ndarray, config: LocalTrainConfig, client_ids: np.ndarray,
              keys: np.ndarray) -> Iterator[Trained]:
        """Train client ``client_ids[i]`` from ``params`` with stream key ``keys[i]``
        (clients sorted by size, longest first); yields every client's row once."""
        ...


def train_chunk(trainer: CohortTrainer, clients: ClientData, seed: int, params: np.ndarray,
                config: LocalTrainConfig, client_ids: np.ndarray, keys: np.ndarray
                ) -> CohortResult:
    """Train one chunk of clients together: client ``c`` of key ``r`` draws its batches from
    stream ``(seed, "train", r, c)``, wherever it is trained."""
    rngs = [seeds.generator(seed, "train", int(r), int(c)) for r, c in zip(keys, client_ids)]
    own, indices = clients.examples_of(client_ids)
    source = None if own is None else (torch.from_numpy(own.x), torch.from_numpy(own.y))
    return trainer.train(params, indices, config, rngs, source=source)


class LocalWorkers:
    """Trains in this process, ``chunk`` clients at a time (:func:`train_chunk`)."""

    def __init__(self, trainer: CohortTrainer, clients: ClientData, seed: int,
                 chunk: int) -> None:
        self.trainer, self.clients, self.seed, self.chunk = trainer, clients, seed, chunk

    def train(self, params: np.ndarray, config: LocalTrainConfig, client_ids: np.ndarray,
              keys: np.ndarray) -> Iterator[Trained]:
        for start in range(0, len(client_ids), self.chunk):
            part = slice(start, start + self.chunk)
            res = train_chunk(self.trainer, self.clients, self.seed, params, config,
                              client_ids[part], keys[part])
            yield Trained(start + res.positions, res.deltas, res.num_examples, res.loss)


class InProcessPool:
    """Virtual clients trained in this process.

    Args:
        trainer: the cohort trainer (model + shared training set).
        clients: per client id, its example ids in the shared training set; or a
            :class:`ClientData` (a partitioned or a generated population).
        config: local training settings; a task's ``settings`` override them per round.
        seed: the run seed; client ``c`` of a task keyed ``r`` (the round of a sync task,
            the task id of a buffered one) uses stream ``(seed, "train", r, c)``.
        chunk: clients trained together at most; 0 = :func:`auto_chunk`.
        uplink: what clients do to updates before upload (local DP, compression); by
            default raw float32.
        downlink: how models reach clients (full or delta); by default full float32.
        workers: who trains the chunks; by default this process (:class:`LocalWorkers`).

    It is a :class:`~shoal.runner.LazyPool`: under simulated time the carrier loop asks for
    a client's update only when it is due, and has clients of one version trained together
    (:meth:`train_group`).
    """

    def __init__(self, trainer: CohortTrainer, clients: Sequence[np.ndarray] | ClientData,
                 config: LocalTrainConfig, seed: int, chunk: int = 0,
                 uplink: Uplink | None = None, downlink: Downlink | None = None,
                 workers: Workers | None = None) -> None:
        self.trainer = trainer
        self.clients: ClientData = _IndexLists(clients) if isinstance(clients, Sequence) \
            else clients
        self.config = config
        self.seed = seed
        self.workers: Workers = workers or LocalWorkers(
            trainer, self.clients, seed, chunk or auto_chunk(trainer.spec.size))
        self.uplink = uplink or Uplink(trainer.spec.size)
        self.downlink = downlink or Downlink(trainer.spec.size)
        self._raw_up = raw_wire_size(trainer.spec.size)

    @property
    def num_clients(self) -> int:
        return self.clients.num_clients

    @property
    def chunk(self) -> int:
        """Clients trained together at most (what the workers take at once)."""
        return self.workers.chunk

    def close(self) -> None:
        """Release the workers (Ray actors); in-process workers hold nothing."""
        close = getattr(self.workers, "close", None)
        if close is not None:
            close()

    def example_counts(self, client_ids: np.ndarray) -> np.ndarray:
        """Training examples of each client (int64)."""
        return self.clients.sizes_of(np.asarray(client_ids, np.int64))

    def download(self, task: TrainTask, client_ids: np.ndarray) -> np.ndarray:
        """Bytes each client downloads to get ``task``'s model; records that they synced."""
        return self.downlink.send(task.version, task.params, np.asarray(client_ids, np.int64))

    def upload_bytes(self, client_ids: np.ndarray) -> np.ndarray | None:
        """Raw float32 updates have one size, known before training; an encoding chain (or
        local DP) makes it depend on the update: ``None``."""
        if not self.uplink.identity:
            return None
        return np.full(len(client_ids), self._raw_up, np.int64)

    def train(self, task: TrainTask, client_ids: np.ndarray) -> Iterator[UpdateBatch]:
        ids = np.asarray(client_ids, dtype=np.int64)
        return self.train_group([task] * len(ids), ids, self.download(task, ids))

    def train_group(self, tasks: Sequence[TrainTask], client_ids: np.ndarray,
                    download_bytes: np.ndarray) -> Iterator[UpdateBatch]:
        """Train client ``client_ids[i]`` for ``tasks[i]``; all tasks share one version
        (the same model and settings). Yields the updates chunk by chunk, with
        ``download_bytes`` (per client, as given) among their metrics.

        Raises:
            ProtocolError: the tasks are of different versions.
        """
        ids = np.asarray(client_ids, dtype=np.int64)
        if not len(ids):
            return
        task = tasks[0]
        if any(t.version != task.version for t in tasks):
            raise ProtocolError("clients trained together must share one model version")
        config = self.config.with_overrides(task.settings)
        keys = np.array([t.round for t in tasks], np.int64)
        down = np.asarray(download_bytes, np.int64)
        # Longest first, so each chunk holds clients with similar step counts.
        order = np.argsort(-self.clients.sizes_of(ids), kind="stable")
        ids, keys, down = ids[order], keys[order], down[order]
        for t in self.workers.train(task.params, config, ids, keys):
            rows, row_keys = ids[t.index], keys[t.index]
            rngs_up = [] if self.uplink.identity else [
                seeds.generator(self.seed, "uplink", int(r), int(c))
                for r, c in zip(row_keys, rows)]
            deltas, up = self.uplink.process_rows(rows, t.deltas, rngs_up)
            yield UpdateBatch(client_ids=rows, deltas=deltas, num_examples=t.num_examples,
                              metrics={"loss": t.loss, "upload_bytes": up,
                                       "download_bytes": down[t.index]},
                              base_version=task.version)


def in_process_pool(cfg: Config, model: torch.nn.Module,
                    data: FederatedData | GeneratedClients, dim: int,
                    local_dp: LocalDP | None = None) -> tuple[InProcessPool, str]:
    """The virtual clients of ``cfg`` (training, compression, local DP, trained in this
    process or by Ray actors) and the name of the cohort engine they train with."""
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
    workers = None
    if cfg["sim"]["backend"] == "ray":
        from shoal.sim.ray_backend import RayWorkers

        workers = RayWorkers.from_config(cfg, trainer, data)
    pool = InProcessPool(trainer, data, local, seed=cfg.seed, uplink=uplink,
                         downlink=downlink, workers=workers)
    return pool, trainer.engine
