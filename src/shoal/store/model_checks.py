"""The model store's argument checks: what a commit, promotion or rollback refuses before it
touches the disk (a :class:`~shoal.errors.ConfigError` naming the argument)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from shoal.errors import ConfigError

__all__ = ["check_int", "check_metrics", "check_now", "check_reason", "check_rounds"]


def check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}", key=name)
    return value


def check_rounds(rounds: object, round: int) -> tuple[int, int]:
    if rounds is None:
        return (round, round)
    if not isinstance(rounds, (tuple, list)) or len(rounds) != 2:
        raise ConfigError(f"rounds must be (first, last), got {rounds!r}", key="rounds")
    first = check_int(rounds[0], "rounds[0]", 0)
    last = check_int(rounds[1], "rounds[1]", first)
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
