"""The CKKS key holder of a deployment, in a process of its own.

:class:`KeyService` starts a child process that makes the CKKS keys
(:class:`~shoal.privacy.he.KeyHolder`), sends back the *public* context and then answers one
request: decrypt this round's summed ciphertexts. The secret key never leaves the child; the
aggregator process holds the public context and a pipe to it, nothing more. The child applies
the key holder's rules (a sum of at least ``min_clients`` contributions, one decryption per
task); it cannot check that the aggregator's sum really has that many contributions -- the
trust this leaves in the aggregator is stated in docs/trust.md.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from shoal.errors import PrivacyError
from shoal.privacy.he import CkksParams, KeyHolder

__all__ = ["KeyService"]


def _serve(conn: Any, params: CkksParams, min_clients: int) -> None:
    """The child: make the keys, publish the public context, decrypt sums until told to
    stop (or the aggregator goes away)."""
    try:
        holder = KeyHolder(params, min_clients=min_clients)
    except PrivacyError as exc:
        conn.send(("error", str(exc)))
        return
    conn.send(("context", holder.public_context()))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] != "decrypt":
            return
        try:
            conn.send(("sum", holder.decrypt_sum(*message[1:])))
        except PrivacyError as exc:
            conn.send(("error", str(exc)))


class KeyService:
    """A key holder process (see the module docstring).

    Args:
        params: the CKKS parameters.
        min_clients: the key holder decrypts no sum of fewer contributions (>= 2).

    Raises:
        PrivacyError: the key holder could not start (parameters refused, or it died).
    """

    def __init__(self, params: CkksParams, *, min_clients: int = 2) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no aggregator state is copied
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, params, min_clients),
                                 name="shoal-ckks-key-holder", daemon=True)
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self.params = params
        kind, value = self._receive()
        if kind != "context":
            self.close()
            raise PrivacyError(f"the key holder did not start: {value}")
        #: the serialized public context (no secret key)
        self.context: bytes = value

    def _receive(self) -> tuple[str, Any]:
        try:
            kind, value = self._conn.recv()
        except EOFError:
            raise PrivacyError("the key holder process exited") from None
        return kind, value

    def decrypt(self, ciphertexts: Sequence[bytes], dim: int, contributions: int,
                round: Hashable) -> tuple[np.ndarray, float]:
        """Have the key holder decrypt one round's sum: ``(sum of w·x, sum of w)``; each
        ``round`` (e.g. ``(round, task id)``) once.

        Raises:
            PrivacyError: the key holder refused (its reason) or is gone.
        """
        with self._lock:
            try:
                self._conn.send(("decrypt", list(ciphertexts), int(dim), int(contributions),
                                 round))
            except (BrokenPipeError, OSError):
                raise PrivacyError("the key holder process exited") from None
            kind, value = self._receive()
        if kind != "sum":
            raise PrivacyError(str(value))
        return value

    def close(self) -> None:
        """Stop the key holder (its keys die with it)."""
        with self._lock:
            try:
                self._conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self._conn.close()
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
