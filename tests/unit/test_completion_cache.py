from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from bpo.engines.base import ChatMessage, Completion, GenerationRequest, ModelIdentity, SamplingParams
from bpo.engines.cached import CachingEngine, completion_key
from tests.unit.scripted_engine import SCRIPTED_IDENTITY, ScriptedEngine, last_user_turn

pytestmark = pytest.mark.unit


class MemoryCache:
    def __init__(self) -> None:
        self.entries: dict[str, Completion] = {}
        self.models: set[str] = set()

    def cached_completions(self, keys: Sequence[str]) -> dict[str, Completion]:
        return {key: self.entries[key] for key in keys if key in self.entries}

    def cache_completions(self, model: str, entries: Mapping[str, Completion]) -> None:
        self.models.add(model)
        self.entries.update(entries)


def request(text: str, temperature: float = 0.0, max_tokens: int = 64) -> GenerationRequest:
    params = SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_tokens)
    return GenerationRequest(messages=(ChatMessage("user", text),), params=params)


def echo(r: GenerationRequest) -> str:
    return "answer to " + last_user_turn(r)


async def test_a_repeated_greedy_request_is_answered_from_the_cache() -> None:
    inner, cache = ScriptedEngine(echo), MemoryCache()
    lookups: list[tuple[int, int]] = []
    engine = CachingEngine(inner, cache, lambda hits, misses: lookups.append((hits, misses)))
    first = await engine.generate([request("a"), request("b")])
    second = await engine.generate([request("b"), request("c"), request("a")])
    assert [c.text for c in second] == ["answer to b", "answer to c", "answer to a"]
    assert [[last_user_turn(r) for r in batch] for batch in inner.batches] == [["a", "b"], ["c"]]
    assert lookups == [(0, 2), (2, 1)]
    assert cache.models == {SCRIPTED_IDENTITY.name}
    # A cached answer spent nothing: reports count only real calls.
    assert (second[0].prompt_tokens, second[0].completion_tokens, second[0].latency_s) == (0, 0, 0.0)
    assert second[0].finish_reason == first[1].finish_reason
    assert second[1].completion_tokens > 0


async def test_sampled_requests_are_never_cached() -> None:
    inner = ScriptedEngine(echo)
    engine = CachingEngine(inner, MemoryCache())
    await engine.generate([request("a", temperature=0.7)])
    await engine.generate([request("a", temperature=0.7)])
    assert len(inner.batches) == 2


async def test_a_fully_cached_batch_makes_no_call() -> None:
    inner = ScriptedEngine(echo)
    engine = CachingEngine(inner, MemoryCache())
    await engine.generate([request("a")])
    await engine.generate([request("a"), request("a")])
    assert len(inner.batches) == 1


def test_the_key_covers_model_version_messages_and_parameters() -> None:
    base = completion_key(SCRIPTED_IDENTITY, request("a"))
    assert base is not None and base == completion_key(SCRIPTED_IDENTITY, request("a"))
    assert base != completion_key(SCRIPTED_IDENTITY, request("b"))
    assert base != completion_key(SCRIPTED_IDENTITY, request("a", max_tokens=65))
    assert base != completion_key(ModelIdentity("scripted", "scripted-v2"), request("a"))
    assert completion_key(SCRIPTED_IDENTITY, request("a", temperature=0.5)) is None


async def test_the_wrapper_keeps_the_inner_engines_identity_and_context() -> None:
    inner = ScriptedEngine(echo, context_length=1234)
    engine = CachingEngine(inner, MemoryCache())
    assert engine.identity == inner.identity and engine.context_length == 1234
    assert engine.engine_name == "scripted"
    assert engine.count_prompt_tokens(request("abcd")) == inner.count_prompt_tokens(request("abcd"))
