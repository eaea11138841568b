"""Shared fixtures: the real Fashion-MNIST (loaded once per session) and small tasks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from shoal.data import Dataset, FederatedData

# Tests are small; two threads per test process would only fight over the two cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fmnist():
    """(train, test) Fashion-MNIST, as installed by the set-up (scripts/setup.sh)."""
    from shoal.data import load_fashion_mnist

    return load_fashion_mnist(os.environ.get("SHOAL_FASHION_MNIST") or None)


@pytest.fixture()
def tiny_task() -> FederatedData:
    """A learnable 20-feature, 4-class task split unevenly over 6 clients (one empty)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(20, 4))
    x = rng.normal(size=(700, 20)).astype(np.float32)
    y = (x @ w).argmax(1).astype(np.int64)
    xt = rng.normal(size=(300, 20)).astype(np.float32)
    yt = (xt @ w).argmax(1).astype(np.int64)
    cuts = [0, 5, 5, 150, 420, 433, 700]
    parts = tuple(np.arange(a, b, dtype=np.int64) for a, b in zip(cuts[:-1], cuts[1:]))
    return FederatedData(Dataset(x, y, 4, "tiny/train"), Dataset(xt, yt, 4, "tiny/test"),
                         parts)
