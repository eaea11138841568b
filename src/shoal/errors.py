"""The one tree of shoal's exceptions.

Every error shoal raises on purpose derives from :class:`ShoalError`, and each carries the
context a caller needs to act on it (which key, which file, which client, which round).
"""

from __future__ import annotations

import numbers

__all__ = [
    "ShoalError",
    "ConfigError",
    "int_at_least",
    "DataError",
    "SpecError",
    "UpdateRejected",
    "CodecError",
    "PrivacyError",
    "BudgetExhausted",
    "ProtocolError",
]


class ShoalError(Exception):
    """Base class of every error shoal raises deliberately."""


class ConfigError(ShoalError, ValueError):
    """A configuration key is unknown, of the wrong type or out of range.

    Attributes:
        key: dotted name of the offending key (``"client.lr"``), or ``None``.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def int_at_least(value: object, name: str, minimum: int) -> int:
    """``value`` as an ``int`` if it is an integer (Python's or numpy's, not a bool) of at
    least ``minimum``; else a :class:`ConfigError` naming ``name``: the one rule for an
    integer argument or setting."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}", key=name)
    return int(value)


class DataError(ShoalError):
    """A dataset file is missing, truncated or not what it claims to be.

    Attributes:
        path: the file concerned, or ``None``.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class SpecError(ShoalError, ValueError):
    """A flat vector or parameter dict does not match a :class:`~shoal.params.ParamSpec`."""


class UpdateRejected(ShoalError):
    """A client update was refused; nothing was changed.

    Attributes:
        reason: short machine-readable reason (``"non_finite"``, ``"wrong_shape"``, ...).
        detail: what exactly was wrong, for people.
        client_id: the client that sent it, when known.
        round: the round it was meant for, when known.
    """

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        client_id: object = None,
        round: int | None = None,
    ) -> None:
        msg = f"update rejected ({reason})"
        if client_id is not None:
            msg += f" from client {client_id}"
        if round is not None:
            msg += f" for round {round}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)
        self.reason = reason
        self.detail = detail
        self.client_id = client_id
        self.round = round


class CodecError(ShoalError, ValueError):
    """An encoded payload is truncated, corrupted or inconsistent with its header.

    Attributes:
        reason: machine-readable: ``"malformed"``, or ``"non_finite"`` for a well-formed
            payload that decodes to NaN or infinity.
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class PrivacyError(ShoalError):
    """A differential-privacy setting is invalid or cannot be accounted for."""


class BudgetExhausted(PrivacyError):
    """Running the next round would spend more privacy budget than configured.

    Attributes:
        epsilon: the epsilon that round would reach.
        budget: the configured epsilon budget.
    """

    def __init__(self, message: str, *, epsilon: float, budget: float) -> None:
        super().__init__(message)
        self.epsilon = epsilon
        self.budget = budget


class ProtocolError(ShoalError):
    """A multi-step protocol (secure aggregation, device exchange) received a message it must
    refuse: out of order, replayed, tampered with, or from an unknown party.

    Attributes:
        party: the sender concerned, when known.
    """

    def __init__(self, message: str, party: object = None) -> None:
        super().__init__(message)
        self.party = party
