"""Per-device admission: a token-bucket rate limiter and an idempotency guard for uploads.

Pure (``now`` is an argument, Unix seconds) and bounded in memory. :class:`RateLimiter` is a
per-device token bucket; :class:`ReplayGuard` makes uploads idempotent under retries
(Stripe-style idempotency keys). Split out of :mod:`shoal.transport.auth`, which re-exports
them. See ``docs/security.md``.
"""

from __future__ import annotations

import enum
import hmac
import math
from collections import OrderedDict
from dataclasses import dataclass

from shoal.errors import ConfigError

__all__ = ["RateLimiter", "ReplayStatus", "ReplayDecision", "ReplayGuard"]


# --------------------------------------------------------------------------- rate limits

def positive_number(value: float, name: str) -> float:
    """``value`` as a float if it is a finite number > 0, else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}", key=name)
    return float(value)


def int_at_least(value: int, name: str, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum`` (not a bool), else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}", key=name)
    return value


class RateLimiter:
    """Per-key token bucket: up to ``burst`` requests at once, refilled at ``rate_per_s``.

    Memory is bounded twice: a bucket idle long enough to have refilled completely
    (``burst / rate_per_s`` seconds) is dropped, which is lossless since a new bucket starts
    full; and at most ``max_keys`` buckets are kept, the least recently used evicted first
    (which forgets that key's debt: size ``max_keys`` above the number of devices active within
    one refill period). Time is an argument; a clock going backwards refills nothing.
    Owns its state (mutable), unlike the immutable values above, because it is called on every
    request.
    """

    def __init__(self, rate_per_s: float, burst: float, *, max_keys: int = 100_000) -> None:
        self.rate = positive_number(rate_per_s, "rate_per_s")
        self.burst = positive_number(burst, "burst")
        if self.burst < 1:
            raise ConfigError(f"burst must be >= 1, got {burst!r}", key="burst")
        self.max_keys = int_at_least(max_keys, "max_keys", 1)
        self._full_after = self.burst / self.rate
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: object, now: float) -> tuple[float, float]:
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.burst, now
        tokens, last = bucket
        return min(self.burst, tokens + max(0.0, now - last) * self.rate), max(last, now)

    def _drop_idle(self, now: float) -> None:
        # Buckets are in last-use order, so the idle ones are at the front.
        while self._buckets:
            _, (_, last) = next(iter(self._buckets.items()))
            if now - last < self._full_after:
                break
            self._buckets.popitem(last=False)

    def allow(self, key: object, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens from ``key``'s bucket if it has them; report whether it did."""
        tokens, last = self._tokens(key, now)
        allowed = tokens >= cost
        self._buckets[key] = (tokens - cost if allowed else tokens, last)
        self._buckets.move_to_end(key)
        self._drop_idle(now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def retry_after(self, key: object, now: float, cost: float = 1.0) -> float:
        """Seconds until ``allow(key, ..., cost)`` would succeed (0 if it would now); what pace
        steering tells a throttled device. Does not change state."""
        tokens, _ = self._tokens(key, now)
        return max(0.0, (cost - tokens) / self.rate)


# --------------------------------------------------------------------------- idempotency

class ReplayStatus(enum.Enum):
    """NEW: process it, then :meth:`ReplayGuard.complete`. IN_PROGRESS: the same upload is being
    processed; ask for a retry. DUPLICATE: already accepted; answer with the original result.
    CONFLICT: the key was used for a different upload; refuse."""

    NEW = "new"
    IN_PROGRESS = "in_progress"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class ReplayDecision:
    status: ReplayStatus
    result: object = None  # the original result, for DUPLICATE


@dataclass
class _Entry:
    digest: bytes
    expires: float
    done: bool = False
    result: object = None


class ReplayGuard:
    """Idempotency keys for uploads: remembers ``(device, round, key)`` with the upload's digest
    for ``window_s`` seconds after first sight, keeping at most ``max_entries`` (oldest evicted
    first).

    Protocol: ``begin`` → NEW, process, then ``complete`` with the result (or ``abandon`` if
    processing failed, so a retry is processed afresh). A retry of the same upload gets
    IN_PROGRESS or DUPLICATE (with the original result); the same key with another digest gets
    CONFLICT. This makes retries safe; it does not replace the round engine's rule of one
    update per client per round, which still holds after an entry ages out.
    """

    def __init__(self, *, window_s: float, max_entries: int = 100_000) -> None:
        self.window_s = positive_number(window_s, "window_s")
        self.max_entries = int_at_least(max_entries, "max_entries", 1)
        self._entries: OrderedDict[tuple[str, int, str], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        while self._entries:
            entry = next(iter(self._entries.values()))
            if entry.expires > now:
                break
            self._entries.popitem(last=False)

    def begin(self, device: str, round: int, key: str, digest: bytes, *,
              now: float) -> ReplayDecision:
        """Classify an upload by its idempotency key and content digest (e.g. SHA-256 of the
        payload); a NEW one is remembered as in progress.

        Raises:
            ConfigError: an empty or over-long (> 128 characters) key, or a negative round.
        """
        if not isinstance(key, str) or not 1 <= len(key) <= 128:
            raise ConfigError("idempotency key must be 1-128 characters", key="key")
        int_at_least(round, "round", 0)
        self._expire(now)
        ident = (device, round, key)
        entry = self._entries.get(ident)
        if entry is None:
            self._entries[ident] = _Entry(bytes(digest), now + self.window_s)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return ReplayDecision(ReplayStatus.NEW)
        if not hmac.compare_digest(entry.digest, bytes(digest)):
            return ReplayDecision(ReplayStatus.CONFLICT)
        if not entry.done:
            return ReplayDecision(ReplayStatus.IN_PROGRESS)
        return ReplayDecision(ReplayStatus.DUPLICATE, entry.result)

    def complete(self, device: str, round: int, key: str, result: object) -> None:
        """Record the result of an upload that :meth:`begin` classified NEW. A no-op if the
        entry has since aged out or been evicted."""
        entry = self._entries.get((device, round, key))
        if entry is not None:
            entry.done, entry.result = True, result

    def abandon(self, device: str, round: int, key: str) -> None:
        """Forget an in-progress upload whose processing failed, so a retry starts afresh.
        Completed entries are kept (their result stands)."""
        entry = self._entries.get((device, round, key))
        if entry is not None and not entry.done:
            del self._entries[(device, round, key)]
