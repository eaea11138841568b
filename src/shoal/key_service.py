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

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from shoal.child_process import ChildGone, ChildProcess, answer_requests
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

    def decrypt(message: tuple) -> tuple:
        try:
            return ("sum", holder.decrypt_sum(*message[1:]))
        except PrivacyError as exc:
            return ("error", str(exc))

    answer_requests(conn, "decrypt", decrypt)


class KeyService:
    """A key holder process (see the module docstring).

    Args:
        params: the CKKS parameters.
        min_clients: the key holder decrypts no sum of fewer contributions (>= 2).

    Raises:
        PrivacyError: the key holder could not start (parameters refused, or it died).
    """

    def __init__(self, params: CkksParams, *, min_clients: int = 2) -> None:
        self._child = ChildProcess(_serve, (params, min_clients), "shoal-ckks-key-holder")
        self.params = params
        try:
            kind, value = self._child.receive()
        except ChildGone:
            kind, value = "exited", "the key holder process exited"
        if kind != "context":
            self.close()
            raise PrivacyError(f"the key holder did not start: {value}")
        #: the serialized public context (no secret key)
        self.context: bytes = value

    def decrypt(self, ciphertexts: Sequence[bytes], dim: int, contributions: int,
                round: Hashable) -> tuple[np.ndarray, float]:
        """Have the key holder decrypt one round's sum: ``(sum of w·x, sum of w)``; each
        ``round`` (e.g. ``(round, task id)``) once.

        Raises:
            PrivacyError: the key holder refused (its reason) or is gone.
        """
        try:
            kind, value = self._child.request(("decrypt", list(ciphertexts), int(dim),
                                               int(contributions), round))
        except ChildGone:
            raise PrivacyError("the key holder process exited") from None
        if kind != "sum":
            raise PrivacyError(str(value))
        return value

    def close(self) -> None:
        """Stop the key holder (its keys die with it)."""
        self._child.close(timeout=5.0)
