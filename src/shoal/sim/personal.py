"""Virtual clients with private state: the simulator's pool for personalization.

:class:`PersonalPool` is a :class:`~shoal.runner.ClientPool` whose clients keep what is
theirs -- a head (FedPer, FedRep) or a personal model (Ditto) -- between the rounds they are
sampled for, and upload only the shared part (:func:`shoal.personalization.local_step`). The
coordinator that drives it holds the shared model alone: with FedPer and FedRep its
:class:`~shoal.strategy.ServerState` is the body, a task's ``params`` are the body, each
update is a body delta. Clients train one after another with the reference client
(:func:`shoal.training.train_local`), which has frozen tensors and a free proximal anchor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from shoal import seeds
from shoal.data import Dataset
from shoal.errors import ProtocolError
from shoal.events import TrainTask, UpdateBatch
from shoal.frameworks.torch import FlatModule
from shoal.personalization import HeadSplit, PersonalSettings, adapt, local_step
from shoal.training import LocalTrainConfig, evaluate

__all__ = ["PersonalPool"]


class PersonalPool:
    """Clients that keep a head or a personal model.

    Args:
        settings: the method.
        model: the model (its parameters are overwritten).
        initial: the whole initial model: every client's head (or personal model) starts
            from it.
        train: the shared training set; ``parts`` index each client's examples in it.
        config: local training of the shared model.
        seed: client ``c`` of round ``r`` uses stream ``(seed, "train", r, c)``.
        split: body and head (default: the last layer is the head).
    """

    def __init__(self, settings: PersonalSettings, model: FlatModule, initial: np.ndarray,
                 train: Dataset, parts: Sequence[np.ndarray], config: LocalTrainConfig,
                 seed: int, split: HeadSplit | None = None) -> None:
        self.settings = settings
        self.model = model
        self.split = split or HeadSplit(model.spec)
        self.x = torch.from_numpy(train.x)
        self.y = torch.from_numpy(np.asarray(train.y, np.int64))
        self.parts = [np.asarray(p, np.int64) for p in parts]
        self.config = config
        self.seed = seed
        m = settings.method
        own0 = None if m == "fedavg" else (initial.copy() if m == "ditto"
                                           else self.split.head(initial))
        #: each client's private state (None for FedAvg)
        self.own: list[np.ndarray | None] = [None if own0 is None else own0.copy()
                                             for _ in self.parts]

    @property
    def num_clients(self) -> int:
        return len(self.parts)

    @property
    def shared_size(self) -> int:
        """Length of the vector the server holds and aggregates."""
        return self.split.body_size if self.settings.method in ("fedper", "fedrep") \
            else self.split.spec.size

    def train(self, task: TrainTask, client_ids: np.ndarray) -> Iterator[UpdateBatch]:
        ids = np.asarray(client_ids, np.int64)
        if task.params.size != self.shared_size:
            raise ProtocolError(f"a {self.settings.method} task carries the shared model "
                                f"({self.shared_size} values), got {task.params.size}")
        config = self.config.with_overrides(task.settings)
        deltas = np.empty((len(ids), self.shared_size), np.float32)
        loss = np.empty(len(ids))
        for i, c in enumerate(ids.tolist()):
            idx = torch.from_numpy(self.parts[c])
            step = local_step(self.settings, self.model, self.split, task.params, self.own[c],
                              self.x[idx], self.y[idx], config,
                              seeds.generator(self.seed, "train", task.round, c))
            deltas[i], loss[i] = step.delta, step.loss
            self.own[c] = step.own
        sizes = np.array([len(self.parts[c]) for c in ids.tolist()], np.int64)
        yield UpdateBatch(ids, deltas, sizes, {"loss": loss}, base_version=task.version)

    def personal_model(self, client: int, final: np.ndarray, finetune_epochs: int = 0
                       ) -> np.ndarray:
        """The whole model ``client`` uses after training (see
        :func:`shoal.personalization.adapt`); its state is not changed."""
        idx = torch.from_numpy(self.parts[client])
        return adapt(self.settings, self.model, self.split, final, self.own[client],
                     self.x[idx], self.y[idx], self.config,
                     seeds.generator(self.seed, "adapt", client), finetune_epochs)

    def client_accuracy(self, final: np.ndarray, test: Dataset,
                        test_parts: Sequence[np.ndarray], finetune_epochs: int = 0
                        ) -> np.ndarray:
        """Each client's accuracy on its own test split with the model it uses."""
        xt = torch.from_numpy(test.x)
        yt = torch.from_numpy(np.asarray(test.y, np.int64))
        acc = np.empty(self.num_clients)
        for c in range(self.num_clients):
            params = self.personal_model(c, final, finetune_epochs)
            idx = torch.from_numpy(np.asarray(test_parts[c], np.int64))
            acc[c] = evaluate(self.model, params, xt[idx], yt[idx])["accuracy"]
        return acc
