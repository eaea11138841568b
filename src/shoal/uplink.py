"""What travels between a client and the aggregator, and what it costs in bytes.

:class:`Uplink` is the client side of an upload: optional local differential privacy (clip
and noise the update), then the configured codec chain with optional error feedback (the
residual of what compression dropped stays on the client and joins the next round's update),
then the self-describing wire format. The aggregator side parses and validates the bytes back
into a vector (:func:`shoal.codec.from_bytes`). The simulator runs both sides in process
(:meth:`Uplink.process`); a deployed device runs the client side (:meth:`Uplink.encode`, the
same chain and residual rule), so the bytes the simulator counts are the bytes a deployment
sends.

:class:`Downlink` is the server side of model downloads: the full model, or an exact delta
against the version the client last synced when that is smaller (falling back to the full
model when the client is unknown or too far behind), entropy-coded. It counts the bytes of
:func:`shoal.codec.smallest_download`, the rule the gRPC server's publisher sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shoal.codec import (Chain, ModelHistory, feedback_step, from_bytes, require_lossless,
                         smallest_download, to_bytes)
from shoal.codec.encoded import Encoded
from shoal.errors import ConfigError
from shoal.privacy.dp import LocalDP

__all__ = ["Uplink", "Downlink", "raw_wire_size"]

def raw_wire_size(dim: int) -> int:
    """Bytes of an uncompressed float32 update of ``dim`` values in shoal's wire format."""
    x = np.zeros(dim, dtype=np.float32)
    return len(to_bytes(Chain([]).encode(x, np.random.default_rng(0))))


class Uplink:
    """Client-side processing of updates before upload, for any number of clients.

    Per-client state (the error-feedback residual) is kept by client id: a device holds one
    entry, the simulator one per client that has trained so far.

    Args:
        dim: update length.
        codec: the upload chain (``Chain([])`` = raw float32).
        error_feedback: carry each client's compression residual into its next update.
        local_dp: clip and noise each update on the client first (local placement).
    """

    def __init__(self, dim: int, codec: Chain | None = None, error_feedback: bool = False,
                 local_dp: LocalDP | None = None) -> None:
        self.dim = dim
        self.codec = codec if codec is not None else Chain([])
        self.error_feedback = error_feedback
        self.local_dp = local_dp
        self.residuals: dict[int, np.ndarray] = {}
        self._raw_size = raw_wire_size(dim)

    @property
    def identity(self) -> bool:
        """True when uploads are the raw update (nothing to do but count bytes)."""
        return not self.codec.stages and self.local_dp is None

    def encode(self, client_id: int, delta: np.ndarray, rng: np.random.Generator) -> bytes:
        """Client side of one upload: [local DP →] chain [with error feedback] → wire bytes.

        With error feedback the client's residual becomes what this upload leaves out.

        Raises:
            CodecError: ``delta`` (plus the residual) is not a finite 1-D float vector; the
                residual is then left unchanged.
        """
        x = delta
        if self.local_dp is not None:
            x, _ = self.local_dp.privatize(x, rng)
        encoded: Encoded
        if self.error_feedback:
            encoded, self.residuals[client_id] = feedback_step(
                self.codec, self.residuals.get(client_id), x, rng)
        else:
            encoded = self.codec.encode(x, rng)
        return to_bytes(encoded)

    def process(self, client_id: int, delta: np.ndarray, rng: np.random.Generator
                ) -> tuple[np.ndarray, int]:
        """Client side then server side of one upload.

        Returns:
            ``(received, nbytes)``: the vector the aggregator decodes from the wire, and the
            size of the wire payload.
        """
        if self.identity:
            return delta, self._raw_size
        blob = self.encode(client_id, delta, rng)
        return from_bytes(blob, max_elements=self.dim), len(blob)

    def process_rows(self, client_ids: Sequence[int] | np.ndarray, deltas: np.ndarray,
                     rngs: Sequence[np.random.Generator]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`process` for each row of ``deltas`` (in place when rows change)."""
        sizes = np.full(len(client_ids), self._raw_size, dtype=np.int64)
        if self.identity:
            return deltas, sizes
        for i, (cid, rng) in enumerate(zip(client_ids, rngs)):
            deltas[i], sizes[i] = self.process(int(cid), deltas[i], rng)
        return deltas, sizes

    def state_bytes(self) -> int:
        """Memory held in per-client residuals."""
        return sum(r.nbytes for r in self.residuals.values())


@dataclass
class _Sync:
    history: ModelHistory
    synced: dict[int, int]


class Downlink:
    """Server side of model downloads: full models or deltas against each client's last sync.

    Only lossless chains (``none`` or ``zstd``) are accepted here: with a lossy download codec
    every client would train from a slightly different model, which the vectorized simulator
    does not model; a lossy download path drifts from the server's model anyway (see
    :mod:`shoal.codec.delta`).

    Args:
        dim: model length.
        mode: ``"full"`` or ``"delta"``.
        codec: lossless chain applied to what is sent.
        max_staleness: a client more than this many versions behind gets the full model.
    """

    def __init__(self, dim: int, mode: str = "full", codec: Chain | None = None,
                 max_staleness: int = 5) -> None:
        if mode not in ("full", "delta"):
            raise ConfigError(f"compression.download = {mode!r} must be 'full' or 'delta'",
                              key="compression.download")
        self.codec = require_lossless(codec if codec is not None else Chain([]))
        self.dim = dim
        self.mode = mode
        self.max_staleness = max_staleness
        self._sync = _Sync(ModelHistory(max_staleness + 1), {})
        self._raw_size = raw_wire_size(dim) if not self.codec.stages else None

    def send(self, version: int, params: np.ndarray, client_ids: Sequence[int] | np.ndarray
             ) -> np.ndarray:
        """Bytes each client downloads to get model ``version``; records that they synced.

        Clients sharing a base version share one encoding (it is the same payload).
        """
        sizes = np.empty(len(client_ids), dtype=np.int64)
        if self.mode == "full" and self._raw_size is not None:
            sizes[:] = self._raw_size
        else:
            if not self._sync.history.versions or \
                    self._sync.history.versions[-1][0] != version:
                self._sync.history = self._sync.history.push(version, params)
            cache: dict[int | None, int] = {}
            rng = np.random.default_rng(0)  # lossless chains draw nothing
            for i, c in enumerate(client_ids):
                base_version = self._sync.synced.get(int(c)) if self.mode == "delta" else None
                if base_version not in cache:
                    base = self._sync.history.get(base_version) if base_version is not None \
                        else None
                    _, blob = smallest_download(params, version, base, self.codec,
                                                self.max_staleness, rng=rng)
                    cache[base_version] = len(blob)
                sizes[i] = cache[base_version]
        for c in client_ids:
            self._sync.synced[int(c)] = version
        return sizes
