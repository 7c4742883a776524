from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx2
import openai
import pytest

from bpo.engines.base import ChatMessage, GenerationRequest, ModelIdentity, SamplingParams
from bpo.engines.factory import build_engine
from bpo.engines.openai_compat import OpenAICompatEngine
from bpo.engines.ratelimit import RateLimiter
from bpo.engines.retry import RetryPolicy
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.settings import BpoSettings, EngineSettings

pytestmark = pytest.mark.unit


class FakeClock:
    """Time that moves only when the limiter sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would


def limiter(rate: float, burst: int, clock: FakeClock) -> RateLimiter:
    return RateLimiter(rate, burst, clock=clock, sleep=clock.sleep)


async def test_a_full_bucket_admits_a_burst_then_paces() -> None:
    clock = FakeClock()
    bucket = limiter(2.0, 3, clock)
    for _ in range(3):
        await bucket.acquire()
    assert clock.sleeps == []
    await bucket.acquire()
    await bucket.acquire()
    assert clock.sleeps == pytest.approx([0.5, 0.5])
    assert clock.now == pytest.approx(1001.0)


async def test_an_idle_bucket_refills_only_up_to_its_burst() -> None:
    clock = FakeClock()
    bucket = limiter(2.0, 2, clock)
    await bucket.acquire()
    await bucket.acquire()
    clock.now += 60.0
    for _ in range(2):
        await bucket.acquire()
    assert clock.sleeps == []
    await bucket.acquire()
    assert clock.sleeps == pytest.approx([0.5])


async def test_a_partly_refilled_bucket_waits_only_for_the_rest() -> None:
    clock = FakeClock()
    bucket = limiter(4.0, 1, clock)
    await bucket.acquire()
    clock.now += 0.1  # 0.4 of a token back
    await bucket.acquire()
    assert clock.sleeps == pytest.approx([0.15])


async def test_concurrent_waiters_are_served_in_order_at_the_rate() -> None:
    clock = FakeClock()
    bucket = limiter(10.0, 2, clock)
    admitted: list[tuple[int, float]] = []

    async def caller(number: int) -> None:
        await bucket.acquire()
        admitted.append((number, round(clock.now - 1000.0, 6)))

    await asyncio.gather(*(caller(n) for n in range(6)))
    assert admitted == [(0, 0.0), (1, 0.0), (2, 0.1), (3, 0.2), (4, 0.3), (5, 0.4)]


async def test_a_cancelled_waiter_takes_no_token() -> None:
    clock = FakeClock()
    released = asyncio.Event()

    async def blocking_sleep(delay: float) -> None:
        clock.sleeps.append(delay)
        await released.wait()

    bucket = RateLimiter(1.0, 1, clock=clock, sleep=blocking_sleep)
    await bucket.acquire()
    waiter = asyncio.create_task(bucket.acquire())
    await asyncio.sleep(0)
    assert clock.sleeps == [1.0]
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    clock.now += 1.0
    await asyncio.wait_for(bucket.acquire(), timeout=1.0)  # the token the cancelled waiter did not take


async def test_real_time_pacing_holds_a_lower_bound() -> None:
    bucket = RateLimiter(50.0, 1)
    started = time.monotonic()
    for _ in range(6):
        await bucket.acquire()
    assert time.monotonic() - started >= 5 / 50.0 - 0.01


@pytest.mark.parametrize(("rate", "burst", "message"), [(0.0, 1, "requests_per_second"), (1.0, 0, "burst")])
def test_invalid_limits_are_refused(rate: float, burst: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RateLimiter(rate, burst)


# -- the OpenAI-compatible engine ---------------------------------------------------------------------------


class CountingLimiter(RateLimiter):
    def __init__(self) -> None:
        super().__init__(1000.0, 1000)
        self.acquired = 0

    async def acquire(self) -> None:
        self.acquired += 1
        await super().acquire()


def chat_reply(text: str) -> dict[str, object]:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "served",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


async def test_the_engine_acquires_before_every_attempt_retries_included() -> None:
    calls = {"n": 0}

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx2.Response(503, json={"error": {"message": "busy"}})
        return httpx2.Response(200, content=json.dumps(chat_reply("hi")).encode())

    counting = CountingLimiter()
    client = openai.AsyncOpenAI(
        base_url="http://endpoint.test/v1",
        api_key="k",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )
    engine = OpenAICompatEngine(
        client,
        "served",
        ModelIdentity("m", "v"),
        context_length=4096,
        max_concurrency=1,
        retry_policy=RetryPolicy(max_attempts=3, base_delay_s=0.0, max_delay_s=0.0),
        rate_limiter=counting,
    )
    request = GenerationRequest(messages=(ChatMessage("user", "hello"),), params=SamplingParams(temperature=0.0))
    completions = await engine.generate([request, request])
    await engine.aclose()
    assert [c.text for c in completions] == ["hi", "hi"]
    assert calls["n"] == 3 and counting.acquired == 3


@pytest.mark.parametrize(("rate", "burst"), [(0.0, None), (0.5, 1), (4.0, 4), (2.5, 3)])
async def test_the_factory_builds_a_limiter_from_the_settings(rate: float, burst: int | None, tmp_path: Path) -> None:
    settings = EngineSettings(
        name="openai", model="remote-model", openai_base_url="http://endpoint.test/v1", requests_per_second=rate
    )
    spec = ModelCatalogue().resolve("smollm2-135m-instruct")
    engine = build_engine(settings, spec, ModelPreparer(tmp_path, install_missing=None))
    assert isinstance(engine, OpenAICompatEngine)
    built = engine._rate_limiter
    if burst is None:
        assert built is None
    else:
        assert built is not None and built.requests_per_second == rate and built.burst == burst
    await engine.aclose()


def test_requests_per_second_defaults_to_unlimited_and_reads_its_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EngineSettings().requests_per_second == 0.0
    monkeypatch.setenv("BPO_ENGINE__REQUESTS_PER_SECOND", "7.5")
    assert BpoSettings().engine.requests_per_second == 7.5
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        EngineSettings(requests_per_second=-1)
