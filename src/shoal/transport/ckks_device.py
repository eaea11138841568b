"""The device side of a CKKS round: fetch the public context once per key, clip, weigh and
encrypt the update, frame the ciphertexts for the upload.

The scheme and its parameters are :mod:`shoal.privacy.he` (CKKS, Cheon, Kim, Kim & Song,
ASIACRYPT 2017, through TenSEAL). The device never sees a secret key: a context that carries
one, or whose SHA-256 is not the key id the task names, is refused and the task abandoned.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from shoal.errors import PrivacyError
from shoal.privacy.he import encrypt_update, public_context
from shoal.transport.ckks_wire import pack_ciphertexts
from shoal.transport.device_api import TaskAbandoned
from shoal.transport.proto import shoal_pb2 as pb

__all__ = ["CkksEncryptor"]


class CkksEncryptor:
    """Encrypts a device's updates for CKKS rounds.

    Args:
        fetch: ``fetch(key_id)`` -> the ``CkksContextReply`` of the aggregator (the RPC).
    """

    def __init__(self, fetch: Callable[[bytes], Any]) -> None:
        self._fetch = fetch
        self._contexts: dict[bytes, Any] = {}  # key id -> loaded public context

    def context(self, key_id: bytes) -> Any:
        """The public context named ``key_id`` (fetched on first use, then kept).

        Raises:
            TaskAbandoned: the served context is not the one named, or is not public.
        """
        ctx = self._contexts.get(key_id)
        if ctx is not None:
            return ctx
        reply = self._fetch(key_id)
        if hashlib.sha256(reply.context).digest() != key_id:
            raise TaskAbandoned("the served CKKS context is not the one the task names")
        try:
            ctx = public_context(bytes(reply.context))
        except PrivacyError as exc:
            raise TaskAbandoned(f"cannot use the served CKKS context: {exc}") from None
        self._contexts = {key_id: ctx}  # one run's key at a time
        return ctx

    def encrypt(self, task: pb.CkksTask, delta: np.ndarray, num_examples: int) -> bytes:
        """The upload's payload: ``min(examples, max_weight)·clip(delta)`` and the weight,
        encrypted under the task's context and framed.

        Raises:
            TaskAbandoned: no usable context, bounds out of range, or a non-finite update.
        """
        x = np.asarray(delta, dtype=np.float64)
        if not np.isfinite(x).all():
            raise TaskAbandoned("the update is not finite: nothing is encrypted")
        if not (task.clip > 0 and task.max_weight >= 1 and task.slots >= 1):
            raise TaskAbandoned("the CKKS task names no clip, weight bound or slot count")
        weight = float(min(max(1, int(num_examples)), int(task.max_weight)))
        ctx = self.context(bytes(task.key_id))
        return pack_ciphertexts(encrypt_update(ctx, x, weight, clip=float(task.clip),
                                               slots=int(task.slots)))
