"""The one retry policy for calls to remote LLM endpoints: exponential back-off with full jitter,
honouring a server's Retry-After, retrying only what can succeed on a second try."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)] (attempt counts from 0)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        return rng.uniform(0.0, ceiling)


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retryable: bool
    retry_after_s: float | None = None


async def call_with_retry(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    classify: Callable[[BaseException], RetryDecision],
    *,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    describe: str = "request",
    on_retry: Callable[[], None] | None = None,
) -> T:
    rng = rng or random.Random()
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            decision = classify(exc)
            attempt += 1
            if not decision.retryable or attempt >= policy.max_attempts:
                raise
            delay = policy.backoff_s(attempt - 1, rng)
            if decision.retry_after_s is not None:
                # The server knows its own load better than our back-off curve does, within our cap.
                delay = min(max(delay, decision.retry_after_s), max(policy.max_delay_s, 0.0))
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.2fs",
                describe,
                type(exc).__name__,
                exc,
                attempt,
                policy.max_attempts - 1,
                delay,
            )
            if on_retry is not None:
                on_retry()
            await sleep(delay)
