"""Sans-I/O SecAgg / SecAgg+ client and server state machines.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), with the neighbourhoods of Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (CCS 2020): each client masks pairwise with, and Shamir-shares its
secrets to, only its k neighbours in a random Harary graph (k = n - 1 gives the original
protocol). The server learns sum_{u in U3} x_u mod 2^b and nothing else about the inputs.

Threat model: honest-but-curious server and clients (the paper's passive setting). The
ConsistencyCheck round and the signatures of the active setting are not implemented: a
malicious server that lies about who dropped out could ask different clients for different
share kinds of the same peer. Each client still refuses to reveal both kinds of share of one
peer to the server itself.

The machines do no I/O, keep no clocks and start no threads: they take protocol messages
(:mod:`shoal.privacy.secagg_messages`) and return messages. Deadlines belong to the caller, who
decides when a stage is over by calling :meth:`SecAggServer.advance`; clients whose messages
have not arrived by then are dropouts. A message that is out of order, duplicated, from an
unknown client or from another round raises :class:`~shoal.errors.ProtocolError` and leaves the
machine unchanged. If any neighbourhood that must be reconstructed falls below the threshold,
the round raises :class:`SecAggAborted` and reveals nothing further. Keys are fresh per round:
a machine serves exactly one round.

Masked input of client u (pairs signed by id, Delta = +1 if u > v else -1)::

    y_u = x_u + PRG(b_u) + sum_{v in N(u) & U2} Delta_{u,v} PRG(s_{u,v})   (mod 2^b)

Shares go to the k neighbours only (no share of one's own secrets, unlike the original paper
and FCP's self-edge), so every reconstruction needs t of a client's neighbours, t <= k.

The server never holds both kinds of share of one client: it asks each surviving client once,
for self-mask shares of neighbours whose input arrived and mask-key shares of those whose input
did not; the client refuses a request naming a peer in both lists, and answers one request per
round only.

Costs: a client expands k + 1 AES-CTR masks of length d (O(k d)); the server expands one mask
per surviving client and, for each dropped client, one per surviving neighbour (O(k d) each).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Container, Iterable, Mapping

import numpy as np

from shoal.errors import ConfigError, ProtocolError
from shoal.privacy import crypto, shamir
from shoal.privacy.secagg_encoding import ring_dtype, ring_mask
from shoal.privacy.secagg_graph import HararyGraph, harary_graph
from shoal.privacy.secagg_messages import (
    ClientMessage,
    EncryptedShares,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    RoundSetup,
    SecAggAborted,
    SecAggParams,
    ServerMessage,
    ShareDelivery,
    Stage,
    UnmaskingShares,
    UnmaskRequest,
)

__all__ = ["SecAggClient", "SecAggServer", "SESSION_BYTES", "CIPHERTEXT_BYTES"]

SESSION_BYTES = 16
_ENC_INFO = b"shoal secagg v1 enc"
_MASK_INFO = b"shoal secagg v1 mask"
_SHARE_AD = b"shoal secagg v1 share"
_MAX_ID = 2**63 - 1
CIPHERTEXT_BYTES = crypto.NONCE_BYTES + 2 * shamir.SHARE_BYTES + crypto.TAG_BYTES
"""Size of one encrypted pair of shares (b_u share, s_u^SK share)."""


def _pair(u: int, v: int) -> bytes:
    return struct.pack(">qq", min(u, v), max(u, v))


def _share_ad(session: bytes, sender: int, recipient: int) -> bytes:
    return _SHARE_AD + session + struct.pack(">qq", sender, recipient)


class _Roster:
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


class SecAggClient:
    """One client's side of one SecAgg(+) round.

    Args:
        client_id: this client's id (must appear in the round's roster).
        vector: the encoded input, a ring vector (uint32 for b <= 32, else uint64) of
            ``params.length`` entries in [0, 2^b); only read, never modified. A device that
            trains while keys are exchanged (as in Bonawitz et al., MLSys 2019) passes
            ``None`` and calls :meth:`set_input` before the ``ShareDelivery`` arrives.
    """

    def __init__(self, client_id: int, vector: np.ndarray | None = None) -> None:
        self.client_id = client_id
        self._vector: np.ndarray | None = vector
        self._stage = Stage.SETUP
        self._session = b""

    @property
    def params(self) -> SecAggParams:
        """The round's parameters (after ``RoundSetup``): ring bits and vector length."""
        try:
            return self._params
        except AttributeError:
            raise ProtocolError("no RoundSetup handled yet") from None

    def set_input(self, vector: np.ndarray) -> None:
        """Provide the encoded input after ``RoundSetup`` and before ``ShareDelivery``.

        Raises:
            ProtocolError: wrong stage, dtype, length or entries outside the ring; the
                client is unchanged.
        """
        if self._stage not in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS):
            raise ProtocolError(f"client {self.client_id} at stage {self._stage.value} cannot "
                                f"take an input")
        self._check_input(vector, self._params)
        self._vector = vector

    @staticmethod
    def _check_input(v: np.ndarray | None, p: SecAggParams) -> None:
        dtype = ring_dtype(p.bits)
        if not isinstance(v, np.ndarray) or v.dtype != dtype or v.shape != (p.length,):
            raise ProtocolError(
                f"input must be a {np.dtype(dtype).name} vector of length {p.length}, got "
                f"{None if v is None else (getattr(v, 'dtype', type(v)), np.shape(v))}"
            )
        if p.bits < 8 * v.itemsize and bool((v > ring_mask(p.bits)).any()):
            raise ProtocolError(f"input has entries outside [0, 2^{p.bits})")

    @property
    def stage(self) -> Stage:
        """The last stage this client completed (``SETUP`` before any)."""
        return self._stage

    def handle(self, message: ServerMessage) -> ClientMessage:
        """Process the server's next message and return this client's reply.

        Raises:
            ProtocolError: out-of-order, duplicated, malformed or tampered message, or a
                request for both kinds of share of one peer; the client is unchanged.
            SecAggAborted: too few neighbours to continue; the client wipes its secrets.
        """
        expected = {
            Stage.SETUP: RoundSetup,
            Stage.ADVERTISE_KEYS: KeyDirectory,
            Stage.SHARE_KEYS: ShareDelivery,
            Stage.MASKED_INPUT: UnmaskRequest,
        }.get(self._stage)
        if expected is None or not isinstance(message, expected):
            raise ProtocolError(
                f"client {self.client_id} at stage {self._stage.value} cannot accept "
                f"{type(message).__name__}",
                party="server",
            )
        if not isinstance(message, RoundSetup) and message.session != self._session:
            raise ProtocolError("message belongs to another session (replayed?)", party="server")
        if isinstance(message, RoundSetup):
            return self._advertise(message)
        if isinstance(message, KeyDirectory):
            return self._share_keys(message)
        if isinstance(message, ShareDelivery):
            return self._mask(message)
        return self._unmask(message)

    def abort(self) -> None:
        """Forget every secret; the client answers nothing more this round."""
        self._stage = Stage.ABORTED
        self._vector = None
        for name in ("_enc", "_mask_key", "_self_seed", "_held", "_pair_enc_keys"):
            self.__dict__.pop(name, None)

    def _abort(self, reason: str, stage: Stage) -> SecAggAborted:
        self.abort()
        return SecAggAborted(f"client {self.client_id}: {reason}", stage=stage)

    # AdvertiseKeys -------------------------------------------------------------------------
    def _advertise(self, msg: RoundSetup) -> KeyAdvertisement:
        p = msg.params
        if len(msg.session) < SESSION_BYTES:
            raise ProtocolError(f"session nonce must be >= {SESSION_BYTES} bytes", party="server")
        roster = _Roster(tuple(msg.roster), p, msg.graph_seed)
        if self.client_id not in roster:
            raise ProtocolError(f"client {self.client_id} is not on the roster", party="server")
        if self._vector is not None:
            self._check_input(self._vector, p)
        self._params, self._roster, self._session = p, roster, msg.session
        self._neighbours = roster.neighbours(self.client_id)
        self._enc, self._mask_key = crypto.generate_keypair(), crypto.generate_keypair()
        self._stage = Stage.ADVERTISE_KEYS
        return KeyAdvertisement(
            self._session, self.client_id, self._enc.public, self._mask_key.public
        )

    # ShareKeys -----------------------------------------------------------------------------
    def _share_keys(self, msg: KeyDirectory) -> EncryptedShares:
        peers = dict(msg.keys)
        stray = set(peers) - self._neighbours
        if stray:
            raise ProtocolError(
                f"key directory lists non-neighbours {sorted(stray)}", party="server"
            )
        for v, keys in peers.items():
            if len(keys) != 2 or any(len(k) != crypto.KEY_BYTES for k in keys):
                raise ProtocolError(f"malformed public keys for client {v}", party="server")
        if len(peers) < self._params.threshold:
            raise self._abort(
                f"only {len(peers)} neighbours advertised keys, threshold is "
                f"{self._params.threshold}",
                Stage.SHARE_KEYS,
            )
        pair_keys = crypto.agree_many(
            self._enc.private,
            {v: enc_pk for v, (enc_pk, _) in peers.items()},
            salt=self._session,
            info=lambda v: _ENC_INFO + _pair(self.client_id, v),
        )
        self_seed = crypto.random_bytes(crypto.KEY_BYTES)
        order = sorted(peers)
        xs = [self._roster.x(v) for v in order]
        t = self._params.threshold
        b_shares = shamir.split_secret(self_seed, t, xs)
        s_shares = shamir.split_secret(self._mask_key.private, t, xs)
        ciphertexts = {
            v: crypto.encrypt(
                pair_keys[v], b.y_bytes() + s.y_bytes(), _share_ad(self._session, self.client_id, v)
            )
            for v, b, s in zip(order, b_shares, s_shares, strict=True)
        }
        self._peer_keys, self._pair_enc_keys, self._self_seed = peers, pair_keys, self_seed
        self._stage = Stage.SHARE_KEYS
        return EncryptedShares(self._session, self.client_id, ciphertexts)

    # MaskedInputCollection -----------------------------------------------------------------
    def _mask(self, msg: ShareDelivery) -> MaskedInput:
        senders = set(msg.ciphertexts)
        stray = senders - set(self._peer_keys)
        if stray:
            raise ProtocolError(f"shares from clients without keys {sorted(stray)}", party="server")
        held: dict[int, tuple[bytes, bytes]] = {}
        n = shamir.SHARE_BYTES
        for v, ct in msg.ciphertexts.items():
            plain = crypto.decrypt(
                self._pair_enc_keys[v], ct, _share_ad(self._session, v, self.client_id)
            )
            if len(plain) != 2 * n:
                raise ProtocolError(f"share plaintext from client {v} is malformed", party=v)
            held[v] = (plain[:n], plain[n:])
        if len(held) < self._params.threshold:
            raise self._abort(
                f"only {len(held)} neighbours shared keys, threshold is {self._params.threshold}",
                Stage.MASKED_INPUT,
            )
        if self._vector is None:
            raise ProtocolError(f"client {self.client_id} has no input to mask (set_input)")
        p = self._params
        out = self._vector.astype(ring_dtype(p.bits), copy=True)
        scratch = np.empty_like(out)
        out += crypto.keystream_into(self._self_seed, scratch)
        u = self.client_id
        seeds = crypto.agree_many(
            self._mask_key.private,
            {v: self._peer_keys[v][1] for v in sorted(held)},
            salt=self._session,
            info=lambda v: _MASK_INFO + _pair(u, v),
        )
        for v, seed in seeds.items():
            crypto.keystream_into(seed, scratch)
            if u > v:
                out += scratch
            else:
                out -= scratch
        out &= ring_mask(p.bits)
        self._held = held
        # The client's own secrets are not needed any more; drop them and the input.
        self._vector = None
        del self._self_seed, self._mask_key, self._pair_enc_keys
        self._stage = Stage.MASKED_INPUT
        return MaskedInput(self._session, u, out)

    # Unmasking -----------------------------------------------------------------------------
    def _unmask(self, msg: UnmaskRequest) -> UnmaskingShares:
        both = msg.survivors & msg.dropped
        if both:
            raise ProtocolError(
                f"server asked for both the self-mask and the mask-key shares of {sorted(both)}; "
                "revealing both would expose their inputs",
                party="server",
            )
        unknown = (msg.survivors | msg.dropped) - set(self._held)
        if unknown:
            raise ProtocolError(f"no shares held for clients {sorted(unknown)}", party="server")
        reply = UnmaskingShares(
            self._session,
            self.client_id,
            self_mask_shares={v: self._held[v][0] for v in sorted(msg.survivors)},
            mask_key_shares={v: self._held[v][1] for v in sorted(msg.dropped)},
        )
        del self._held
        self._stage = Stage.DONE
        return reply


class SecAggServer:
    """The server's side of one SecAgg(+) round: collect, then :meth:`advance` each stage.

    Args:
        params: the round's public parameters.
        roster: ids of the clients invited to the round.
        session: the round's nonce (fresh random 16 bytes when omitted).
        graph_seed: 32-byte seed of the neighbourhood permutation (fresh random when omitted).
    """

    def __init__(
        self,
        params: SecAggParams,
        roster: Iterable[int],
        *,
        session: bytes | None = None,
        graph_seed: bytes | None = None,
    ) -> None:
        self.params = params
        self._session = crypto.random_bytes(SESSION_BYTES) if session is None else session
        if len(self._session) < SESSION_BYTES:
            raise ConfigError(f"session nonce must be >= {SESSION_BYTES} bytes", key="session")
        self._graph_seed = crypto.random_bytes(32) if graph_seed is None else graph_seed
        try:
            ids = tuple(sorted({int(i) for i in roster}))
            self._roster = _Roster(ids, params, self._graph_seed)
        except ProtocolError as exc:
            raise ConfigError(str(exc), key="roster") from exc
        self._nbrs: dict[int, frozenset[int]] = {}
        self._stage = Stage.ADVERTISE_KEYS
        self._keys: dict[int, tuple[bytes, bytes]] = {}  # U1
        self._ciphertexts: dict[int, Mapping[int, bytes]] = {}  # U2
        self._inputs: set[int] = set()  # U3
        self._sum = np.zeros(params.length, dtype=ring_dtype(params.bits))
        self._requests: dict[int, UnmaskRequest] = {}
        self._b_shares: dict[int, list[shamir.Share]] = {}
        self._s_shares: dict[int, list[shamir.Share]] = {}
        self._needed_keys: set[int] = set()  # dropped after sharing, with live neighbours
        self._responded: set[int] = set()  # U5
        self._result: np.ndarray | None = None

    @property
    def stage(self) -> Stage:
        """The stage being collected, ``DONE`` or ``ABORTED``."""
        return self._stage

    @property
    def session(self) -> bytes:
        return self._session

    def setup(self) -> RoundSetup:
        """The message that starts the round, the same for every client on the roster."""
        return RoundSetup(self._session, self._roster.ids, self._graph_seed, self.params)

    @property
    def included(self) -> frozenset[int]:
        """Clients whose masked input is in the sum (U3)."""
        return frozenset(self._inputs)

    @property
    def aggregate(self) -> np.ndarray:
        """sum_{u in U3} x_u mod 2^b, once the round is ``DONE``.

        Raises:
            ProtocolError: the round is not finished (or was aborted).
        """
        if self._result is None:
            raise ProtocolError(f"no aggregate: the round is at stage {self._stage.value}")
        return self._result.copy()

    def _neighbours(self, cid: int) -> frozenset[int]:
        if cid not in self._nbrs:
            self._nbrs[cid] = self._roster.neighbours(cid)
        return self._nbrs[cid]

    def _live(self, cid: int, live: Iterable[int]) -> frozenset[int]:
        return self._neighbours(cid).intersection(live)

    # collection ----------------------------------------------------------------------------
    def receive(self, message: ClientMessage) -> None:
        """Validate and store one client message for the current stage.

        Raises:
            ProtocolError: wrong stage, wrong session, unknown or ineligible sender, duplicate,
                or malformed content; nothing is stored.
        """
        expected = {
            Stage.ADVERTISE_KEYS: KeyAdvertisement,
            Stage.SHARE_KEYS: EncryptedShares,
            Stage.MASKED_INPUT: MaskedInput,
            Stage.UNMASKING: UnmaskingShares,
        }.get(self._stage)
        sender = getattr(message, "sender", None)
        if expected is None or not isinstance(message, expected):
            raise ProtocolError(
                f"server at stage {self._stage.value} cannot accept {type(message).__name__}",
                party=sender,
            )
        if message.session != self._session:
            raise ProtocolError("message belongs to another session (replayed?)", party=sender)
        if sender not in self._roster:
            raise ProtocolError(f"unknown client {sender!r}", party=sender)
        if isinstance(message, KeyAdvertisement):
            self._receive_keys(message)
        elif isinstance(message, EncryptedShares):
            self._receive_shares(message)
        elif isinstance(message, MaskedInput):
            self._receive_input(message)
        else:
            self._receive_unmasking(message)

    @staticmethod
    def _check_fresh(
        sender: int, eligible: Container[int], seen: Container[int], what: str
    ) -> None:
        if sender not in eligible:
            raise ProtocolError(f"client {sender} may not send {what} in this round", party=sender)
        if sender in seen:
            raise ProtocolError(f"duplicate {what} from client {sender}", party=sender)

    def _receive_keys(self, msg: KeyAdvertisement) -> None:
        self._check_fresh(msg.sender, self._roster, self._keys, "key advertisement")
        if len(msg.enc_public) != crypto.KEY_BYTES or len(msg.mask_public) != crypto.KEY_BYTES:
            raise ProtocolError(f"public keys must be {crypto.KEY_BYTES} bytes", party=msg.sender)
        if msg.enc_public == msg.mask_public:
            raise ProtocolError("encryption and masking keys must differ", party=msg.sender)
        self._keys[msg.sender] = (msg.enc_public, msg.mask_public)

    def _receive_shares(self, msg: EncryptedShares) -> None:
        self._check_fresh(msg.sender, self._keys, self._ciphertexts, "encrypted shares")
        want = self._live(msg.sender, self._keys)
        if set(msg.ciphertexts) != want:
            raise ProtocolError(
                f"client {msg.sender} must send one ciphertext to each of its {len(want)} "
                f"neighbours with keys, got {len(msg.ciphertexts)} with a different recipient set",
                party=msg.sender,
            )
        if any(len(ct) != CIPHERTEXT_BYTES for ct in msg.ciphertexts.values()):
            raise ProtocolError(f"ciphertexts must be {CIPHERTEXT_BYTES} bytes", party=msg.sender)
        self._ciphertexts[msg.sender] = dict(msg.ciphertexts)

    def _receive_input(self, msg: MaskedInput) -> None:
        self._check_fresh(msg.sender, self._ciphertexts, self._inputs, "masked input")
        y, p = msg.masked, self.params
        want = self._sum
        if not isinstance(y, np.ndarray) or y.dtype != want.dtype or y.shape != want.shape:
            raise ProtocolError(
                f"masked input must be {self._sum.dtype.name}[{p.length}]", party=msg.sender
            )
        if p.bits < 8 * y.itemsize and bool((y > ring_mask(p.bits)).any()):
            raise ProtocolError(
                f"masked input has entries outside [0, 2^{p.bits})", party=msg.sender
            )
        self._sum += y  # streaming: O(d) memory however many clients report
        self._inputs.add(msg.sender)

    def _receive_unmasking(self, msg: UnmaskingShares) -> None:
        self._check_fresh(msg.sender, self._requests, self._responded, "unmasking shares")
        req = self._requests[msg.sender]
        if set(msg.self_mask_shares) != req.survivors or set(msg.mask_key_shares) != req.dropped:
            raise ProtocolError("unmasking shares do not match the request", party=msg.sender)
        x = self._roster.x(msg.sender)
        b = {v: shamir.Share.from_y_bytes(x, y) for v, y in msg.self_mask_shares.items()}
        s = {v: shamir.Share.from_y_bytes(x, y) for v, y in msg.mask_key_shares.items()}
        for v, share in b.items():
            self._b_shares.setdefault(v, []).append(share)
        for v, share in s.items():
            self._s_shares.setdefault(v, []).append(share)
        self._responded.add(msg.sender)

    # stage transitions ---------------------------------------------------------------------
    def advance(self) -> dict[int, ServerMessage]:
        """Close the current stage; return the next message for each client still in the round.

        Clients that have not reported by now are treated as dropped. After the unmasking
        stage the result is in :attr:`aggregate` and an empty dict is returned.

        Raises:
            SecAggAborted: a client whose secrets are needed has fewer than t live neighbours
                (or fewer than t shares arrived); the round is over and reveals nothing more.
            ProtocolError: the round is already finished.
        """
        stage = self._stage
        if stage is Stage.ADVERTISE_KEYS:
            u1 = set(self._keys)
            self._require_threshold(u1, u1, stage)
            self._stage = Stage.SHARE_KEYS
            return {
                u: KeyDirectory(self._session, {v: self._keys[v] for v in self._live(u, u1)})
                for u in sorted(u1)
            }
        if stage is Stage.SHARE_KEYS:
            u2 = set(self._ciphertexts)
            self._require_threshold(u2, u2, stage)
            self._stage = Stage.MASKED_INPUT
            out: dict[int, ServerMessage] = {
                u: ShareDelivery(
                    self._session, {v: self._ciphertexts[v][u] for v in self._live(u, u2)}
                )
                for u in sorted(u2)
            }
            return out
        if stage is Stage.MASKED_INPUT:
            u3, dropped = self._inputs, set(self._ciphertexts) - self._inputs
            self._needed_keys = {u for u in dropped if self._live(u, u3)}
            self._require_threshold(u3 | self._needed_keys, u3, stage)
            self._ciphertexts = {}
            self._requests = {
                v: UnmaskRequest(self._session, self._live(v, u3), self._live(v, dropped))
                for v in sorted(u3)
            }
            self._stage = Stage.UNMASKING
            return dict(self._requests)
        if stage is Stage.UNMASKING:
            self._finish()
            return {}
        raise ProtocolError(f"the round is {stage.value}; nothing to advance")

    def _require_threshold(self, owners: Iterable[int], live: set[int], stage: Stage) -> None:
        t = self.params.threshold
        short = frozenset(u for u in owners if len(self._live(u, live)) < t)
        if not live or short:
            self._abort()
            raise SecAggAborted(
                f"round aborted at {stage.value}: {len(short)} client(s) have fewer than "
                f"t={t} live neighbours (e.g. {sorted(short)[:5]}); {len(live)} clients left",
                stage=stage,
                clients=short,
            )

    def _abort(self) -> None:
        self._stage = Stage.ABORTED
        self._sum = np.zeros(0, dtype=self._sum.dtype)
        self._b_shares, self._s_shares, self._ciphertexts = {}, {}, {}

    def _finish(self) -> None:
        t, p = self.params.threshold, self.params
        u3, dropped = self._inputs, self._needed_keys
        short = frozenset(u for u in u3 if len(self._b_shares.get(u, ())) < t) | frozenset(
            u for u in dropped if len(self._s_shares.get(u, ())) < t
        )
        if short:
            self._abort()
            raise SecAggAborted(
                f"round aborted at unmasking: fewer than t={t} shares arrived for clients "
                f"{sorted(short)[:5]} ({len(short)} in all)",
                stage=Stage.UNMASKING,
                clients=short,
            )
        # Reconstruct and check every secret before touching the sum, so a bad share aborts
        # the round cleanly instead of leaving a half-unmasked vector behind.
        try:
            self_seeds = [shamir.combine_shares(self._b_shares[u], t) for u in sorted(u3)]
            mask_keys = {u: shamir.combine_shares(self._s_shares[u], t) for u in sorted(dropped)}
            bad = [
                u for u, sk in mask_keys.items()
                if crypto.public_key_from_private(sk) != self._keys[u][1]
            ]
            if bad:
                raise ProtocolError(f"reconstructed mask keys of {bad[:5]} do not match")
            pair_seeds = {
                u: crypto.agree_many(
                    sk,
                    {v: self._keys[v][1] for v in sorted(self._live(u, u3))},
                    salt=self._session,
                    info=lambda v, u=u: _MASK_INFO + _pair(u, v),
                )
                for u, sk in mask_keys.items()
            }
        except ProtocolError as exc:
            self._abort()
            msg = f"round aborted at unmasking: {exc}"
            raise SecAggAborted(msg, stage=Stage.UNMASKING) from exc
        total = self._sum
        scratch = np.empty_like(total)
        for seed in self_seeds:
            total -= crypto.keystream_into(seed, scratch)
        for u, seeds in pair_seeds.items():
            for v, seed in seeds.items():
                crypto.keystream_into(seed, scratch)
                # v added Delta_{v,u} PRG(s_{v,u}); take it back out
                if v > u:
                    total -= scratch
                else:
                    total += scratch
        total &= ring_mask(p.bits)
        self._result = total
        self._b_shares, self._s_shares = {}, {}
        self._stage = Stage.DONE
