"""Per-device admission: a token-bucket rate limiter.

Pure (``now`` is an argument, Unix seconds) and bounded in memory. :class:`RateLimiter` is a
per-device token bucket. Split out of :mod:`shoal.transport.auth`, which re-exports it. See
``docs/security.md``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from shoal.errors import ConfigError, int_at_least

__all__ = ["RateLimiter"]


# --------------------------------------------------------------------------- rate limits

def positive_number(value: float, name: str) -> float:
    """``value`` as a float if it is a finite number > 0, else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}", key=name)
    return float(value)


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

