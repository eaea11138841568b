"""The personalization benchmark: FedAvg, fine-tuned FedAvg, FedPer, FedRep and Ditto on a
population where every client holds exactly two classes, each evaluated per client on the
client's own test split.

The split (:func:`two_class_split`): client ``c`` holds classes ``a = c mod C`` and
``b = (a + 1 + (c div C) mod (C - 1)) mod C``, so each class has ``2n / C`` holders; every
class's training images and test images are shuffled and dealt evenly among its holders. A
client's test split thus has the label mix of its training data (the regime of Collins et
al. 2021).

Every method runs on the real :class:`~shoal.coordinator.Coordinator` over a
:class:`~shoal.sim.personal.PersonalPool` (uniform cohorts, FedAvg aggregation of the shared
vector); after the last round each client adapts locally once (fine-tuning, its head on the
final body, or one more Ditto step) and is evaluated on its test split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from shoal import seeds
from shoal.clock import SimClock
from shoal.coordinator import Coordinator
from shoal.data import Dataset
from shoal.frameworks.torch import FlatModule
from shoal.models import build_model
from shoal.personalization import HeadSplit, PersonalSettings
from shoal.runner import drive
from shoal.sampling import UniformSampler
from shoal.sim.personal import PersonalPool
from shoal.strategy import FedAvg, ServerState
from shoal.training import LocalTrainConfig

__all__ = ["PersonalResult", "run_personalized", "two_class_split"]


def two_class_split(train_y: np.ndarray, test_y: np.ndarray, num_clients: int,
                    num_classes: int, seed: int
                    ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Train and test index arrays per client, two classes each (see the module docstring),
    and the ``(n, 2)`` classes of each client.

    Raises:
        ValueError: ``2 * num_clients`` is not a multiple of ``num_classes``, or there are
            fewer than 3 classes.
    """
    if num_classes < 3 or (2 * num_clients) % num_classes:
        raise ValueError("two classes per client needs 2 * clients divisible by the number "
                         "of classes (>= 3)")
    c = np.arange(num_clients)
    a = c % num_classes
    b = (a + 1 + (c // num_classes) % (num_classes - 1)) % num_classes
    classes = np.stack([a, b], axis=1)
    rng = seeds.generator(seed, "two-class-split")
    train_parts: list[list[np.ndarray]] = [[] for _ in c]
    test_parts: list[list[np.ndarray]] = [[] for _ in c]
    for k in range(num_classes):
        holders = np.flatnonzero((classes == k).any(axis=1))
        for y, parts in ((train_y, train_parts), (test_y, test_parts)):
            idx = rng.permutation(np.flatnonzero(y == k))
            for h, chunk in zip(holders, np.array_split(idx, len(holders))):
                parts[h].append(chunk)
    return ([np.sort(np.concatenate(p)).astype(np.int64) for p in train_parts],
            [np.sort(np.concatenate(p)).astype(np.int64) for p in test_parts], classes)


@dataclass(frozen=True)
class PersonalResult:
    """Per-client test accuracy of one method.

    Attributes:
        name: the method as reported (``fedavg``, ``fedavg-ft``, ``fedper``, ...).
        accuracy: ``(n,)`` each client's accuracy on its own test split.
        shared_size: the length of the vector the server aggregated.
        seconds: wall time of training and evaluation.
    """

    name: str
    accuracy: np.ndarray
    shared_size: int
    seconds: float


def run_personalized(settings: PersonalSettings, train: Dataset, test: Dataset,
                     parts: list[np.ndarray], test_parts: list[np.ndarray], *, rounds: int,
                     per_round: int, seed: int, config: LocalTrainConfig,
                     model: str = "mlp2nn", finetune_epochs: tuple[int, ...] = (0,)
                     ) -> list[PersonalResult]:
    """Train ``settings.method`` federatedly and evaluate every client.

    For ``fedavg``, one result per entry of ``finetune_epochs`` (0: the global model as is,
    named ``fedavg``; e: fine-tuned e epochs, named ``fedavg-ft<e>``), all from one
    training run; other methods give one result.
    """
    t0 = time.perf_counter()
    in_features = int(np.prod(train.x.shape[1:]))
    flat = FlatModule(build_model(model, in_features, train.num_classes, seed))
    initial = flat.get()
    split = HeadSplit(flat.spec)
    pool = PersonalPool(settings, flat, initial, train, parts, config, seed, split)
    shared0 = split.body(initial) if pool.shared_size == split.body_size else initial
    coordinator = Coordinator(FedAvg(), len(parts), UniformSampler(per_round), seed=seed,
                              steps=rounds)
    final: list[np.ndarray] = [shared0]
    drive(coordinator, pool, ServerState(shared0.copy()), SimClock(),
          on_commit=lambda state, record: final.__setitem__(0, state.params))
    trained = time.perf_counter() - t0
    out = []
    epochs = finetune_epochs if settings.method == "fedavg" else (0,)
    for e in epochs:
        t1 = time.perf_counter()
        acc = pool.client_accuracy(final[0], test, test_parts, e)
        name = settings.method if settings.method != "fedavg" or e == 0 else f"fedavg-ft{e}"
        out.append(PersonalResult(name, acc, pool.shared_size,
                                  trained + time.perf_counter() - t1))
    return out
