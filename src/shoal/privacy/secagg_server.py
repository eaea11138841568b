"""Sans-I/O SecAgg / SecAgg+ server state machine: the aggregator's side of one round.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), with the neighbourhoods of Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (CCS 2020). The server learns sum_{u in U3} x_u mod 2^b and nothing
else about the inputs. The client side is :mod:`shoal.privacy.secagg_client`; what both sides
agree on (roster, graph, key labels) is :mod:`shoal.privacy.secagg_session`.

Threat model: honest-but-curious server and clients (the paper's passive setting). The
ConsistencyCheck round and the signatures of the active setting are not implemented: a
malicious server that lies about who dropped out could ask different clients for different
share kinds of the same peer. Each client still refuses to reveal both kinds of share of one
peer to the server itself.

The machine does no I/O, keeps no clock and starts no thread: it takes the clients' protocol
messages (:mod:`shoal.privacy.secagg_messages`) and returns messages. Deadlines belong to the
caller, who decides when a stage is over by calling :meth:`SecAggServer.advance`; clients whose
messages have not arrived by then are dropouts. A message that is out of order, duplicated,
from an unknown client or from another round raises :class:`~shoal.errors.ProtocolError` and
leaves the machine unchanged. If any neighbourhood that must be reconstructed falls below the
threshold, the round raises :class:`SecAggAborted` and reveals nothing further. A machine
serves exactly one round.

The server never holds both kinds of share of one client: it asks each surviving client once,
for self-mask shares of neighbours whose input arrived and mask-key shares of those whose input
did not.

Cost: the server expands one mask per surviving client and, for each dropped client, one per
surviving neighbour (O(k d) each).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping

import numpy as np

from shoal.errors import ConfigError, ProtocolError
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
    MASK_INFO,
    MASK_PQ_INFO,
    SESSION_BYTES,
    Roster,
    pair_bytes,
    share_ciphertext_bytes,
)

__all__ = ["SecAggServer"]


class SecAggServer:
    """The server's side of one SecAgg(+) round: collect, then :meth:`advance` each stage.

    Args:
        params: the round's public parameters.
        roster: ids of the clients invited to the round.
        session: the round's nonce (fresh random 16 bytes when omitted).
        graph_seed: 32-byte seed of the neighbourhood permutation (fresh random when omitted).
        min_inputs: with fewer masked inputs the round aborts before unmasking (distributed
            DP: a sum must hold the noise of at least h + f clients); 1 for any.
    """

    def __init__(
        self,
        params: SecAggParams,
        roster: Iterable[int],
        *,
        session: bytes | None = None,
        graph_seed: bytes | None = None,
        min_inputs: int = 1,
    ) -> None:
        self.params = params
        if min_inputs < 1:
            raise ConfigError(f"min_inputs must be >= 1, got {min_inputs}", key="min_inputs")
        self._min_inputs = min_inputs
        self._session = crypto.random_bytes(SESSION_BYTES) if session is None else session
        if len(self._session) < SESSION_BYTES:
            raise ConfigError(f"session nonce must be >= {SESSION_BYTES} bytes", key="session")
        self._graph_seed = crypto.random_bytes(32) if graph_seed is None else graph_seed
        try:
            ids = tuple(sorted({int(i) for i in roster}))
            self._roster = Roster(ids, params, self._graph_seed)
        except ProtocolError as exc:
            raise ConfigError(str(exc), key="roster") from exc
        self._nbrs: dict[int, frozenset[int]] = {}
        self._stage = Stage.ADVERTISE_KEYS
        self._keys: dict[int, tuple[bytes, ...]] = {}  # U1: (enc, mask[, kem])
        self._ciphertexts: dict[int, Mapping[int, bytes]] = {}  # U2
        self._inputs: set[int] = set()  # U3
        self._sum = np.zeros(params.length, dtype=ring_dtype(params.bits))
        self._requests: dict[int, UnmaskRequest] = {}
        self._b_shares: dict[int, list[shamir.Share]] = {}
        self._s_shares: dict[int, list[shamir.Share]] = {}
        self._pair_kem: dict[tuple[int, int], bytes] = {}  # (dropped, survivor) -> K
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
        if self.params.post_quantum:
            if len(msg.kem_public) != crypto.KEM_PUBLIC_BYTES:
                raise ProtocolError(f"a post-quantum round needs a {crypto.KEM_PUBLIC_BYTES}-"
                                    f"byte ML-KEM-768 key", party=msg.sender)
            self._keys[msg.sender] = (msg.enc_public, msg.mask_public, msg.kem_public)
        elif msg.kem_public:
            raise ProtocolError("an ML-KEM key in a round that is not post-quantum",
                                party=msg.sender)
        else:
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
        size = share_ciphertext_bytes(self.params)
        if any(len(ct) != size for ct in msg.ciphertexts.values()):
            raise ProtocolError(f"ciphertexts must be {size} bytes", party=msg.sender)
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
        kem_keys = dict(msg.pair_kem_keys)
        if set(kem_keys) != (req.dropped if self.params.post_quantum else set()) \
                or any(len(k) != crypto.KEY_BYTES for k in kem_keys.values()):
            raise ProtocolError("post-quantum pair keys do not match the request",
                                party=msg.sender)
        x = self._roster.x(msg.sender)
        b = {v: shamir.Share.from_y_bytes(x, y) for v, y in msg.self_mask_shares.items()}
        s = {v: shamir.Share.from_y_bytes(x, y) for v, y in msg.mask_key_shares.items()}
        for v, share in b.items():
            self._b_shares.setdefault(v, []).append(share)
        for v, share in s.items():
            self._s_shares.setdefault(v, []).append(share)
        for v, key in kem_keys.items():
            self._pair_kem[(v, msg.sender)] = key
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
            if len(u3) < self._min_inputs:
                self._abort()
                raise SecAggAborted(
                    f"round aborted at {stage.value}: {len(u3)} masked inputs, fewer than the "
                    f"{self._min_inputs} a release needs; nothing is unmasked",
                    stage=stage,
                )
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
        self._b_shares, self._s_shares, self._ciphertexts, self._pair_kem = {}, {}, {}, {}

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
        if p.post_quantum:  # K_uv of a dropped u comes from v alone: no share rebuilds it
            missing = sorted((u, v) for u in dropped for v in self._live(u, u3)
                             if (u, v) not in self._pair_kem)
            if missing:
                self._abort()
                raise SecAggAborted(
                    f"round aborted at unmasking: {len(missing)} post-quantum pair key(s) "
                    f"missing, e.g. client {missing[0][1]} vanished holding the one it shares "
                    f"with dropped client {missing[0][0]}",
                    stage=Stage.UNMASKING,
                    clients=frozenset(v for _, v in missing),
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
                    # agree_many calls info before the next u: no default to bind u
                    info=lambda v: MASK_INFO + pair_bytes(u, v),
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
                if p.post_quantum:
                    seed = crypto.hybrid_key(seed, self._pair_kem[(u, v)],
                                             salt=self._session,
                                             info=MASK_PQ_INFO + pair_bytes(u, v))
                crypto.keystream_into(seed, scratch)
                # v added Delta_{v,u} PRG(s_{v,u}); take it back out
                if v > u:
                    total -= scratch
                else:
                    total += scratch
        total &= ring_mask(p.bits)
        self._result = total
        self._b_shares, self._s_shares, self._pair_kem = {}, {}, {}
        self._stage = Stage.DONE
