"""Per-key limits: requests and tokens per minute (token buckets) and concurrent requests."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


@dataclass
class Limits:
    requests_per_minute: int
    tokens_per_minute: int
    max_concurrent: int
    adapter_loads_per_minute: int = 30


class LimitExceeded(Exception):
    """A limit was hit; ``retry_after`` is the wait in whole seconds before a retry can pass."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


class TokenBucket:
    """Holds up to ``capacity`` units and refills at ``capacity`` per minute."""

    def __init__(self, capacity: float, now: float) -> None:
        self.capacity = capacity
        self.level = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60.0)
        self.updated = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` is available (0 = now)."""
        self._refill(now)
        if amount <= self.level:
            return 0.0
        return (amount - self.level) * 60.0 / self.capacity

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def give_back(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


class RateLimiter:
    """Admission control per key, in the order a request needs it, so that a refused request costs
    nothing expensive:

    1. ``begin``: concurrency and requests per minute, before the body is tokenized or an adapter loaded;
    2. ``load_adapter``: adapter loads per minute, before an adapter that is not in memory is read;
    3. ``reserve``: tokens per minute, once the prompt's tokens are counted;
    4. ``end``: the request finished; unused reserved tokens are given back.

    A request that ``begin`` admitted must ``end``, whatever happens after.
    """

    def __init__(self, limits: Limits, clock: object = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._loads: dict[str, TokenBucket] = {}
        self._running: dict[str, int] = {}

    def now(self) -> float:
        return float(self._clock())  # type: ignore[operator]

    def begin(self, key: str) -> None:
        """Admit one request of ``key``, or raise ``LimitExceeded``."""
        lim = self.limits
        with self._lock:
            now = self.now()
            if self._running.get(key, 0) >= lim.max_concurrent:
                raise LimitExceeded(f"too many concurrent requests for this key (limit {lim.max_concurrent})", 1)
            req = self._requests.setdefault(key, TokenBucket(lim.requests_per_minute, now))
            wait = req.wait_for(1, now)
            if wait > 0:
                raise LimitExceeded(
                    f"rate limit of {lim.requests_per_minute} requests per minute reached", math.ceil(wait)
                )
            req.take(1, now)
            self._running[key] = self._running.get(key, 0) + 1

    def refuses(self, key: str) -> LimitExceeded | None:
        """What ``begin`` would refuse now, without taking anything: a cheap check before a
        request's body is even read, so that a flood of refused requests costs almost nothing."""
        lim = self.limits
        with self._lock:
            now = self.now()
            if self._running.get(key, 0) >= lim.max_concurrent:
                return LimitExceeded(f"too many concurrent requests for this key (limit {lim.max_concurrent})", 1)
            bucket = self._requests.get(key)
            wait = bucket.wait_for(1, now) if bucket is not None else 0.0
            if wait > 0:
                return LimitExceeded(
                    f"rate limit of {lim.requests_per_minute} requests per minute reached", math.ceil(wait)
                )
        return None

    def load_adapter(self, key: str) -> None:
        """Count one adapter load (from disk into memory) for ``key``, or raise ``LimitExceeded``."""
        lim = self.limits
        with self._lock:
            now = self.now()
            loads = self._loads.setdefault(key, TokenBucket(lim.adapter_loads_per_minute, now))
            wait = loads.wait_for(1, now)
            if wait > 0:
                raise LimitExceeded(
                    f"this key loaded {lim.adapter_loads_per_minute} adapters in the last minute (the limit); "
                    "use adapters that are already loaded or retry later",
                    math.ceil(wait),
                )
            loads.take(1, now)

    def reserve(self, key: str, tokens: int) -> None:
        """Reserve up to ``tokens`` tokens for an admitted request, or raise ``LimitExceeded``."""
        lim = self.limits
        with self._lock:
            now = self.now()
            if tokens > lim.tokens_per_minute:
                raise LimitExceeded(
                    f"this request may use {tokens} tokens, more than this key's {lim.tokens_per_minute} tokens "
                    "per minute; lower max_tokens",
                    60,
                )
            tok = self._tokens.setdefault(key, TokenBucket(lim.tokens_per_minute, now))
            wait = tok.wait_for(tokens, now)
            if wait > 0:
                raise LimitExceeded(f"rate limit of {lim.tokens_per_minute} tokens per minute reached", math.ceil(wait))
            tok.take(tokens, now)

    def acquire(self, key: str, tokens: int) -> None:
        """``begin`` and ``reserve`` at once (nothing is held if either refuses)."""
        self.begin(key)
        try:
            self.reserve(key, tokens)
        except LimitExceeded:
            self.end(key, 0, 0)
            raise

    def end(self, key: str, reserved: int, used: int) -> None:
        """The request ended having used ``used`` of its ``reserved`` tokens."""
        with self._lock:
            self._running[key] = max(0, self._running.get(key, 0) - 1)
            if reserved > used and key in self._tokens:
                self._tokens[key].give_back(reserved - used, self.now())
