"""The ``openai`` engine as ``build_engine`` makes it (the SDK over its aiohttp transport), against a real HTTP
endpoint on loopback: answers and usage, the API key sent, a bounded wait on a hung endpoint, back-off on 429
and 5xx, a refused request failing alone, and an unreachable endpoint reported as unavailable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from bpo.engines.base import ChatMessage, Completion, EngineClient, GenerationRequest, SamplingParams
from bpo.engines.factory import build_engine, resolve_spec
from bpo.errors import EngineUnavailableError, InvalidPromptError
from bpo.infra.process import free_port
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.settings import EngineSettings
from bpo.testing.openai_stub import OpenAIStub

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as server:
        yield server


def engine_for(base_url: str, **overrides: object) -> EngineClient:
    settings = EngineSettings.model_validate(
        {
            "name": "openai",
            "model": "served-model",
            "openai_base_url": base_url,
            "openai_api_key": SecretStr("sk-test"),
            "max_attempts": 3,
            "retry_base_delay_s": 0.05,
            "retry_max_delay_s": 0.2,
            **overrides,
        }
    )
    # A remote model has no weights here: the preparer is never asked for any, and installs nothing.
    preparer = ModelPreparer(Path("/nonexistent-models-dir"), install_missing=None)
    return build_engine(settings, resolve_spec(settings, ModelCatalogue()), preparer)


def ask(text: str) -> GenerationRequest:
    return GenerationRequest(
        messages=(ChatMessage("user", text),), params=SamplingParams(temperature=0.0, top_p=1.0, max_tokens=32)
    )


async def generate_each(engine: EngineClient, requests: list[GenerationRequest]) -> list[Completion | Exception]:
    try:
        return await engine.generate_each(requests)
    finally:
        await engine.aclose()


def test_answers_usage_and_key_reach_the_endpoint(stub: OpenAIStub) -> None:
    engine = engine_for(stub.url("target"))
    outcomes = asyncio.run(generate_each(engine, [ask(f"What is {n} + {n}?") for n in range(20)]))
    assert all(isinstance(o, Completion) for o in outcomes)
    first = outcomes[0]
    assert isinstance(first, Completion) and first.text == "Here is a short answer to: What is 0 + 0?"
    assert first.prompt_tokens > 0 and first.completion_tokens > 0 and first.finish_reason == "stop"
    calls = stub.calls("target")
    assert calls.requests == 20 and calls.models == {"served-model": 20}
    assert calls.authorizations == {"Bearer sk-test": 20}


def test_a_hung_endpoint_times_out_within_the_request_timeout(stub: OpenAIStub) -> None:
    stub.hang("slow")
    engine = engine_for(stub.url("slow"), request_timeout_s=1.0, max_attempts=1)
    started = time.monotonic()
    try:
        [outcome] = asyncio.run(generate_each(engine, [ask("anyone there?")]))
    finally:
        stub.release_hangs()
    assert isinstance(outcome, EngineUnavailableError), outcome
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("status", [429, 503])
def test_a_rate_limited_or_failing_endpoint_is_retried_until_it_answers(stub: OpenAIStub, status: int) -> None:
    stub.route("flaky").fail_for(0.3, status=status)
    # Back-off is full jitter capped at 0.2 s, so eight attempts could all land inside the 0.3 s of failures
    # (it failed so once in a full test run); thirty span ~2.7 s on average, far past the window.
    engine = engine_for(stub.url("flaky"), max_attempts=30)
    [outcome] = asyncio.run(generate_each(engine, [ask("hello")]))
    assert isinstance(outcome, Completion), outcome
    assert stub.calls("flaky").failed >= 1 and stub.calls("flaky").requests > stub.calls("flaky").failed


def test_a_refused_request_fails_alone_and_is_not_retried(stub: OpenAIStub) -> None:
    stub.route("picky").refuse_containing = "forbidden"
    engine = engine_for(stub.url("picky"))
    refused, answered = asyncio.run(generate_each(engine, [ask("a forbidden request"), ask("a fine request")]))
    assert isinstance(refused, InvalidPromptError) and isinstance(answered, Completion)
    assert stub.calls("picky").requests == 2


def test_an_unreachable_endpoint_is_unavailable() -> None:
    # A port that can be bound right now: nothing listens on it.
    engine = engine_for(f"http://127.0.0.1:{free_port()}/v1", max_attempts=2)
    [outcome] = asyncio.run(generate_each(engine, [ask("hello")]))
    assert isinstance(outcome, EngineUnavailableError), outcome
