"""Datasets and their division into virtual clients.

A :class:`Dataset` is one pair of arrays in memory; a :class:`FederatedData` is a train and a
test :class:`Dataset` plus one int64 index array per virtual client. Clients are *views* of the
one shared training set by index, never copies, so a million virtual clients cost a million
small index arrays and nothing more.

Sources: :func:`load_fashion_mnist` (the reference workload's real data, read from IDX files)
and :func:`make_synthetic` (Synthetic(α, β) of the FedProx paper). Divisions:
:func:`partition` and the three methods behind it (IID, Dirichlet label skew, shards).
Populations too large to divide a dataset among (a million clients) generate each client's
data on demand instead: :class:`ResampledClients` and :class:`SyntheticClients`
(:mod:`shoal.data.population`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shoal.errors import DataError

__all__ = [
    "DEFAULT_FASHION_MNIST_PATH",
    "PARTITION_METHODS",
    "Dataset",
    "FederatedData",
    "GeneratedClients",
    "PartitionSummary",
    "ResampledClients",
    "SyntheticClients",
    "default_fashion_mnist_path",
    "load_fashion_mnist",
    "make_synthetic",
    "partition",
    "partition_dirichlet",
    "partition_fingerprint",
    "partition_iid",
    "partition_shards",
    "summarize_partition",
]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Examples and integer labels held in memory.

    Attributes:
        x: float32 features, shape ``(n, *feature_shape)``.
        y: int64 labels, shape ``(n,)``, each in ``[0, num_classes)``.
        num_classes: number of label values.
        name: a short human-readable name (``"fashion-mnist/train"``).

    Raises:
        DataError: on construction, if a dtype or shape is wrong, the lengths of ``x`` and
            ``y`` differ, or a label lies outside ``[0, num_classes)``.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str = ""

    def __post_init__(self) -> None:
        x, y = self.x, self.y
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 1:
            raise DataError(
                f"Dataset {self.name!r}: x must be a float32 array of shape (n, ...), "
                f"got {_describe(x)}"
            )
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
            raise DataError(
                f"Dataset {self.name!r}: y must be an int64 array of shape (n,), got {_describe(y)}"
            )
        if len(x) != len(y):
            raise DataError(
                f"Dataset {self.name!r}: x has {len(x)} examples but y has {len(y)} labels"
            )
        k = self.num_classes
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise DataError(f"Dataset {self.name!r}: num_classes must be an int, got {k!r}")
        if k < 1:
            raise DataError(f"Dataset {self.name!r}: num_classes must be >= 1, got {k}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise DataError(
                f"Dataset {self.name!r}: labels must lie in [0, {self.num_classes}), "
                f"found min {int(y.min())} and max {int(y.max())}"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one example (``(784,)`` or ``(1, 28, 28)`` for Fashion-MNIST)."""
        return tuple(self.x.shape[1:])


@dataclass(frozen=True, eq=False)
class FederatedData:
    """A training set divided into virtual clients by index, and a central test set.

    Attributes:
        train: the one shared training set.
        test: the central test set.
        client_indices: one int64 index array into ``train`` per client. Clients may be empty
            (a Dirichlet split with many clients leaves some with no examples).
        test_client_indices: optional per-client index arrays into ``test`` (datasets such as
            Synthetic(α, β) have a local test split per user); empty when there are none.

    Raises:
        DataError: on construction, if an index array is not 1-D int64 or points outside its
            dataset, or ``test_client_indices`` is given with a different number of clients.
    """

    train: Dataset
    test: Dataset
    client_indices: tuple[np.ndarray, ...]
    test_client_indices: tuple[np.ndarray, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "client_indices", tuple(self.client_indices))
        object.__setattr__(self, "test_client_indices", tuple(self.test_client_indices))
        _check_indices(self.client_indices, len(self.train), "client_indices")
        if self.test_client_indices:
            if len(self.test_client_indices) != len(self.client_indices):
                raise DataError(
                    f"test_client_indices has {len(self.test_client_indices)} clients but "
                    f"client_indices has {len(self.client_indices)}"
                )
            _check_indices(self.test_client_indices, len(self.test), "test_client_indices")

    @property
    def num_clients(self) -> int:
        """Number of virtual clients (including empty ones)."""
        return len(self.client_indices)

    def client_sizes(self) -> np.ndarray:
        """Number of training examples of each client, int64, shape ``(num_clients,)``."""
        return np.fromiter(
            (len(ix) for ix in self.client_indices), dtype=np.int64, count=self.num_clients
        )

    def summary(self) -> PartitionSummary:
        """Sizes and label histograms of the clients (see :func:`summarize_partition`)."""
        return summarize_partition(self.client_indices, self.train.y, self.train.num_classes)

    def sizes_of(self, client_ids: np.ndarray) -> np.ndarray:
        """Training examples of each of ``client_ids`` (int64)."""
        parts = self.client_indices
        return np.fromiter((len(parts[c]) for c in np.asarray(client_ids).tolist()), np.int64,
                           len(client_ids))

    def examples_of(self, client_ids: np.ndarray) -> tuple[None, list[np.ndarray]]:
        """The clients' index arrays into :attr:`train` (the ``None``: no dataset of their
        own), as a generated population (:mod:`shoal.data.population`) answers."""
        return None, [self.client_indices[c] for c in np.asarray(client_ids).tolist()]


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__


def _check_indices(parts: tuple[np.ndarray, ...], n: int, what: str) -> None:
    for c, ix in enumerate(parts):
        if not isinstance(ix, np.ndarray) or ix.dtype != np.int64 or ix.ndim != 1:
            raise DataError(f"{what}[{c}] must be a 1-D int64 array, got {_describe(ix)}")
    if not parts:
        return
    # One concatenation instead of a min/max per client: O(total) vectorized work.
    flat = np.concatenate(parts)
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= n):
        raise DataError(
            f"{what} must index into a dataset of {n} examples ([0, {n})), "
            f"found min {int(flat.min())} and max {int(flat.max())}"
        )


# The submodules import Dataset and FederatedData from this package, so they are imported
# only once both classes exist.
from shoal.data.fashion_mnist import (  # noqa: E402
    DEFAULT_FASHION_MNIST_PATH,
    default_fashion_mnist_path,
    load_fashion_mnist,
)
from shoal.data.partition import (  # noqa: E402
    PARTITION_METHODS,
    PartitionSummary,
    partition,
    partition_dirichlet,
    partition_fingerprint,
    partition_iid,
    partition_shards,
    summarize_partition,
)
from shoal.data.synthetic import make_synthetic  # noqa: E402
from shoal.data.population import (  # noqa: E402
    GeneratedClients,
    ResampledClients,
    SyntheticClients,
)
