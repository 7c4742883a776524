from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import openai
import pytest

try:  # the openai SDK builds its errors from httpx2 responses (from openai 3); older SDKs from httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

from bpo.engines.openai_compat import classify_openai_error
from bpo.engines.retry import RetryDecision, RetryPolicy, call_with_retry

pytestmark = pytest.mark.unit

REQUEST = httpx.Request("POST", "http://localhost:8000/v1/chat/completions")


class FlakyError(Exception):
    pass


class FatalError(Exception):
    pass


class Recorder:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)


def failing_then(value: str, failures: list[BaseException]) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    calls = [0]

    async def call() -> str:
        calls[0] += 1
        if failures:
            raise failures.pop(0)
        return value

    return call, calls


def classify(retry_after: float | None = None) -> Callable[[BaseException], RetryDecision]:
    def decide(exc: BaseException) -> RetryDecision:
        return RetryDecision(retryable=isinstance(exc, FlakyError), retry_after_s=retry_after)

    return decide


async def test_retries_with_full_jitter_backoff() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay_s=1.0, max_delay_s=3.0)
    call, calls = failing_then("ok", [FlakyError(), FlakyError(), FlakyError(), FlakyError()])
    sleeper = Recorder()
    result = await call_with_retry(call, policy, classify(), rng=random.Random(42), sleep=sleeper.sleep)
    assert result == "ok"
    assert calls[0] == 5
    reference = random.Random(42)
    ceilings = [1.0, 2.0, 3.0, 3.0]  # base * 2**attempt, capped at max_delay_s
    assert sleeper.delays == [reference.uniform(0.0, ceiling) for ceiling in ceilings]
    assert all(0.0 <= d <= c for d, c in zip(sleeper.delays, ceilings, strict=True))


async def test_same_seed_same_delays() -> None:
    policy = RetryPolicy(max_attempts=4, base_delay_s=0.5, max_delay_s=30.0)
    runs = []
    for _ in range(2):
        call, _calls = failing_then("ok", [FlakyError(), FlakyError(), FlakyError()])
        sleeper = Recorder()
        await call_with_retry(call, policy, classify(), rng=random.Random(7), sleep=sleeper.sleep)
        runs.append(sleeper.delays)
    assert runs[0] == runs[1]
    assert len(runs[0]) == 3


async def test_no_retry_needed() -> None:
    call, calls = failing_then("ok", [])
    sleeper = Recorder()
    assert await call_with_retry(call, RetryPolicy(), classify(), sleep=sleeper.sleep) == "ok"
    assert calls[0] == 1
    assert sleeper.delays == []


async def test_retry_after_is_honoured() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=30.0)
    call, _ = failing_then("ok", [FlakyError(), FlakyError()])
    sleeper = Recorder()
    await call_with_retry(call, policy, classify(retry_after=7.5), rng=random.Random(0), sleep=sleeper.sleep)
    assert sleeper.delays == [7.5, 7.5]


async def test_retry_after_is_capped_by_max_delay() -> None:
    policy = RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=4.0)
    call, _ = failing_then("ok", [FlakyError()])
    sleeper = Recorder()
    await call_with_retry(call, policy, classify(retry_after=120.0), rng=random.Random(0), sleep=sleeper.sleep)
    assert sleeper.delays == [4.0]


async def test_retry_after_shorter_than_backoff_uses_backoff() -> None:
    policy = RetryPolicy(max_attempts=2, base_delay_s=10.0, max_delay_s=10.0)
    call, _ = failing_then("ok", [FlakyError()])
    sleeper = Recorder()
    await call_with_retry(call, policy, classify(retry_after=0.0), rng=random.Random(3), sleep=sleeper.sleep)
    assert sleeper.delays == [random.Random(3).uniform(0.0, 10.0)]


async def test_stops_at_max_attempts_and_reraises_the_last_error() -> None:
    errors: list[BaseException] = [FlakyError("1"), FlakyError("2"), FlakyError("3"), FlakyError("4")]
    call, calls = failing_then("never", errors)
    sleeper = Recorder()
    with pytest.raises(FlakyError, match="3"):
        await call_with_retry(call, RetryPolicy(max_attempts=3), classify(), sleep=sleeper.sleep)
    assert calls[0] == 3
    assert len(sleeper.delays) == 2


async def test_single_attempt_never_sleeps() -> None:
    call, calls = failing_then("never", [FlakyError()])
    sleeper = Recorder()
    with pytest.raises(FlakyError):
        await call_with_retry(call, RetryPolicy(max_attempts=1), classify(), sleep=sleeper.sleep)
    assert calls[0] == 1
    assert sleeper.delays == []


async def test_non_retryable_error_is_raised_at_once() -> None:
    call, calls = failing_then("never", [FatalError("bad request"), FlakyError()])
    sleeper = Recorder()
    with pytest.raises(FatalError, match="bad request"):
        await call_with_retry(call, RetryPolicy(max_attempts=5), classify(), sleep=sleeper.sleep)
    assert calls[0] == 1
    assert sleeper.delays == []


def test_backoff_ceiling() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=3.0)

    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    assert [policy.backoff_s(attempt, Top()) for attempt in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


# -- classify_openai_error -----------------------------------------------------------------------------


def response(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers or {}, request=REQUEST)


def test_rate_limit_with_retry_after() -> None:
    exc = openai.RateLimitError("slow down", response=response(429, {"retry-after": "7"}), body=None)
    assert classify_openai_error(exc) == RetryDecision(retryable=True, retry_after_s=7.0)


def test_rate_limit_without_retry_after() -> None:
    exc = openai.RateLimitError("slow down", response=response(429), body=None)
    assert classify_openai_error(exc) == RetryDecision(retryable=True, retry_after_s=None)


@pytest.mark.parametrize(("header", "expected"), [("Wed, 21 Oct 2015 07:28:00 GMT", None), ("-3", 0.0), ("1.5", 1.5)])
def test_retry_after_header_forms(header: str, expected: float | None) -> None:
    exc = openai.RateLimitError("slow down", response=response(429, {"Retry-After": header}), body=None)
    assert classify_openai_error(exc) == RetryDecision(retryable=True, retry_after_s=expected)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retryable(status: int) -> None:
    exc = openai.InternalServerError("boom", response=response(status, {"retry-after": "2"}), body=None)
    assert classify_openai_error(exc) == RetryDecision(retryable=True, retry_after_s=2.0)


def test_conflict_and_timeout_statuses_are_retryable() -> None:
    conflict = openai.ConflictError("conflict", response=response(409), body=None)
    assert classify_openai_error(conflict).retryable
    timeout = openai.APIStatusError("request timeout", response=response(408), body=None)
    assert classify_openai_error(timeout).retryable


def test_bad_request_is_not_retryable() -> None:
    exc = openai.BadRequestError("bad", response=response(400, {"retry-after": "1"}), body=None)
    assert classify_openai_error(exc) == RetryDecision(retryable=False)
    denied = openai.AuthenticationError("no key", response=response(401), body=None)
    assert classify_openai_error(denied) == RetryDecision(retryable=False)


def test_connection_errors_are_retryable_and_others_are_not() -> None:
    assert classify_openai_error(openai.APIConnectionError(request=REQUEST)).retryable
    assert classify_openai_error(openai.APITimeoutError(request=REQUEST)).retryable
    assert not classify_openai_error(ValueError("not an API error")).retryable


async def test_openai_errors_through_call_with_retry() -> None:
    errors: list[BaseException] = [
        openai.RateLimitError("slow down", response=response(429, {"retry-after": "2"}), body=None),
        openai.InternalServerError("boom", response=response(503), body=None),
    ]
    call, calls = failing_then("done", errors)
    sleeper = Recorder()
    policy = RetryPolicy(max_attempts=3, base_delay_s=0.25, max_delay_s=10.0)
    result = await call_with_retry(call, policy, classify_openai_error, rng=random.Random(1), sleep=sleeper.sleep)
    assert result == "done"
    assert calls[0] == 3
    reference = random.Random(1)
    first_backoff = reference.uniform(0.0, 0.25)
    assert sleeper.delays == [max(first_backoff, 2.0), reference.uniform(0.0, 0.5)]
