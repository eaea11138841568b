"""The model store's argument checks: what a commit, promotion or rollback refuses before it
touches the disk (a :class:`~shoal.errors.ConfigError` naming the argument)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import numpy as np

from shoal.errors import ConfigError, int_at_least

__all__ = ["Signatures", "check_metrics", "check_now", "check_reason",
           "check_rounds", "check_signatures"]

#: ``sign(version id, plan)`` -> kind -> ``{"header": ..., "signature": ...}``: what a commit
#: calls to sign the version it is writing (the store does not know keys or schemes).
Signatures: TypeAlias = Callable[[int, Mapping[str, Any] | None],
                                 Mapping[str, Mapping[str, str]]]
_KINDS = ("model", "plan")


def check_rounds(rounds: object, round: int) -> tuple[int, int]:
    if rounds is None:
        return (round, round)
    if not isinstance(rounds, (tuple, list)) or len(rounds) != 2:
        raise ConfigError(f"rounds must be (first, last), got {rounds!r}", key="rounds")
    first = int_at_least(rounds[0], "rounds[0]", 0)
    last = int_at_least(rounds[1], "rounds[1]", first)
    if last != round:
        raise ConfigError(f"rounds must end at round {round}, got {rounds!r}", key="rounds")
    return (first, last)


def check_reason(reason: object) -> str:
    if not isinstance(reason, str):
        raise ConfigError(f"reason must be a string, got {reason!r}", key="reason")
    return reason


def check_now(now: object) -> float:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ConfigError(f"now must be a finite number of seconds, got {now!r}", key="now")
    return float(now)


def check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"metrics must be a mapping, got {type(metrics).__name__}",
                          key="metrics")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"metric names must be non-empty strings, got {name!r}",
                              key="metrics")
        if isinstance(value, (np.integer, np.floating)):
            value = value.item()  # evaluation code often hands back numpy scalars
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ConfigError(f"metric {name!r} must be a finite number, got {value!r}",
                              key=f"metrics.{name}")
        out[name] = value
    return out


def check_signatures(signatures: object) -> dict[str, dict[str, str]]:
    """Signatures as the index keeps them: kind (``model`` or ``plan``) -> ``{"header": an
    ASCII JSON text, "signature": hex}``. Their cryptographic validity is the receiver's to
    check; here only their form."""
    if not isinstance(signatures, Mapping):
        raise ConfigError(f"signatures must map a kind to a signature, got "
                          f"{type(signatures).__name__}", key="signatures")
    out: dict[str, dict[str, str]] = {}
    for kind, sig in signatures.items():
        ok = kind in _KINDS and isinstance(sig, Mapping) and set(sig) == {"header",
                                                                          "signature"}
        if ok:
            header, hexsig = sig["header"], sig["signature"]
            ok = (isinstance(header, str) and header.isascii() and 0 < len(header) <= 4096
                  and isinstance(hexsig, str) and 0 < len(hexsig) <= 16384)
            try:
                bytes.fromhex(hexsig if ok else "")
            except ValueError:
                ok = False
        if not ok:
            raise ConfigError(f"signature of {kind!r} must be a kind in {_KINDS} mapped to "
                              f"{{'header': ASCII text, 'signature': hex}}",
                              key="signatures")
        out[kind] = {"header": header, "signature": hexsig}
    return out
