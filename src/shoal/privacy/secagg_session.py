"""What the SecAgg / SecAgg+ client and server machines share about one round (one session).

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), with the neighbourhoods of Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (CCS 2020). Both parties of a round must agree on its roster (sorted
client ids, whose 1-based positions are the Shamir x-coordinates), on the random Harary graph
that gives each client its k neighbours, and on the labels that bind every derived key and
ciphertext to the session and to one pair of clients. :mod:`shoal.privacy.secagg_client` and
:mod:`shoal.privacy.secagg_server` take them from here so the two sides cannot drift apart.
"""

from __future__ import annotations

import bisect
import struct

import numpy as np

from shoal.errors import ConfigError, ProtocolError
from shoal.privacy import crypto, shamir
from shoal.privacy.secagg_graph import HararyGraph, harary_graph
from shoal.privacy.secagg_messages import SecAggParams

__all__ = [
    "CIPHERTEXT_BYTES",
    "ENC_INFO",
    "ENC_PQ_INFO",
    "KEM_PAIR_INFO",
    "MASK_INFO",
    "MASK_PQ_INFO",
    "directed_bytes",
    "share_ciphertext_bytes",
    "SESSION_BYTES",
    "Roster",
    "pair_bytes",
    "share_ad",
]

SESSION_BYTES = 16
ENC_INFO = b"shoal secagg v1 enc"
MASK_INFO = b"shoal secagg v1 mask"
ENC_PQ_INFO = b"shoal secagg v1 enc pq"
MASK_PQ_INFO = b"shoal secagg v1 mask pq"
KEM_PAIR_INFO = b"shoal secagg v1 kem pair"
_SHARE_AD = b"shoal secagg v1 share"
_MAX_ID = 2**63 - 1
CIPHERTEXT_BYTES = crypto.NONCE_BYTES + 2 * shamir.SHARE_BYTES + crypto.TAG_BYTES
"""Size of one encrypted pair of shares (b_u share, s_u^SK share)."""


def pair_bytes(u: int, v: int) -> bytes:
    """The unordered pair {u, v}, as the key-derivation label of its pairwise keys."""
    return struct.pack(">qq", min(u, v), max(u, v))


def directed_bytes(sender: int, recipient: int) -> bytes:
    """The ordered pair (sender, recipient): the label of a one-way key."""
    return struct.pack(">qq", sender, recipient)


def share_ciphertext_bytes(params: SecAggParams) -> int:
    """Size of one encrypted pair of shares in a round of ``params`` (the ML-KEM ciphertext
    comes first in a post-quantum round)."""
    return CIPHERTEXT_BYTES + (crypto.KEM_CIPHERTEXT_BYTES if params.post_quantum else 0)


def share_ad(session: bytes, sender: int, recipient: int) -> bytes:
    """Associated data of the shares ``sender`` encrypts to ``recipient`` in ``session``."""
    return _SHARE_AD + session + struct.pack(">qq", sender, recipient)


class Roster:
    """Sorted client ids, their Shamir x-coordinates (1-based index) and the graph."""

    def __init__(self, ids: tuple[int, ...], params: SecAggParams, graph_seed: bytes) -> None:
        if not all(isinstance(i, int) and 0 <= i <= _MAX_ID for i in ids):
            raise ProtocolError("roster ids must be integers in [0, 2^63)")
        if len(ids) < 2 or any(a >= b for a, b in zip(ids, ids[1:])):
            raise ProtocolError("roster must hold >= 2 distinct ids in increasing order")
        if len(graph_seed) != crypto.KEY_BYTES:
            raise ProtocolError(
                f"graph seed must be {crypto.KEY_BYTES} bytes, got {len(graph_seed)}"
            )
        try:
            self.graph: HararyGraph = harary_graph(len(ids), params.neighbours, graph_seed)
        except ConfigError as exc:
            raise ProtocolError(f"unusable round parameters: {exc}") from exc
        self.ids = ids

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, (int, np.integer)) and self.x(int(cid)) > 0

    def x(self, cid: int) -> int:
        """1-based index of ``cid``, 0 when absent."""
        i = bisect.bisect_left(self.ids, cid)
        return i + 1 if i < len(self.ids) and self.ids[i] == cid else 0

    def neighbours(self, cid: int) -> frozenset[int]:
        return frozenset(self.ids[j] for j in self.graph.neighbours(self.x(cid) - 1))
