"""A device's part in secure-aggregation rounds over gRPC (the device side of ``SecAgg``).

:class:`SecAggParticipant` carries the device through one round in the order of K. Bonawitz et
al., "Towards Federated Learning at Scale: System Design" (MLSys 2019): fetch the setup,
advertise keys, share keys, *train while the stage closes*, send the masked input, reveal the
requested shares. The protocol is the :class:`~shoal.privacy.secagg_client.SecAggClient` state
machine; this module turns its messages into ``SecAgg``/``SecAggStep`` requests and the replies
back (:mod:`shoal.transport.secagg_wire`). The update never leaves the device unmasked.

The setup names the encoding: the fixed point, or the rotated ring
(:func:`~shoal.privacy.rotated_encoding.privatize_and_encode`: clip, rotate with the seed of
the session, round, and under distributed DP add this device's discrete Gaussian share). Its
random coins come from a :class:`~shoal.privacy.csprng.CryptoRandom` keyed from
``os.urandom``, never from a seeded generator.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable

import numpy as np

from shoal.device_secagg import End, Wait
from shoal.errors import ConfigError, ProtocolError, ShoalError
from shoal.privacy.secagg_client import SecAggClient
from shoal.privacy.csprng import CryptoRandom
from shoal.privacy.secagg_encoding import RingEncoding, pack_ring
from shoal.privacy.secagg_messages import (ClientMessage, EncryptedShares, KeyAdvertisement,
                                           MaskedInput, RoundSetup, SecAggAborted,
                                           ServerMessage, UnmaskingShares)
from shoal.transport.device_api import ClientStats, TaskAbandoned, TrainResult
from shoal.transport.proto import shoal_pb2 as pb
from shoal.transport.secagg_wire import client_body, reply_from_pb

__all__ = ["SecAggParticipant"]

# the secure-aggregation stage a device message completes (for after_stage)
_SENT_AT = {KeyAdvertisement: "advertise_keys", EncryptedShares: "share_keys",
            MaskedInput: "masked_input", UnmaskingShares: "unmasking"}


class SecAggParticipant:
    """One device's side of secure-aggregation rounds, one round per :meth:`run`.

    Args:
        device_id: this device.
        send: ``send(header, masked)`` makes one RPC and returns the server's
            ``SecAggReply``: the streaming ``SecAgg`` call carrying ``masked`` (a packed
            masked input) when it is non-empty, the unary ``SecAggStep`` otherwise. A failed
            call raises :class:`~shoal.transport.device_api.TaskAbandoned`.
        train: ``train(params, task)``, the runtime's checked local training.
        stats: the runtime's counters; ``rounds_trained``, ``uploads_accepted`` and
            ``secagg`` are updated in place.
        log: the runtime's logger.
        after_stage: called as ``after_stage(stage, round)`` once the server has taken this
            device's message for a stage (see :class:`~shoal.transport.client.DeviceClient`).
        min_noise: the least distributed-DP noise this device adds, as its noise share's
            standard deviation over the clip norm C: a round whose setup asks for less
            (or for no noise at all) is refused before anything is sent. The server chooses
            the share; without a floor a dishonest server could ask for none. 0: no floor.
    """

    def __init__(self, device_id: str, *,
                 send: Callable[[pb.SecAggHeader, bytes], pb.SecAggReply],
                 train: Callable[[np.ndarray, pb.Task], TrainResult], stats: ClientStats,
                 log: logging.Logger,
                 after_stage: Callable[[str, int], None] | None = None,
                 min_noise: float = 0.0) -> None:
        if not (math.isfinite(min_noise) and min_noise >= 0):
            raise ConfigError(f"min_noise must be finite and >= 0, got {min_noise!r}",
                              key="min_noise")
        self.device_id = device_id
        self.min_noise = min_noise
        self._send, self._train = send, train
        self._stats, self._log, self._after_stage = stats, log, after_stage

    def run(self, task: pb.Task, params: np.ndarray) -> None:
        """Take part in the round of ``task`` with the downloaded model ``params``.

        Any refusal or protocol error ends this device's part in the round (the server
        recovers from its absence); the runtime then checks in again. How the round ended is
        counted in ``stats.secagg``.

        Raises:
            TaskAbandoned: the server's messages were out of order or malformed, a call
                failed, or the update cannot be contributed (no examples, not encodable).
        """
        client: SecAggClient | None = None
        encoding: RingEncoding | None = None
        message = None
        while True:
            sent = message
            reply, cid, setup_encoding = self._call(task, message, client)
            message = None
            if sent is not None and not isinstance(reply, pb.UploadReply):
                stage = _SENT_AT[type(sent)]
                self._log.info("round %d: secure aggregation: %s sent", task.round, stage)
                if self._after_stage is not None:
                    self._after_stage(stage, int(task.round))
                if isinstance(sent, EncryptedShares):
                    self._train_into(client, encoding, params, task)
            if isinstance(reply, Wait):
                continue  # the server held the call already (long poll); ask again
            if isinstance(reply, End):
                self._outcome(task, reply.outcome, reply.detail)
                return
            if isinstance(reply, pb.UploadReply):
                self._outcome(task, f"refused:{reply.reason}", reply.detail)
                return
            if isinstance(reply, RoundSetup):
                self._check_noise(task, setup_encoding)
                client, encoding = SecAggClient(cid), setup_encoding
            if client is None:
                raise TaskAbandoned(
                    f"secure aggregation: {type(reply).__name__} before the setup")
            try:
                message = client.handle(reply)
            except SecAggAborted as exc:
                self._outcome(task, "aborted", str(exc))
                return
            except ProtocolError as exc:
                client.abort()
                raise TaskAbandoned(f"secure aggregation: refused the server's message: {exc}"
                                    ) from None

    def _check_noise(self, task: pb.Task, encoding: RingEncoding | None) -> None:
        """Refuse a round that asks for less noise than :attr:`min_noise` (before the
        device has advertised its keys: the server learns only that it declined)."""
        if self.min_noise <= 0:
            return
        params = getattr(encoding, "params", None)
        # noise_std is in grid units of gamma: the share's std in real units over C
        asked = 0.0 if params is None else params.noise_std * params.gamma / params.clip
        if asked < self.min_noise:
            self._outcome(task, "refused:noise_below_floor", "")
            raise TaskAbandoned(
                f"secure aggregation: the round asks each device for noise of std "
                f"{asked:.4g} x C, below this device's floor of {self.min_noise:g} x C "
                f"(--min-noise)")

    def _train_into(self, client: SecAggClient, encoding: RingEncoding, params: np.ndarray,
                    task: pb.Task) -> None:
        """Train, encode the update into the round's ring, hand it to the client machine."""
        result = self._train(params, task)
        if result.num_examples < 1:
            client.abort()
            raise TaskAbandoned("no training examples: nothing to contribute")
        weight = min(int(result.num_examples), encoding.max_weight)
        try:
            # rounding coins and (distributed DP) the noise share from a CSPRNG keyed by
            # os.urandom: whoever could predict them could strip the noise from the sum
            vector = encoding.encode(np.asarray(result.delta), weight, client.params.bits,
                                     CryptoRandom())
        except ShoalError as exc:  # e.g. a diverged (non-finite) update: never send it
            client.abort()
            raise TaskAbandoned(f"update cannot be encoded: {exc}") from None
        client.set_input(vector)
        self._stats.rounds_trained += 1

    def _outcome(self, task: pb.Task, outcome: str, detail: str) -> None:
        self._stats.secagg[outcome] = self._stats.secagg.get(outcome, 0) + 1
        if outcome == "done":
            self._stats.uploads_accepted += 1
        level = logging.INFO if outcome in ("done", "dropped") else logging.WARNING
        self._log.log(level, "round %d: secure aggregation %s: %s", task.round, outcome, detail)

    def _call(self, task: pb.Task, message: ClientMessage | None, client: SecAggClient | None
              ) -> tuple[ServerMessage | Wait | End | pb.UploadReply, int,
                         RingEncoding | None]:
        """One SecAgg RPC carrying ``message`` (``None``: a poll); returns
        ``(reply, client id, encoding)`` as :func:`~shoal.transport.secagg_wire.reply_from_pb`
        decodes it (the id and the encoding come with the setup only)."""
        data, digest = b"", b""
        if isinstance(message, MaskedInput):
            assert client is not None
            data = pack_ring(message.masked, client.params.bits)
            digest = hashlib.sha256(data).digest()
        header = pb.SecAggHeader(device_id=self.device_id, round=task.round,
                                 base_version=task.model_version, upload_key=task.upload_key,
                                 **client_body(message, data, digest))
        reply = self._send(header, data)
        try:
            return reply_from_pb(reply)
        except ProtocolError as exc:
            raise TaskAbandoned(f"secure aggregation: {exc}") from None
