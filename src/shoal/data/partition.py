"""Dividing one dataset among virtual clients.

Three methods, each returning one int64 index array per client (clients are views of one
shared dataset by index):

* ``"iid"``: a uniformly random split into near-equal parts.
* ``"dirichlet"``: label skew after Hsu, Qi and Brown, "Measuring the Effects of Non-Identical
  Data Distribution for Federated Visual Classification" (2019): each class is divided among
  the clients in proportions drawn from Dir(α·1). The procedure is fixed exactly (see
  :func:`partition_dirichlet`) so that splits compare one-to-one with other frameworks.
* ``"shards"``: the pathological non-IID split of McMahan et al., "Communication-Efficient
  Learning of Deep Networks from Decentralized Data" (AISTATS 2017): sort by label, cut into
  equal shards, give each client a few random shards.

All methods are vectorized: one grouping pass over the examples, no Python loop over examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shoal.errors import ConfigError, DataError

__all__ = [
    "PARTITION_METHODS",
    "PartitionSummary",
    "partition",
    "partition_dirichlet",
    "partition_fingerprint",
    "partition_iid",
    "partition_shards",
    "summarize_partition",
]

PARTITION_METHODS = ("iid", "dirichlet", "shards")


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Divide a labelled dataset among ``num_clients`` clients by ``method``.

    Args:
        labels: int labels of the dataset, shape ``(n,)``.
        num_clients: number of clients, >= 1.
        method: one of :data:`PARTITION_METHODS`.
        alpha: Dirichlet concentration, > 0 (``"dirichlet"`` only).
        shards_per_client: shards per client, >= 1 (``"shards"`` only).
        seed: the seed. ``"dirichlet"`` feeds it to ``np.random.RandomState`` (the fixed
            reference procedure); ``"iid"`` and ``"shards"`` to ``np.random.default_rng``.

    Returns:
        One int64 index array per client; every example appears in exactly one of them.

    Raises:
        ConfigError: unknown method, or a value out of range (``key`` names the setting).
        DataError: ``labels`` is not a 1-D array of non-negative integers.
    """
    if method == "iid":
        _check_labels(labels)
        return partition_iid(len(labels), num_clients, np.random.default_rng(seed))
    if method == "dirichlet":
        return partition_dirichlet(labels, num_clients, alpha, seed)
    if method == "shards":
        return partition_shards(
            labels, num_clients, shards_per_client, rng=np.random.default_rng(seed)
        )
    raise ConfigError(
        f"unknown partition method {method!r}; expected one of {', '.join(PARTITION_METHODS)}",
        key="data.partition",
    )


def partition_iid(
    num_examples: int, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split ``range(num_examples)`` uniformly at random into ``num_clients`` parts.

    Part sizes differ by at most one (the first ``num_examples % num_clients`` clients get the
    extra example); with more clients than examples some parts are empty. Indices within a
    part are sorted ascending (better memory locality when gathering a client's batch).

    Raises:
        ConfigError: ``num_clients < 1`` or ``num_examples < 0``.
    """
    _check_num_clients(num_clients)
    if num_examples < 0:
        raise ConfigError(f"num_examples must be >= 0, got {num_examples}", key="num_examples")
    q, r = divmod(num_examples, num_clients)
    sizes = np.full(num_clients, q, dtype=np.int64)
    sizes[:r] += 1
    client_of = np.empty(num_examples, dtype=np.int64)
    client_of[rng.permutation(num_examples)] = np.repeat(np.arange(num_clients), sizes)
    return _group(client_of, num_clients)


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    *,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Dirichlet label-skew split (Hsu et al. 2019), by exactly this reference procedure::

        rng = np.random.RandomState(seed)
        for k in range(K):                       # classes in order
            idx_k = np.where(labels == k)[0]
            rng.shuffle(idx_k)
            p = rng.dirichlet([alpha] * N)
            cuts = (np.cumsum(p) * len(idx_k)).astype(int)[:-1]
            client c appends np.split(idx_k, cuts)[c]

    No resampling and no balancing: with many clients or a small α, some clients receive no
    example at all. They are kept as empty arrays (the simulator skips empty clients), so the
    client numbering and the fingerprint match other implementations of the procedure.

    The reference procedure's random stream is reproduced draw for draw; the splitting itself
    is vectorized (one stable argsort over all examples instead of ``K × N`` array splits).

    Args:
        labels: int labels, shape ``(n,)``.
        num_clients: N >= 1.
        alpha: concentration α > 0; small α means strong skew.
        seed: seed of the ``RandomState``.
        num_classes: K; defaults to ``labels.max() + 1``. A class with no example still
            consumes its two draws, so K matters for the result.

    Returns:
        N int64 arrays; client c's array is its class-0 part, then its class-1 part, ...

    Raises:
        ConfigError: N < 1, α <= 0 or so small that the Dirichlet draw is not finite, or K too
            small for the labels.
        DataError: ``labels`` is not a 1-D array of non-negative integers.
    """
    _check_labels(labels)
    _check_num_clients(num_clients)
    if not isinstance(alpha, (int, float, np.integer, np.floating)) or isinstance(alpha, bool):
        raise ConfigError(f"dirichlet alpha must be a number, got {alpha!r}", key="data.alpha")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"dirichlet alpha must be > 0, got {alpha}", key="data.alpha")
    labels = np.asarray(labels).astype(np.int64, copy=False)
    K = _num_classes(labels, num_classes)
    rng = np.random.RandomState(seed)
    order = np.argsort(labels, kind="stable")
    class_ends = np.cumsum(np.bincount(labels, minlength=K))
    # `order` grouped by class, each group in ascending index order == np.where(labels == k)[0].
    shuffled = np.empty(len(labels), dtype=np.int64)
    client_of = np.empty(len(labels), dtype=np.int64)
    start = 0
    for k in range(K):  # a loop over classes, as the reference draws per class
        end = int(class_ends[k])
        idx_k = order[start:end].astype(np.int64)
        rng.shuffle(idx_k)
        p = rng.dirichlet([alpha] * num_clients)
        if not np.all(np.isfinite(p)):
            raise ConfigError(
                f"dirichlet alpha {alpha} is too small: the Dirichlet draw for class {k} is not "
                "finite",
                key="data.alpha",
            )
        n_k = end - start
        cuts = (np.cumsum(p) * n_k).astype(int)[:-1]
        shuffled[start:end] = idx_k
        # Position i of the shuffled class belongs to np.split's segment #{cuts <= i}.
        client_of[start:end] = np.searchsorted(cuts, np.arange(n_k), side="right")
        start = end
    # Stable grouping by client keeps each client's parts in class order and, within a
    # class, in the shuffled order: exactly the reference concatenation.
    by_client = np.argsort(client_of, kind="stable")
    sizes = np.bincount(client_of, minlength=num_clients)
    return np.split(shuffled[by_client], np.cumsum(sizes)[:-1])


def partition_shards(
    labels: np.ndarray,
    num_clients: int,
    shards_per_client: int = 2,
    *,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Pathological non-IID shards (McMahan et al. 2017).

    Indices are sorted by label (stable, so ties keep index order), cut into
    ``num_clients * shards_per_client`` contiguous shards of equal size (when the count does
    not divide evenly the shard sizes differ by at most one, so every example is assigned),
    and each client receives ``shards_per_client`` shards chosen uniformly without
    replacement. With 60,000 examples, 100 clients and 2 shards each this is the paper's
    200 shards of 300. Indices within a client are sorted ascending.

    Raises:
        ConfigError: ``num_clients < 1``, ``shards_per_client < 1``, or more shards than
            examples.
        DataError: ``labels`` is not a 1-D array of non-negative integers.
    """
    _check_labels(labels)
    _check_num_clients(num_clients)
    if isinstance(shards_per_client, bool) or not isinstance(shards_per_client, (int, np.integer)):
        raise ConfigError(
            f"shards_per_client must be an int, got {shards_per_client!r}",
            key="data.shards_per_client",
        )
    if shards_per_client < 1:
        raise ConfigError(
            f"shards_per_client must be >= 1, got {shards_per_client}",
            key="data.shards_per_client",
        )
    n = len(labels)
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ConfigError(
            f"shards split needs at most one shard per example: {num_clients} clients x "
            f"{shards_per_client} shards = {num_shards} shards > {n} examples",
            key="data.shards_per_client",
        )
    by_label = np.argsort(np.asarray(labels), kind="stable")
    q, r = divmod(n, num_shards)
    shard_sizes = np.full(num_shards, q, dtype=np.int64)
    shard_sizes[:r] += 1
    # Shard s goes to client owner[s]: a random permutation of [0,0,1,1,2,2,...].
    owner = np.repeat(np.arange(num_clients), shards_per_client)[rng.permutation(num_shards)]
    client_of = np.empty(n, dtype=np.int64)
    client_of[by_label] = np.repeat(owner, shard_sizes)
    return _group(client_of, num_clients)


def partition_fingerprint(parts: Sequence[np.ndarray]) -> str:
    """sha256 hex digest over each part's int64 bytes followed by ``b"|"``, in client order.

    This is the published fingerprint of the reference Dirichlet split (tests/test_data.py
    checks it for 20, 100 and 1000 clients); equal fingerprints mean identical client lists,
    in order.
    """
    h = hashlib.sha256()
    for ix in parts:
        h.update(np.ascontiguousarray(ix, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class PartitionSummary:
    """How a dataset was divided: client sizes and label histograms.

    Attributes:
        sizes: examples per client, int64, shape ``(num_clients,)``.
        label_counts: examples of each label per client, int64, ``(num_clients, num_classes)``.
        min_size, median_size, max_size: of ``sizes``.
        num_empty: clients with no example.
        mean_classes: mean number of distinct labels per non-empty client (0 if all empty).
    """

    sizes: np.ndarray
    label_counts: np.ndarray
    min_size: int
    median_size: float
    max_size: int
    num_empty: int
    mean_classes: float

    @property
    def num_clients(self) -> int:
        return len(self.sizes)

    @property
    def num_classes(self) -> int:
        return int(self.label_counts.shape[1])

    def format(self, max_rows: int = 10) -> str:
        """A readable table: totals, then the first ``max_rows`` clients' label histograms."""
        n, K = self.label_counts.shape
        lines = [
            f"{n} clients, {int(self.sizes.sum())} examples; size min {self.min_size} / "
            f"median {self.median_size:g} / max {self.max_size}; {self.num_empty} empty; "
            f"{self.mean_classes:.2f} classes per non-empty client on average"
        ]
        rows = min(n, max(max_rows, 0))
        if rows == 0:
            return lines[0]
        classes_held = (self.label_counts[:rows] > 0).sum(axis=1)
        if K <= 10:
            head = ["client", "size", "classes", *(f"y={k}" for k in range(K))]
            body = [
                [str(c), str(self.sizes[c]), str(classes_held[c]), *map(str, self.label_counts[c])]
                for c in range(rows)
            ]
        else:  # too many columns: show each client's three most frequent labels
            head = ["client", "size", "classes", "top labels (label:count)"]
            counts = self.label_counts
            top = np.argsort(-counts[:rows], axis=1, kind="stable")[:, :3]
            body = [
                [
                    str(c),
                    str(self.sizes[c]),
                    str(classes_held[c]),
                    " ".join(f"{k}:{counts[c, k]}" for k in top[c] if counts[c, k]),
                ]
                for c in range(rows)
            ]
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        lines.append(fmt.format(*head))
        lines.extend(fmt.format(*r) for r in body)
        if rows < n:
            lines.append(f"... {n - rows} more clients")
        return "\n".join(lines)


def summarize_partition(
    parts: Sequence[np.ndarray], labels: np.ndarray, num_classes: int
) -> PartitionSummary:
    """Sizes and per-client label histograms of a partition, in one ``np.bincount``.

    Raises:
        DataError: a label is outside ``[0, num_classes)`` or an index is out of range.
    """
    labels = np.asarray(labels)
    n_clients = len(parts)
    sizes = np.fromiter((len(ix) for ix in parts), dtype=np.int64, count=n_clients)
    flat = np.concatenate([np.empty(0, np.int64), *parts]).astype(np.int64, copy=False)
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= len(labels)):
        raise DataError(
            f"partition indices must lie in [0, {len(labels)}), "
            f"found min {int(flat.min())} and max {int(flat.max())}"
        )
    held = labels[flat].astype(np.int64, copy=False)
    if len(held) and (int(held.min()) < 0 or int(held.max()) >= num_classes):
        raise DataError(
            f"labels must lie in [0, {num_classes}), found min {int(held.min())} "
            f"and max {int(held.max())}"
        )
    client_of = np.repeat(np.arange(n_clients, dtype=np.int64), sizes)
    counts = np.bincount(client_of * num_classes + held, minlength=n_clients * num_classes)
    counts = counts.reshape(n_clients, num_classes).astype(np.int64, copy=False)
    nonempty = sizes > 0
    classes = (counts[nonempty] > 0).sum(axis=1)
    return PartitionSummary(
        sizes=sizes,
        label_counts=counts,
        min_size=int(sizes.min()) if n_clients else 0,
        median_size=float(np.median(sizes)) if n_clients else 0.0,
        max_size=int(sizes.max()) if n_clients else 0,
        num_empty=int(n_clients - nonempty.sum()),
        mean_classes=float(classes.mean()) if len(classes) else 0.0,
    )


def _group(client_of: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Index arrays of the examples of each client, ascending, from a client id per example."""
    order = np.argsort(client_of, kind="stable").astype(np.int64, copy=False)
    sizes = np.bincount(client_of, minlength=num_clients)
    return np.split(order, np.cumsum(sizes)[:-1])


def _check_num_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ConfigError(
            f"num_clients must be an int, got {num_clients!r}", key="data.num_clients"
        )
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}", key="data.num_clients")


def _check_labels(labels: np.ndarray) -> None:
    a = np.asarray(labels)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got {a.dtype} of shape {a.shape}")
    if len(a) and int(a.min()) < 0:
        raise DataError(f"labels must be >= 0, found {int(a.min())}")


def _num_classes(labels: np.ndarray, num_classes: int | None) -> int:
    seen = int(labels.max()) + 1 if len(labels) else 0
    if num_classes is None:
        return seen
    if num_classes < seen:
        raise ConfigError(
            f"num_classes {num_classes} is too small: labels go up to {seen - 1}",
            key="data.num_classes",
        )
    return int(num_classes)
