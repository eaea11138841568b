"""Populations too large to divide a dataset among: each client's data made on demand.

60,000 images cannot be split a million ways, so a generated population holds no data per
client at all: client ``c``'s examples are a function of ``(seed, c)``, drawn from the stream
``seeds.generator(seed, purpose, c)`` whenever it trains, identical every time. What stays in
memory is one int32 size per client (4 MB per million) and, for Fashion-MNIST, the shared
image pool.

* :class:`ResampledClients` -- a real labelled dataset (Fashion-MNIST) as an example pool.
  Client ``c`` has a class mix ``p_c ~ Dirichlet(alpha * 1)`` (the label skew of Hsu et al.,
  "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification", 2019, per client instead of per class) and draws its ``n_c`` examples
  *with replacement*: each label from ``p_c``, then an example of that label uniformly. Its
  examples are index arrays into the shared pool, so training reads the pool as for a
  partitioned dataset. Evaluation uses the real test set.
* :class:`SyntheticClients` -- Synthetic(α, β) of Li et al., "Federated Optimization in
  Heterogeneous Networks" (MLSys 2020), one user per client, with the per-user law of
  :mod:`shoal.data.synthetic` (``u_c ~ N(0, α²)``, ``B_c ~ N(0, β²)``, ``v_c ~ N(B_c, 1)``,
  ``W_c, b_c ~ N(u_c, 1)``, ``x ~ N(v_c, diag(j^-1.2))``, ``y = argmax(x W_c + b_c)``; the IID
  variant shares one ``W, b`` and has ``v_c = 0``). The central test set is 10,000 fresh
  examples of 1,000 clients drawn at random (their own ``W_c``, ``v_c``), so accuracy is
  measured on the population's distributions.

Client sizes follow one documented law for both: ``n_c = clip(round(median x exp(sigma x z_c)),
1, 20 x median)`` with ``z_c ~ N(0, 1)``. FedProx's own count law (``lognormal(4, 2) + 50``)
would give the largest of a million clients about a million examples: one client would take
longer to train than the rest of its cohort together.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from shoal import seeds
from shoal.data import Dataset
from shoal.data.partition import PartitionSummary, summarize_partition
from shoal.data.synthetic import DIMENSION, NUM_CLASSES
from shoal.errors import ConfigError, DataError

__all__ = ["GeneratedClients", "ResampledClients", "SyntheticClients", "client_sizes",
           "SIZE_CAP"]

#: the largest client holds at most this many times the median size
SIZE_CAP = 20
_TEST_CLIENTS = 1_000
_TEST_EXAMPLES_EACH = 10


def client_sizes(num_clients: int, median: int, sigma: float, seed: int) -> np.ndarray:
    """Every client's number of examples (int32), by the law in the module docstring.

    Raises:
        ConfigError: ``num_clients`` or ``median`` below 1, or ``sigma`` negative.
    """
    if num_clients < 1:
        raise ConfigError(f"data.clients must be >= 1, got {num_clients}", key="data.clients")
    if median < 1:
        raise ConfigError(f"data.client_examples must be >= 1, got {median}",
                          key="data.client_examples")
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"data.client_examples_sigma must be >= 0, got {sigma}",
                          key="data.client_examples_sigma")
    out = np.empty(num_clients, np.int32)
    rng = seeds.generator(seed, "client-sizes")
    step = 1 << 20  # in blocks: ten million float64 draws at once would take 80 MB
    for lo in range(0, num_clients, step):
        z = rng.standard_normal(min(step, num_clients - lo))
        out[lo:lo + z.size] = np.clip(np.rint(median * np.exp(sigma * z)), 1, SIZE_CAP * median)
    return out


class GeneratedClients(ABC):
    """A population whose clients' data is generated on demand (see the module docstring).

    Subclasses say how a client's examples are made; this class holds the sizes and answers
    what the pool asks.

    Attributes:
        train: the shared example pool (empty for Synthetic, whose clients own their data).
        test: the central test set.
        num_clients: the population size.
        seed: the data seed (``data.partition_seed``): the same for every run seed.
    """

    train: Dataset
    test: Dataset

    def __init__(self, num_clients: int, median: int, sigma: float, seed: int) -> None:
        self.seed = int(seed)
        self.sizes = client_sizes(num_clients, median, sigma, seed)

    @property
    def num_clients(self) -> int:
        return int(self.sizes.size)

    def sizes_of(self, client_ids: np.ndarray) -> np.ndarray:
        """Examples of each client (int64)."""
        return self.sizes[self._check(client_ids)].astype(np.int64)

    @abstractmethod
    def examples_of(self, client_ids: np.ndarray) -> tuple[Dataset | None, list[np.ndarray]]:
        """The clients' examples: a dataset they index into (``None``: the shared
        :attr:`train`) and one int64 index array per client."""

    def _check(self, client_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(client_ids, dtype=np.int64).reshape(-1)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.num_clients):
            raise DataError(f"client ids must lie in [0, {self.num_clients}), got "
                            f"{int(ids.min())}..{int(ids.max())}")
        return ids

    def summary(self, sample: int = 1_000) -> PartitionSummary:
        """Sizes and label histograms of the first ``sample`` clients."""
        ids = np.arange(min(sample, self.num_clients), dtype=np.int64)
        own, parts = self.examples_of(ids)
        labels = (own if own is not None else self.train).y
        return summarize_partition(parts, labels, self.train.num_classes)


class ResampledClients(GeneratedClients):
    """Clients drawing labelled examples with replacement from a shared pool, each with its
    own Dirichlet class mix (see the module docstring).

    Args:
        train: the example pool (Fashion-MNIST's training set).
        test: the central test set.
        num_clients, median, sigma: the population and its size law.
        alpha: Dirichlet concentration of the class mixes (0.5: the reference skew).
        seed: the data seed.

    Raises:
        ConfigError: ``alpha`` not > 0, or a bad size law.
        DataError: the pool has a class without examples.
    """

    def __init__(self, train: Dataset, test: Dataset, num_clients: int, *, median: int = 60,
                 sigma: float = 0.5, alpha: float = 0.5, seed: int = 0) -> None:
        if not (np.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"data.alpha must be > 0, got {alpha}", key="data.alpha")
        super().__init__(num_clients, median, sigma, seed)
        self.train, self.test, self.alpha = train, test, float(alpha)
        k = train.num_classes
        self._by_label = np.argsort(train.y, kind="stable").astype(np.int64)
        self._count = np.bincount(train.y, minlength=k).astype(np.int64)
        if (self._count == 0).any():
            raise DataError(f"class {int(np.flatnonzero(self._count == 0)[0])} has no example "
                            f"to draw from in {train.name or 'the pool'}")
        self._start = np.concatenate(([0], np.cumsum(self._count)[:-1]))

    def examples_of(self, client_ids: np.ndarray) -> tuple[None, list[np.ndarray]]:
        ids = self._check(client_ids)
        k = self.train.num_classes
        out = []
        for c, n in zip(ids.tolist(), self.sizes[ids].tolist()):
            rng = seeds.generator(self.seed, "client-data", c)
            mix = rng.dirichlet(np.full(k, self.alpha))
            if not np.isfinite(mix).all():  # alpha so small the draw underflows
                mix = np.eye(k)[int(rng.integers(k))]
            labels = rng.choice(k, size=n, p=mix / mix.sum())
            pos = self._start[labels] + (rng.random(n) * self._count[labels]).astype(np.int64)
            out.append(self._by_label[pos])
        return None, out


class SyntheticClients(GeneratedClients):
    """Synthetic(α, β) with one FedProx user per client (see the module docstring).

    Args:
        alpha, beta: the heterogeneity of the users' models and inputs (standard deviations).
        num_clients, median, sigma: the population and its size law.
        iid: the IID variant (one shared model, zero input means).
        seed: the data seed.

    Raises:
        ConfigError: α or β negative or not finite, or a bad size law.
    """

    def __init__(self, alpha: float, beta: float, num_clients: int, *, median: int = 60,
                 sigma: float = 0.5, iid: bool = False, seed: int = 0) -> None:
        for name, value in (("synthetic_alpha", alpha), ("synthetic_beta", beta)):
            if not (np.isfinite(value) and value >= 0):
                raise ConfigError(f"data.{name} must be >= 0, got {value}", key=f"data.{name}")
        super().__init__(num_clients, median, sigma, seed)
        self.alpha, self.beta, self.iid = float(alpha), float(beta), bool(iid)
        self._std = np.arange(1, DIMENSION + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
        if iid:
            rng = seeds.generator(seed, "synthetic-iid")
            self._shared = (rng.normal(0.0, 1.0, (DIMENSION, NUM_CLASSES)),
                            rng.normal(0.0, 1.0, NUM_CLASSES))
        name = "synthetic-iid" if iid else f"synthetic({alpha:g},{beta:g})"
        self.train = Dataset(np.zeros((0, DIMENSION), np.float32), np.zeros(0, np.int64),
                             NUM_CLASSES, f"{name}/generated")
        test_rng = seeds.generator(seed, "test-clients")
        who = np.sort(test_rng.choice(self.num_clients, min(_TEST_CLIENTS, self.num_clients),
                                      replace=False))
        self.test = self._make(who, [_TEST_EXAMPLES_EACH] * who.size, "client-test",
                               f"{name}/test")

    def _model(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Client ``c``'s input mean ``v_c``, weights ``W_c`` and bias ``b_c``."""
        if self.iid:
            return np.zeros(DIMENSION), *self._shared
        rng = seeds.generator(self.seed, "client-model", c)
        u, shift = rng.normal(0.0, self.alpha), rng.normal(0.0, self.beta)
        return (rng.normal(shift, 1.0, DIMENSION), rng.normal(u, 1.0, (DIMENSION, NUM_CLASSES)),
                rng.normal(u, 1.0, NUM_CLASSES))

    def _make(self, ids: np.ndarray, sizes: Sequence[int], purpose: str, name: str) -> Dataset:
        xs, ys = [], []
        for c, n in zip(ids.tolist(), sizes):
            mean, w, b = self._model(c)
            x = mean + seeds.generator(self.seed, purpose, c).standard_normal(
                (int(n), DIMENSION)) * self._std
            xs.append(x.astype(np.float32))
            ys.append(np.argmax(x @ w + b, axis=1).astype(np.int64))
        x = np.concatenate([np.zeros((0, DIMENSION), np.float32), *xs])
        y = np.concatenate([np.zeros(0, np.int64), *ys])
        return Dataset(x, y, NUM_CLASSES, name)

    def examples_of(self, client_ids: np.ndarray) -> tuple[Dataset, list[np.ndarray]]:
        ids = self._check(client_ids)
        sizes = self.sizes[ids].astype(np.int64)
        data = self._make(ids, sizes.tolist(), "client-examples", self.train.name)
        ranges = np.split(np.arange(int(sizes.sum()), dtype=np.int64), np.cumsum(sizes)[:-1])
        return data, ranges
