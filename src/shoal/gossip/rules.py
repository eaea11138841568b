"""How a peer combines the models it receives: the weighted average of W, or a robust rule.

:class:`Weighted` is plain gossip: ``x_i <- sum_j W_ij y_j``, with the weight of a neighbour
whose model did not arrive given back to the peer itself (the row still sums to 1).

:class:`TrimmedMean` is a Byzantine-resilient screening in the manner of BRIDGE-T (Fang, Yang
and Bajwa, "BRIDGE: Byzantine-Resilient Decentralized Gradient Descent", IEEE Transactions on
Signal and Information Processing over Networks, 2022): per coordinate, the ``trim`` largest
and ``trim`` smallest of the peer's own value and its neighbours' values are dropped and the
rest averaged, unweighted. If at most ``trim`` of a peer's neighbours are Byzantine, every
kept value lies between two honest values, so the result stays inside the coordinate-wise
range of the honest models: a Byzantine neighbour cannot pull an honest peer outside it,
whatever it sends. The price: the average of the models is no longer preserved, and the
peer needs at least ``2 trim + 1`` values (itself included) to mix at all.

:func:`trimmed_mean` is the one implementation, used by the sans-I/O node (one peer's values,
``(m, D)``) and the vectorized simulator (a group of peers, ``(k, m, D)``) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shoal.errors import ConfigError

__all__ = ["Weighted", "TrimmedMean", "MixingRule", "trimmed_mean", "rule_from_name"]


@dataclass(frozen=True)
class Weighted:
    """Plain gossip averaging with the weights of W."""

    name = "weighted"
    trim = 0


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean of the peer's own model and its neighbours'.

    Attributes:
        trim: values dropped at each end per coordinate (the number of Byzantine neighbours
            tolerated), >= 1.

    Raises:
        ConfigError: ``trim`` < 1.
    """

    trim: int = 1
    name = "trimmed_mean"

    def __post_init__(self) -> None:
        if isinstance(self.trim, bool) or not isinstance(self.trim, int) or self.trim < 1:
            raise ConfigError(f"gossip.trim must be an integer >= 1, got {self.trim!r}",
                              key="gossip.trim")

    @property
    def least_values(self) -> int:
        """Values (own included) needed to mix: ``2 trim + 1``."""
        return 2 * self.trim + 1


MixingRule = Weighted | TrimmedMean


def rule_from_name(name: str, trim: int = 1) -> MixingRule:
    """``"weighted"`` or ``"trimmed_mean"`` (with ``trim``).

    Raises:
        ConfigError: another name.
    """
    if name == "weighted":
        return Weighted()
    if name == "trimmed_mean":
        return TrimmedMean(trim)
    raise ConfigError(f"gossip.rule must be 'weighted' or 'trimmed_mean', got {name!r}",
                      key="gossip.rule")


def trimmed_mean(values: np.ndarray, trim: int) -> np.ndarray:
    """Per coordinate, the mean of ``values`` along axis -2 after dropping the ``trim``
    largest and ``trim`` smallest.

    Args:
        values: ``(..., m, D)`` with ``m > 2 trim``.
        trim: >= 0.

    Returns:
        ``(..., D)`` in the dtype of ``values`` (accumulated in float64).

    Raises:
        ValueError: ``m <= 2 trim``.
    """
    m = values.shape[-2]
    if m <= 2 * trim:
        raise ValueError(f"a trimmed mean dropping {trim} at each end needs more than "
                         f"{2 * trim} values, got {m}")
    kept = np.sort(values, axis=-2)[..., trim:m - trim, :] if trim else values
    return kept.mean(axis=-2, dtype=np.float64).astype(values.dtype, copy=False)
