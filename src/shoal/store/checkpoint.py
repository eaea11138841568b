"""Crash-safe checkpoints: the global model, the strategy state and where the run was.

A checkpoint is one ``.npz`` file (numpy's zip of arrays, no pickle) plus a JSON header
inside it holding the parameter spec, the round, the run seed, free-form metadata and a
SHA-256 over the arrays. It is written to a temporary file in the same directory, flushed,
fsync'ed and renamed over the target, so a reader sees the old file or the new one, never a
torn write; loading verifies the digest.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shoal.errors import DataError
from shoal.params import ParamSpec
from shoal.store.atomic import replace_atomically
from shoal.strategy import ServerState

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint"]

_FORMAT = "shoal-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to resume a run or serve its model."""

    state: ServerState
    spec: ParamSpec
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + b"\0" + str(a.dtype).encode() + b"\0"
                 + str(a.shape).encode() + b"\0")
        h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> str:
    """Atomically write ``ckpt`` to ``path``; returns the SHA-256 of its arrays."""
    path = Path(path)
    arrays = ckpt.state.to_arrays()
    digest = _digest(arrays)
    header = {"format": _FORMAT, "spec": ckpt.spec.to_dict(), "seed": ckpt.seed,
              "version": ckpt.state.version, "sha256": digest, "meta": ckpt.meta}
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False,
             __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    replace_atomically(path, buf.getbuffer())
    return digest


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint.

    Raises:
        DataError: the file is missing, not a shoal checkpoint, or its digest does not match.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(z["__header__"].tobytes())
            arrays = {k: z[k] for k in z.files if k != "__header__"}
    except FileNotFoundError:
        raise DataError(f"checkpoint {path} does not exist", path=str(path)) from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise DataError(f"checkpoint {path} is unreadable: {exc}", path=str(path)) from None
    if header.get("format") != _FORMAT:
        raise DataError(f"{path} is not a shoal checkpoint (format "
                        f"{header.get('format')!r})", path=str(path))
    if _digest(arrays) != header["sha256"]:
        raise DataError(f"checkpoint {path} is corrupt: SHA-256 mismatch", path=str(path))
    return Checkpoint(state=ServerState.from_arrays(arrays),
                      spec=ParamSpec.from_dict(header["spec"]), seed=int(header["seed"]),
                      meta=header.get("meta", {}))
