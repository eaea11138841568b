"""Derivation of every random stream in a run from one run seed.

Streams are keyed by a path such as ``(run_seed, "sample", round)`` or
``(run_seed, "train", round, client_id)`` through :class:`numpy.random.SeedSequence`, so they
are independent of each other and of the order in which they are drawn: a resumed run, or a
client trained in another process, sees exactly the stream it would have seen in one go.

These generators are for simulation and sampling only. Cryptographic randomness (secure
aggregation keys, masks) never comes from here; see :mod:`shoal.privacy.crypto`.
"""

from __future__ import annotations

import zlib

import numpy as np

from shoal.errors import ConfigError

__all__ = ["generator", "seed_sequence", "torch_seed"]


def _key(part: int | str, index: int | None) -> int:
    """``part`` as a non-negative integer; ``index`` is its place in the path (``None`` for the
    run seed), for the error message only."""
    if isinstance(part, str):
        # A fixed, documented mapping from a stream name to an integer (not Python's hash(),
        # which is salted per process).
        return zlib.crc32(part.encode())
    part = int(part)
    if part < 0:
        if index is None:
            raise ConfigError(f"run seed must be >= 0, got {part}", key="seed")
        raise ConfigError(f"seed path entry {index} must be >= 0, got {part}")
    return part


def seed_sequence(run_seed: int, *path: int | str) -> np.random.SeedSequence:
    """The seed sequence for the stream named by ``path`` under ``run_seed``.

    Raises:
        ConfigError: ``run_seed`` (``key="seed"``) or an integer entry of ``path`` is negative.
    """
    return np.random.SeedSequence([_key(run_seed, None),
                                   *(_key(p, i) for i, p in enumerate(path))])


def generator(run_seed: int, *path: int | str) -> np.random.Generator:
    """A fresh PCG64 generator for the stream named by ``path`` under ``run_seed``."""
    return np.random.default_rng(seed_sequence(run_seed, *path))


def torch_seed(run_seed: int, *path: int | str) -> int:
    """A 63-bit integer seed for ``torch.manual_seed`` derived like :func:`generator`."""
    return int(seed_sequence(run_seed, *path).generate_state(2, np.uint32).view(np.uint64)[0]
               >> np.uint64(1))
