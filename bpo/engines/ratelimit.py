"""A token bucket that keeps calls to an endpoint under its requests-per-second limit.

Providers answer bursts over their limit with 429s; the retry policy recovers from those, but each one costs
a round trip and a back-off. Pacing requests before they are sent avoids most of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

# Refill arithmetic after an exact sleep can land a hair under one token; that must not cost another sleep.
_EPSILON = 1e-9


class RateLimiter:
    """Up to ``burst`` requests at once, then one every ``1 / requests_per_second`` seconds.

    Waiters are served first come, first served: the lock is held while the head of the queue sleeps, and
    asyncio's lock wakes waiters in order. A waiter cancelled while sleeping takes no token.
    """

    def __init__(
        self,
        requests_per_second: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not requests_per_second > 0:
            raise ValueError(f"requests_per_second must be positive, got {requests_per_second}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.requests_per_second = requests_per_second
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        # max(): a clock that steps back (it should not) must not drain the bucket.
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.requests_per_second)
        self._updated = now

    async def acquire(self) -> None:
        """Wait until a request may be sent, and count it."""
        async with self._lock:
            while True:
                self._refill()
                if self._tokens >= 1.0 - _EPSILON:
                    self._tokens -= 1.0
                    return
                await self._sleep((1.0 - self._tokens) / self.requests_per_second)
