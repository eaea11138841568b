"""Secure-aggregation messages on the wire: protobuf <-> the protocol's dataclasses.

The state machines (:mod:`shoal.privacy.secagg_client`, :mod:`shoal.privacy.secagg_server`) and
the device round (:mod:`shoal.device_secagg`) speak in :mod:`shoal.privacy.secagg_messages`
dataclasses; the ``SecAgg`` RPC carries them as the ``SecAgg*`` messages of
``proto/shoal.proto``. Everything that arrives is checked here for shape (sizes, ids in range)
before it becomes a dataclass; the machines then check the protocol (sessions, senders,
recipients, ciphertexts). A masked input travels as ``ceil(bits/8)`` little-endian bytes per
ring element (:func:`~shoal.privacy.secagg_encoding.pack_ring`), after a header with its size
and SHA-256. The setup names the round's encoding: the fixed point, or the rotated ring of
:mod:`shoal.privacy.rotated_encoding` (compression, and distributed DP's noise shares) whose
rotation every device derives from the session nonce.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from shoal.device_secagg import End, Wait
from shoal.errors import ConfigError, ProtocolError
from shoal.privacy.ddg import MAX_DIM
from shoal.privacy.rotated_encoding import RotatedQuantization, RoundEncoding
from shoal.privacy.rotation import BLOCK, block_size, rotation_seed
from shoal.privacy.secagg_encoding import FixedPoint, RingEncoding
from shoal.privacy.secagg_messages import (
    ClientMessage,
    EncryptedShares,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    RoundSetup,
    SecAggParams,
    ServerMessage,
    ShareDelivery,
    UnmaskingShares,
    UnmaskRequest,
)
from shoal.transport.proto import shoal_pb2 as pb

__all__ = ["client_body", "message_from_header", "reply_from_pb", "reply_to_pb"]

_MAX_ID = (1 << 63) - 1


def _ids(values: Iterable[int], what: str) -> frozenset[int]:
    out = frozenset(int(v) for v in values)
    if any(v > _MAX_ID for v in out):
        raise ProtocolError(f"{what}: client id out of range")
    return out


def _bytes_map(m: Mapping[int, bytes], what: str) -> dict[int, bytes]:
    out = {int(k): bytes(v) for k, v in m.items()}
    if any(k > _MAX_ID for k in out):
        raise ProtocolError(f"{what}: client id out of range")
    return out


# -- server -> device -------------------------------------------------------------------------

def _encoding_fields(encoding: RingEncoding) -> dict:
    """``SecAggSetup`` fields of a round's encoding: the fixed point's range, or the rotated
    ring's parameters (its seed is not sent: devices derive it from the session)."""
    if isinstance(encoding, RoundEncoding):
        p = encoding.params
        return {"max_weight": 1, "rotation": pb.SecAggRotation(
            dim=p.dim, clip=p.clip, gamma=p.gamma, noise_std=p.noise_std,
            norm_bound=p.norm_bound or 0.0, block=p.block)}
    assert isinstance(encoding, FixedPoint)
    return {"clip": encoding.clip, "value_bits": encoding.value_bits,
            "max_weight": encoding.max_weight}


def _encoding_of(s: pb.SecAggSetup) -> RingEncoding:
    """A setup's encoding: the fixed point, or the rotated ring with the rotation seed of its
    session (:func:`~shoal.privacy.rotation.rotation_seed`).

    Raises:
        ConfigError: parameters out of range, or a rotated ring whose length is not the
            setup's.
    """
    if not s.HasField("rotation"):
        return FixedPoint(clip=s.clip, value_bits=s.value_bits, max_weight=s.max_weight)
    r = s.rotation
    if r.dim > MAX_DIM or r.block > BLOCK:
        raise ConfigError(f"a rotated ring of {r.dim} values in blocks of {r.block} is out of "
                          f"range", key="rotation")
    params = RotatedQuantization(dim=int(r.dim), clip=r.clip, bits=s.bits, gamma=r.gamma,
                                 noise_std=r.noise_std, norm_bound=r.norm_bound or None,
                                 block=int(r.block))
    block_size(params.dim, params.block)  # a power of two
    if params.length != s.length:
        raise ConfigError(f"the rotated ring has {params.length} elements, the setup says "
                          f"{s.length}", key="length")
    return RoundEncoding(params, rotation_seed(bytes(s.session)))


def reply_to_pb(reply: ServerMessage | Wait | End, *, client_id: int,
                encoding: RingEncoding | None, retry_after: float = 0.0) -> pb.SecAggReply:
    """The protobuf reply for a device (``client_id`` and ``encoding`` go with the setup)."""
    if isinstance(reply, Wait):
        return pb.SecAggReply(wait=pb.SecAggWait(stage=reply.stage, retry_after=retry_after))
    if isinstance(reply, End):
        return pb.SecAggReply(end=pb.SecAggEnd(outcome=reply.outcome, detail=reply.detail))
    if isinstance(reply, RoundSetup):
        p = reply.params
        assert encoding is not None
        return pb.SecAggReply(setup=pb.SecAggSetup(
            session=reply.session, roster=list(reply.roster), graph_seed=reply.graph_seed,
            neighbours=p.neighbours, threshold=p.threshold, bits=p.bits, length=p.length,
            client_id=client_id, post_quantum=p.post_quantum, **_encoding_fields(encoding)))
    if isinstance(reply, KeyDirectory):
        return pb.SecAggReply(key_directory=pb.SecAggKeyDirectory(
            session=reply.session,
            keys={v: pb.SecAggKeys(enc_public=k[0], mask_public=k[1],
                                   kem_public=k[2] if len(k) > 2 else b"")
                  for v, k in reply.keys.items()}))
    if isinstance(reply, ShareDelivery):
        return pb.SecAggReply(share_delivery=pb.SecAggShares(
            session=reply.session, ciphertexts=dict(reply.ciphertexts)))
    if isinstance(reply, UnmaskRequest):
        return pb.SecAggReply(unmask_request=pb.SecAggUnmaskRequest(
            session=reply.session, survivors=sorted(reply.survivors),
            dropped=sorted(reply.dropped)))
    raise TypeError(f"not a server message: {type(reply).__name__}")


def reply_from_pb(reply: pb.SecAggReply
                  ) -> tuple[ServerMessage | Wait | End | pb.UploadReply, int,
                             RingEncoding | None]:
    """``(message, client id, encoding)`` from a reply; the id and the encoding come with a
    setup only (``-1`` and ``None`` otherwise). A refusal comes back as its ``UploadReply``.

    Raises:
        ProtocolError: an empty or malformed reply.
    """
    kind = reply.WhichOneof("reply")
    if kind == "wait":
        return Wait(reply.wait.stage), -1, None
    if kind == "end":
        return End(reply.end.outcome, reply.end.detail), -1, None
    if kind == "refused":
        return reply.refused, -1, None
    if kind == "setup":
        s = reply.setup
        try:
            params = SecAggParams(neighbours=s.neighbours, threshold=s.threshold, bits=s.bits,
                                  length=s.length, post_quantum=s.post_quantum)
            encoding = _encoding_of(s)
        except ConfigError as exc:
            raise ProtocolError(f"malformed secure-aggregation setup: {exc}",
                                party="aggregator") from None
        roster = tuple(sorted(_ids(s.roster, "roster")))
        return (RoundSetup(bytes(s.session), roster, bytes(s.graph_seed), params),
                int(s.client_id), encoding)
    if kind == "key_directory":
        k = reply.key_directory
        # a post-quantum round's directory also carries each neighbour's ML-KEM key; the
        # client machine checks that every entry has the shape its round expects
        keys = {int(v): (bytes(pk.enc_public), bytes(pk.mask_public),
                         *((bytes(pk.kem_public),) if pk.kem_public else ()))
                for v, pk in k.keys.items()}
        _ids(keys, "key directory")
        return KeyDirectory(bytes(k.session), keys), -1, None
    if kind == "share_delivery":
        d = reply.share_delivery
        return (ShareDelivery(bytes(d.session), _bytes_map(d.ciphertexts, "share delivery")),
                -1, None)
    if kind == "unmask_request":
        u = reply.unmask_request
        return (UnmaskRequest(bytes(u.session), _ids(u.survivors, "survivors"),
                              _ids(u.dropped, "dropped")), -1, None)
    raise ProtocolError("empty secure-aggregation reply", party="aggregator")


# -- device -> server -------------------------------------------------------------------------

def client_body(message: ClientMessage | None, masked: bytes = b"", sha256: bytes = b""
                ) -> dict:
    """Keyword arguments for ``pb.SecAggHeader`` carrying ``message`` (``None``: a poll).
    A masked input's bytes (already packed) go in data chunks after the header."""
    if message is None:
        return {"poll": True}
    if isinstance(message, KeyAdvertisement):
        return {"keys": pb.SecAggKeys(enc_public=message.enc_public,
                                      mask_public=message.mask_public,
                                      kem_public=message.kem_public)}
    if isinstance(message, EncryptedShares):
        return {"shares": pb.SecAggShares(session=message.session,
                                          ciphertexts=dict(message.ciphertexts))}
    if isinstance(message, MaskedInput):
        return {"masked": pb.SecAggMaskedHeader(session=message.session,
                                                total_size=len(masked), sha256=sha256)}
    if isinstance(message, UnmaskingShares):
        return {"unmasking": pb.SecAggUnmasking(
            session=message.session, self_mask_shares=dict(message.self_mask_shares),
            mask_key_shares=dict(message.mask_key_shares),
            pair_kem_keys=dict(message.pair_kem_keys))}
    raise TypeError(f"not a client message: {type(message).__name__}")


def message_from_header(header: pb.SecAggHeader, sender: int, session: bytes,
                        masked: np.ndarray | None = None) -> ClientMessage | None:
    """The client message a header carries, as sent by ``sender`` (the device's own id on
    the roster: a device cannot speak for another). ``session`` is the round's (key
    advertisements do not carry one); ``masked`` is the already-unpacked ring vector.

    Raises:
        ProtocolError: the header carries nothing usable.
    """
    kind = header.WhichOneof("body")
    if kind == "poll":
        return None
    if kind == "keys":
        return KeyAdvertisement(session, sender, bytes(header.keys.enc_public),
                                bytes(header.keys.mask_public), bytes(header.keys.kem_public))
    if kind == "shares":
        return EncryptedShares(bytes(header.shares.session), sender,
                               _bytes_map(header.shares.ciphertexts, "shares"))
    if kind == "masked":
        if masked is None:
            raise ProtocolError("masked input without its data", party=sender)
        return MaskedInput(bytes(header.masked.session), sender, masked)
    if kind == "unmasking":
        u = header.unmasking
        return UnmaskingShares(bytes(u.session), sender,
                               _bytes_map(u.self_mask_shares, "unmasking"),
                               _bytes_map(u.mask_key_shares, "unmasking"),
                               _bytes_map(u.pair_kem_keys, "unmasking"))
    raise ProtocolError("secure-aggregation header without a body", party=sender)
