"""Token buckets (sans-I/O, time passed in) for the rate limits of public services (relay,
AutoNAT, DHT): per key (a peer, an IP), with a bounded number of keys."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second, up to ``burst``; :meth:`take` spends one if available."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def full_at(self, now: float) -> float:
        """When the bucket will be full again (used to forget idle buckets)."""
        return (
            self.stamp + (self.burst - self.tokens) / self.rate if self.rate > 0 else float("inf")
        )


class KeyedRateLimiter:
    """One bucket per key (e.g. requester IP), with a bounded number of keys."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[object, TokenBucket] = {}

    def take(self, key: object, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._forget_idle(now)
                if len(self._buckets) >= self.max_keys:
                    return False
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.full_at(now) <= now]:
            del self._buckets[key]
