"""Synthetic(α, β): the generated federated task of the FedProx paper.

Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated Optimization in Heterogeneous
Networks" (MLSys 2020), after the generator in ``litian96/FedProx``
(``data/synthetic_1_1/generate_synthetic.py``, ``data/synthetic_iid/generate_iid.py``).
Each user k has a multinomial logistic model and its own input distribution::

    n_k  = lognormal(4, 2).astype(int) + 50            # examples of user k ("power law")
    u_k ~ N(0, α²)                                     # mean of W_k and b_k
    B_k ~ N(0, β²)
    v_k ~ N(B_k, 1) per coordinate, d = 60             # mean of user k's inputs
    W_k ~ N(u_k, 1), shape (60, 10);  b_k ~ N(u_k, 1), shape (10,)
    Σ = diag(j^-1.2), j = 1..60
    x ~ N(v_k, Σ);  y = argmax(softmax(x W_k + b_k))
    per user: shuffle, first int(0.9 n_k) to train, the rest to test

α and β are *standard deviations* (the reference calls ``np.random.normal(0, α)``). The IID
variant uses one global ``W, b ~ N(0, 1)`` and ``v_k = 0`` for every user; α and β are unused.

Differences from the reference, none of which changes the distribution: randomness comes from
an explicit ``numpy.random.Generator`` (the reference uses the unseeded global state, so its
exact draws cannot be reproduced anyway); x is drawn as ``v_k + sqrt(diag Σ) ⊙ z`` rather than
through ``multivariate_normal`` (the same law for a diagonal Σ); the label is the argmax of the
logits (softmax is monotone, and skipping it avoids the reference's overflow for large
logits). Note that u_k, being added to every class's weights and bias alike, shifts all logits
of an example by the same amount: α does not change the labels, only β (through v_k) and the
per-user draw of W_k do. This is a property of the published generator, kept as is.
"""

from __future__ import annotations

import numpy as np

from shoal.data import Dataset, FederatedData
from shoal.errors import ConfigError

__all__ = ["DIMENSION", "NUM_CLASSES", "make_synthetic"]

DIMENSION = 60
NUM_CLASSES = 10
_MIN_SAMPLES = 50


def make_synthetic(
    alpha: float,
    beta: float,
    *,
    num_clients: int = 30,
    rng: np.random.Generator,
    iid: bool = False,
    test_fraction: float = 0.1,
) -> FederatedData:
    """Generate Synthetic(α, β) for ``num_clients`` users (FedProx, Li et al. 2020).

    Args:
        alpha: standard deviation of the per-user model means u_k, >= 0.
        beta: standard deviation of the per-user input means B_k, >= 0.
        num_clients: number of users, >= 1 (the paper uses 30).
        rng: the only source of randomness.
        iid: generate the IID variant (one global model, zero input means).
        test_fraction: share of each user's examples held out for test; user k keeps the first
            ``int((1 - test_fraction) * n_k)`` shuffled examples for training (the reference's
            ``int(0.9 * n_k)`` for the default 0.1).

    Returns:
        FederatedData whose ``train`` is the concatenation of the users' training parts
        (user 0 first), ``client_indices[k]`` the contiguous range of user k's part in it,
        ``test`` the concatenation of the test parts, and ``test_client_indices[k]`` user k's
        range in ``test``. Features are float32 of shape ``(n, 60)``, labels int64 in [0, 10).

    Raises:
        ConfigError: α or β negative or not finite, ``num_clients < 1``, or ``test_fraction``
            outside ``[0, 1)`` or so large that a user would have no training example.
    """
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not np.isfinite(value) or value < 0:
            raise ConfigError(
                f"synthetic {name} is a standard deviation and must be >= 0, got {value}",
                key=f"data.{name}",
            )
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ConfigError(
            f"num_clients must be an int, got {num_clients!r}", key="data.num_clients"
        )
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}", key="data.num_clients")
    if not 0 <= test_fraction < 1:
        raise ConfigError(
            f"test_fraction must lie in [0, 1), got {test_fraction}", key="data.test_fraction"
        )
    if int((1 - test_fraction) * _MIN_SAMPLES) < 1:
        raise ConfigError(
            f"test_fraction {test_fraction} leaves no training example to a user with "
            f"{_MIN_SAMPLES} examples",
            key="data.test_fraction",
        )

    U, d, C = num_clients, DIMENSION, NUM_CLASSES
    counts = rng.lognormal(4.0, 2.0, U).astype(np.int64) + _MIN_SAMPLES
    if iid:
        mean_x = np.zeros((U, d))
        W = np.broadcast_to(rng.normal(0.0, 1.0, (d, C)), (U, d, C))
        b = np.broadcast_to(rng.normal(0.0, 1.0, C), (U, C))
    else:
        mean_w = rng.normal(0.0, alpha, U)  # u_k, shared by W_k and b_k as in the reference
        shift = rng.normal(0.0, beta, U)  # B_k
        mean_x = rng.normal(shift[:, None], 1.0, (U, d))  # v_k
        W = rng.normal(mean_w[:, None, None], 1.0, (U, d, C))
        b = rng.normal(mean_w[:, None], 1.0, (U, C))
    std = np.arange(1, d + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)

    n = int(counts.sum())
    user_of = np.repeat(np.arange(U), counts)
    x = mean_x[user_of] + rng.standard_normal((n, d)) * std
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    logits = np.empty((n, C))
    for k in range(U):  # one matrix product per user (users have different W_k)
        s, e = starts[k], starts[k] + counts[k]
        logits[s:e] = x[s:e] @ W[k] + b[k]
    y = np.argmax(logits, axis=1).astype(np.int64)

    # Shuffle within each user: sort by (user, random key); `user_of` is already grouped.
    order = np.lexsort((rng.random(n), user_of))
    x, y = x[order], y[order]
    n_train = ((1 - test_fraction) * counts).astype(np.int64)
    is_train = np.arange(n) - starts[user_of] < n_train[user_of]

    name = "synthetic-iid" if iid else f"synthetic({alpha:g},{beta:g})"
    train = Dataset(
        x=x[is_train].astype(np.float32), y=y[is_train], num_classes=C, name=f"{name}/train"
    )
    test = Dataset(
        x=x[~is_train].astype(np.float32), y=y[~is_train], num_classes=C, name=f"{name}/test"
    )
    return FederatedData(
        train=train,
        test=test,
        client_indices=tuple(_ranges(n_train)),
        test_client_indices=tuple(_ranges(counts - n_train)),
    )


def _ranges(sizes: np.ndarray) -> list[np.ndarray]:
    """Consecutive index ranges of the given sizes: [0, s0), [s0, s0 + s1), ..."""
    return np.split(np.arange(int(sizes.sum()), dtype=np.int64), np.cumsum(sizes)[:-1])
