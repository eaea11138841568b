"""A peer's files: its checkpoint (the step it is at and its model) and its trace (its model
after every step), both in shoal's wire format with the step in the payload's context, so
each model is CRC-checked when read back.

A checkpoint is replaced atomically after every step, so a peer killed at any moment restarts
from the last step it mixed. A trace is appended frame by frame; a frame torn by a kill is
dropped when the trace is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from shoal.codec import Chain, parse, to_bytes
from shoal.codec.chain import chain_of
from shoal.codec.wire import frame_length
from shoal.errors import CodecError, DataError
from shoal.store.atomic import replace_atomically

__all__ = ["save_state", "load_state", "append_trace", "read_trace"]

_HEADER_BYTES = 24  # the wire format's fixed header (shoal.codec.wire)


def _frame(step: int, params: np.ndarray) -> bytes:
    e = Chain([]).encode(np.asarray(params, np.float32), np.random.default_rng(0))
    return to_bytes(e, context={"step": int(step)})


def _unframe(frame: bytes | memoryview, dim: int, path: Path) -> tuple[int, np.ndarray]:
    parsed = parse(frame, max_elements=dim)
    params = chain_of(parsed.encoded.spec).decode(parsed.encoded)
    if len(params) != dim or "step" not in parsed.context:
        raise DataError(f"{path}: a model of {len(params)} parameters or no step "
                        f"(expected {dim})", path=str(path))
    return int(parsed.context["step"]), params


def save_state(path: str | Path, step: int, params: np.ndarray) -> None:
    """Replace the checkpoint at ``path``: the peer is at ``step`` with model ``params``."""
    replace_atomically(path, _frame(step, params))


def load_state(path: str | Path, dim: int) -> tuple[int, np.ndarray] | None:
    """``(step, params)`` from the checkpoint at ``path``, or ``None`` if there is none.

    Raises:
        DataError: the file is corrupt or holds a model of another size.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return _unframe(data, dim, path)
    except CodecError as exc:
        raise DataError(f"{path}: corrupt checkpoint: {exc}", path=str(path)) from None


def append_trace(path: str | Path, step: int, params: np.ndarray) -> None:
    """Append the model after ``step`` to the trace at ``path``."""
    with open(path, "ab") as f:
        f.write(_frame(step, params))
        f.flush()
        os.fsync(f.fileno())


def read_trace(path: str | Path, dim: int) -> list[tuple[int, np.ndarray]]:
    """Every ``(step, params)`` of the trace at ``path``, in order; a torn last frame is
    dropped.

    Raises:
        DataError: a frame before the last is corrupt.
    """
    path = Path(path)
    data = memoryview(path.read_bytes())
    out: list[tuple[int, np.ndarray]] = []
    while len(data):
        try:
            size = frame_length(data)
        except CodecError as exc:
            if len(data) < _HEADER_BYTES:
                break  # a header torn by a kill mid-write
            raise DataError(f"{path}: corrupt trace frame {len(out)}: {exc}",
                            path=str(path)) from None
        if size > len(data):
            break  # a frame torn by a kill mid-write
        try:
            out.append(_unframe(data[:size], dim, path))
        except CodecError as exc:
            raise DataError(f"{path}: corrupt trace frame {len(out)}: {exc}",
                            path=str(path)) from None
        data = data[size:]
    return out
