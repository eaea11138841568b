"""Error feedback: carry what compression dropped into the next round.

Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory" (NeurIPS 2018) and Karimireddy, Rebjock,
Stich, Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes" (ICML 2019):

    p_t    = x_t + e_{t-1}
    sent_t = decode(encode(p_t))
    e_t    = p_t - sent_t

so that ``Σ_t sent_t + e_T = Σ_t x_t``: nothing the client meant to send is lost, only delayed.
The residual ``e`` lives on the client between rounds; :meth:`ErrorFeedback.state` and
:meth:`ErrorFeedback.load_state` let a client runtime persist it. The server decodes with the
plain chain — it never sees the residual.
"""

from __future__ import annotations

import numpy as np

from shoal.codec.chain import Chain, chain_of
from shoal.codec.encoded import Encoded, as_update
from shoal.errors import CodecError

__all__ = ["ErrorFeedback", "feedback_step"]


def feedback_step(
    chain: Chain, residual: np.ndarray | None, x: np.ndarray, rng: np.random.Generator
) -> tuple[Encoded, np.ndarray]:
    """One error-feedback round, pure: returns ``(encoded, new_residual)``.

    Args:
        chain: the compressor.
        residual: the residual from the previous round, or ``None`` on the first round.
        x: this round's update (finite 1-D float vector).
        rng: drives stochastic stages.

    Raises:
        CodecError: non-finite ``x``, or ``residual`` of another length than ``x``.
    """
    x32 = as_update(x)
    if residual is None:
        p = x32.copy()
    elif residual.shape != x32.shape:
        raise CodecError(f"error feedback: residual has {residual.size} entries, update has {x32.size}")
    else:
        p = x32 + residual.astype(np.float32, copy=False)
        if not np.isfinite(p).all():
            raise CodecError("error feedback: update plus residual overflows float32")
    encoded = chain.encode(p, rng)
    sent = chain.decode(encoded)
    return encoded, p - sent


class ErrorFeedback:
    """Stateful client-side wrapper: ``encode(x, rng)`` compresses ``x`` plus the carried residual.

    Not thread-safe; one instance per client (and per model). ``decode`` is the chain's.
    """

    __slots__ = ("chain", "_residual")

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self._residual: np.ndarray | None = None

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Encoded:
        """Encode ``x + residual`` and keep ``residual ← x + residual − sent``.

        Raises:
            CodecError: as :func:`feedback_step`; the residual is then left unchanged.
        """
        encoded, self._residual = feedback_step(self.chain, self._residual, x, rng)
        return encoded

    def decode(self, e: Encoded) -> np.ndarray:
        """What the server reconstructs (the chain's decode)."""
        return self.chain.decode(e)

    @property
    def residual(self) -> np.ndarray | None:
        """A copy of the carried residual (``None`` before the first round)."""
        return None if self._residual is None else self._residual.copy()

    def state(self) -> dict[str, object]:
        """A persistable snapshot: ``{"chain": spec, "residual": float32 array or None}``."""
        return {"chain": self.chain.spec, "residual": self.residual}

    def load_state(self, state: dict[str, object]) -> None:
        """Restore a snapshot from :meth:`state`.

        Raises:
            CodecError: the snapshot was taken with another (or an invalid) chain, or its
                residual is not a finite 1-D float32 vector.
        """
        spec = state.get("chain")
        if not isinstance(spec, (tuple, list)) or chain_of(spec) != self.chain:
            raise CodecError(f"error feedback: state is for chain {spec!r}, not {list(self.chain.spec)}")
        residual = state.get("residual")
        if residual is None:
            self._residual = None
            return
        if not isinstance(residual, np.ndarray) or residual.dtype != np.float32:
            raise CodecError("error feedback: state residual must be a float32 numpy array")
        self._residual = as_update(residual).copy()

    def reset(self) -> None:
        """Drop the residual (e.g. after the model architecture changed)."""
        self._residual = None
