"""Sans-I/O SecAgg / SecAgg+ client state machine: one client's side of one round.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), with the neighbourhoods of Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (CCS 2020): each client masks pairwise with, and Shamir-shares its
secrets to, only its k neighbours in a random Harary graph (k = n - 1 gives the original
protocol). The server side is :mod:`shoal.privacy.secagg_server`; what both sides agree on
(roster, graph, key labels) is :mod:`shoal.privacy.secagg_session`.

The machine does no I/O, keeps no clock and starts no thread: it takes the server's protocol
messages (:mod:`shoal.privacy.secagg_messages`) and returns its replies. A message that is out
of order, duplicated, malformed or from another round raises :class:`~shoal.errors.ProtocolError`
and leaves the client unchanged; too few neighbours to continue raises :class:`SecAggAborted`
and wipes the client's secrets. Keys are fresh per round: a machine serves exactly one round.

Masked input of client u (pairs signed by id, Delta = +1 if u > v else -1)::

    y_u = x_u + PRG(b_u) + sum_{v in N(u) & U2} Delta_{u,v} PRG(s_{u,v})   (mod 2^b)

Shares go to the k neighbours only (no share of one's own secrets, unlike the original paper
and FCP's self-edge), so every reconstruction needs t of a client's neighbours, t <= k.

A client never lets the server hold both kinds of share of one peer: it refuses an unmask
request naming a peer in both lists, and answers one request per round only.

Cost: a client expands k + 1 AES-CTR masks of length d (O(k d)).

Post-quantum rounds (``params.post_quantum``): each client also advertises an ML-KEM-768 key
and, when sharing keys, encapsulates to each neighbour; the shares it sends v are sealed under
HKDF(X25519 secret || its KEM secret to v), and the pair's mask seed is HKDF(X25519 mask secret
|| K_uv), K_uv derived from both directions' KEM secrets. Shamir shares rebuild the X25519
half of a dropped client's pair keys but not K_uv, so in Unmasking each survivor also reveals
K_uv for its dropped neighbours (never for one whose self-mask share it reveals): a survivor
that vanishes during unmasking can then leave a dropped neighbour's masks unremovable, and the
round aborts -- the price of hybrid keys.
"""

from __future__ import annotations

import numpy as np

from shoal.errors import ProtocolError
from shoal.privacy import crypto, shamir
from shoal.privacy.secagg_encoding import ring_dtype, ring_mask
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
from shoal.privacy.secagg_session import (
    ENC_INFO,
    ENC_PQ_INFO,
    KEM_PAIR_INFO,
    MASK_INFO,
    MASK_PQ_INFO,
    SESSION_BYTES,
    Roster,
    directed_bytes,
    pair_bytes,
    share_ad,
)

__all__ = ["SecAggClient"]


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
        for name in ("_enc", "_mask_key", "_self_seed", "_held", "_pair_enc_keys", "_kem",
                     "_kem_out", "_pair_kem"):
            self.__dict__.pop(name, None)

    def _abort(self, reason: str, stage: Stage) -> SecAggAborted:
        self.abort()
        return SecAggAborted(f"client {self.client_id}: {reason}", stage=stage)

    # AdvertiseKeys -------------------------------------------------------------------------
    def _advertise(self, msg: RoundSetup) -> KeyAdvertisement:
        p = msg.params
        if len(msg.session) < SESSION_BYTES:
            raise ProtocolError(f"session nonce must be >= {SESSION_BYTES} bytes", party="server")
        roster = Roster(tuple(msg.roster), p, msg.graph_seed)
        if self.client_id not in roster:
            raise ProtocolError(f"client {self.client_id} is not on the roster", party="server")
        if self._vector is not None:
            self._check_input(self._vector, p)
        self._params, self._roster, self._session = p, roster, msg.session
        self._neighbours = roster.neighbours(self.client_id)
        self._enc, self._mask_key = crypto.generate_keypair(), crypto.generate_keypair()
        kem_public = b""
        if p.post_quantum:
            self._kem = crypto.kem_keypair()
            kem_public = self._kem.public
        self._stage = Stage.ADVERTISE_KEYS
        return KeyAdvertisement(
            self._session, self.client_id, self._enc.public, self._mask_key.public, kem_public
        )

    # ShareKeys -----------------------------------------------------------------------------
    def _share_keys(self, msg: KeyDirectory) -> EncryptedShares:
        peers = dict(msg.keys)
        stray = set(peers) - self._neighbours
        if stray:
            raise ProtocolError(
                f"key directory lists non-neighbours {sorted(stray)}", party="server"
            )
        pq = self._params.post_quantum
        for v, keys in peers.items():
            if len(keys) != (3 if pq else 2) \
                    or any(len(k) != crypto.KEY_BYTES for k in keys[:2]) \
                    or (pq and len(keys[2]) != crypto.KEM_PUBLIC_BYTES):
                raise ProtocolError(f"malformed public keys for client {v}", party="server")
        if len(peers) < self._params.threshold:
            raise self._abort(
                f"only {len(peers)} neighbours advertised keys, threshold is "
                f"{self._params.threshold}",
                Stage.SHARE_KEYS,
            )
        pair_keys = crypto.agree_many(
            self._enc.private,
            {v: keys[0] for v, keys in peers.items()},
            salt=self._session,
            info=lambda v: ENC_INFO + pair_bytes(self.client_id, v),
        )
        self_seed = crypto.random_bytes(crypto.KEY_BYTES)
        order = sorted(peers)
        xs = [self._roster.x(v) for v in order]
        t = self._params.threshold
        b_shares = shamir.split_secret(self_seed, t, xs)
        s_shares = shamir.split_secret(self._mask_key.private, t, xs)
        seal_keys, kem_cts, self._kem_out = pair_keys, {v: b"" for v in order}, {}
        if pq:  # one encapsulation to each neighbour: half of the key that seals its shares
            seal_keys = {}
            for v in order:
                self._kem_out[v], kem_cts[v] = crypto.kem_encapsulate(peers[v][2])
                seal_keys[v] = crypto.hybrid_key(
                    pair_keys[v], self._kem_out[v], salt=self._session,
                    info=ENC_PQ_INFO + directed_bytes(self.client_id, v))
        ciphertexts = {
            v: kem_cts[v] + crypto.encrypt(
                seal_keys[v], b.y_bytes() + s.y_bytes(), share_ad(self._session, self.client_id, v)
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
        pq, u = self._params.post_quantum, self.client_id
        pair_kem: dict[int, bytes] = {}  # kept only if the whole message checks out
        for v, ct in msg.ciphertexts.items():
            key = self._pair_enc_keys[v]
            if pq:  # v's encapsulation to us, then the shares it sealed under it
                kem_ct, ct = ct[:crypto.KEM_CIPHERTEXT_BYTES], ct[crypto.KEM_CIPHERTEXT_BYTES:]
                kem_in = crypto.kem_decapsulate(self._kem.private, kem_ct)
                key = crypto.hybrid_key(key, kem_in, salt=self._session,
                                        info=ENC_PQ_INFO + directed_bytes(v, u))
                low, high = (self._kem_out[v], kem_in) if u < v else (kem_in, self._kem_out[v])
                pair_kem[v] = crypto.derive_key(
                    low + high, salt=self._session, info=KEM_PAIR_INFO + pair_bytes(u, v))
            plain = crypto.decrypt(key, ct, share_ad(self._session, v, u))
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
        seeds = crypto.agree_many(
            self._mask_key.private,
            {v: self._peer_keys[v][1] for v in sorted(held)},
            salt=self._session,
            info=lambda v: MASK_INFO + pair_bytes(u, v),
        )
        for v, seed in seeds.items():
            if pq:
                seed = crypto.hybrid_key(seed, pair_kem[v], salt=self._session,
                                         info=MASK_PQ_INFO + pair_bytes(u, v))
            crypto.keystream_into(seed, scratch)
            if u > v:
                out += scratch
            else:
                out -= scratch
        out &= ring_mask(p.bits)
        self._held, self._pair_kem = held, pair_kem
        # The client's own secrets are not needed any more; drop them and the input.
        self._vector = None
        del self._self_seed, self._mask_key, self._pair_enc_keys
        self.__dict__.pop("_kem", None)
        self.__dict__.pop("_kem_out", None)
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
            pair_kem_keys={v: self._pair_kem[v] for v in sorted(msg.dropped)}
            if self._params.post_quantum else {},
        )
        del self._held
        self.__dict__.pop("_pair_kem", None)
        self._stage = Stage.DONE
        return reply
