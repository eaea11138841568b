"""Messages, stages and parameters of the SecAgg / SecAgg+ protocol.

The protocol is Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning" (CCS 2017), restricted to neighbourhoods as in Bell et al., "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead" (CCS 2020). Each message is a small frozen dataclass
carrying the round's session nonce; the state machines in :mod:`shoal.privacy.secagg_client`
and :mod:`shoal.privacy.secagg_server` consume and produce them, and a transport only has to
move them. Client ids are non-negative integers; a client's Shamir x-coordinate is its 1-based
position in the sorted roster.

Flow (server -> client messages on the left, client -> server on the right)::

    RoundSetup            ->  KeyAdvertisement     (AdvertiseKeys: U1)
    KeyDirectory          ->  EncryptedShares      (ShareKeys: U2)
    ShareDelivery         ->  MaskedInput          (MaskedInputCollection: U3)
    UnmaskRequest         ->  UnmaskingShares      (Unmasking: U5)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from shoal.errors import ConfigError, ProtocolError

__all__ = [
    "Stage",
    "SecAggAborted",
    "SecAggParams",
    "RoundSetup",
    "KeyAdvertisement",
    "KeyDirectory",
    "EncryptedShares",
    "ShareDelivery",
    "MaskedInput",
    "UnmaskRequest",
    "UnmaskingShares",
    "ClientMessage",
    "ServerMessage",
]


class Stage(enum.Enum):
    """Protocol stages. A client's ``stage`` is the last one it completed; the server's is the
    one it is collecting."""

    SETUP = "setup"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASKING = "unmasking"
    DONE = "done"
    ABORTED = "aborted"


class SecAggAborted(ProtocolError):
    """The round cannot finish securely (too few survivors somewhere) and was abandoned.

    Nothing further is revealed: the server computes no aggregate and clients answer no
    further requests.

    Attributes:
        stage: the stage at which the round was aborted.
        clients: the clients whose neighbourhood fell below the threshold, when known.
    """

    def __init__(
        self, message: str, *, stage: Stage, clients: frozenset[int] = frozenset()
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.clients = clients


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of one round, fixed by the server in :class:`RoundSetup`.

    Attributes:
        neighbours: k, the number of neighbours each client masks with and shares to;
            even, or ``n - 1`` for the complete graph (plain SecAgg).
        threshold: t, Shamir shares needed to reconstruct a client's secrets (2 <= t <= k).
        bits: b, the ring is Z_{2^b} (1 <= b <= 64).
        length: number of ring elements per client vector (the update plus the weight).
        post_quantum: hybrid key agreement: every pairwise key (share encryption and masks)
            also mixes in ML-KEM-768 shared secrets, so it stays secret while X25519 or
            ML-KEM holds.
    """

    neighbours: int
    threshold: int
    bits: int
    length: int
    post_quantum: bool = False

    def __post_init__(self) -> None:
        if self.neighbours < 1:
            raise ConfigError(f"neighbours must be >= 1, got {self.neighbours}", key="neighbours")
        if not 2 <= self.threshold <= self.neighbours:
            raise ConfigError(
                f"threshold must be in [2, neighbours={self.neighbours}], got {self.threshold}",
                key="threshold",
            )
        if not 1 <= self.bits <= 64:
            raise ConfigError(f"bits must be in [1, 64], got {self.bits}", key="bits")
        if self.length < 1:
            raise ConfigError(f"length must be >= 1, got {self.length}", key="length")


@dataclass(frozen=True)
class RoundSetup:
    """Server -> every client on the roster: start a round.

    ``graph_seed`` fixes the neighbourhood graph before any key is advertised, so the server
    cannot pick neighbourhoods after seeing who is online.
    """

    session: bytes
    roster: tuple[int, ...]
    graph_seed: bytes
    params: SecAggParams


@dataclass(frozen=True)
class KeyAdvertisement:
    """Client -> server (AdvertiseKeys): the client's two fresh X25519 public keys, and with
    ``post_quantum`` its fresh ML-KEM-768 encapsulation key (else empty)."""

    session: bytes
    sender: int
    enc_public: bytes
    mask_public: bytes
    kem_public: bytes = b""


@dataclass(frozen=True)
class KeyDirectory:
    """Server -> client: public keys ``(enc, mask)`` of its neighbours that advertised (U1),
    ``(enc, mask, kem)`` in a post-quantum round."""

    session: bytes
    keys: Mapping[int, tuple[bytes, ...]]


@dataclass(frozen=True)
class EncryptedShares:
    """Client -> server (ShareKeys): per neighbour, AES-GCM(shares of b_u and s_u^SK); in a
    post-quantum round preceded by the ML-KEM ciphertext the sender encapsulated to that
    neighbour (its secret is half of the key that seals the shares)."""

    session: bytes
    sender: int
    ciphertexts: Mapping[int, bytes] = field(repr=False)


@dataclass(frozen=True)
class ShareDelivery:
    """Server -> client: ciphertexts addressed to it, by sender; the senders are its
    neighbours in U2, exactly the ones it must mask with."""

    session: bytes
    ciphertexts: Mapping[int, bytes] = field(repr=False)


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Client -> server (MaskedInputCollection): y_u = x_u + PRG(b_u) + sum of pair masks."""

    session: bytes
    sender: int
    masked: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> client (Unmasking): reveal b-shares of ``survivors`` (neighbours whose masked
    input arrived) and mask-key shares of ``dropped`` (neighbours in U2 whose input did not)."""

    session: bytes
    survivors: frozenset[int]
    dropped: frozenset[int]


@dataclass(frozen=True)
class UnmaskingShares:
    """Client -> server (Unmasking): Shamir share values (33-byte big-endian), by owner; in a
    post-quantum round also, for each dropped neighbour, the ML-KEM half of the pair's mask
    key (which no share can rebuild)."""

    session: bytes
    sender: int
    self_mask_shares: Mapping[int, bytes] = field(repr=False)
    mask_key_shares: Mapping[int, bytes] = field(repr=False)
    pair_kem_keys: Mapping[int, bytes] = field(default_factory=dict, repr=False)


ClientMessage = KeyAdvertisement | EncryptedShares | MaskedInput | UnmaskingShares
ServerMessage = RoundSetup | KeyDirectory | ShareDelivery | UnmaskRequest
