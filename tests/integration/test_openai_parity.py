"""The same GGUF in-process and behind llama.cpp's OpenAI-compatible server agree token for token when greedy."""

from __future__ import annotations

import pytest

from bpo.engines.base import ChatMessage, EngineClient, GenerationRequest, SamplingParams
from bpo.engines.factory import build_engine
from bpo.engines.llamacpp import LLAMA_CPP_PLAIN_SAMPLING
from bpo.models.catalogue import ModelSpec, PromptStyle
from bpo.models.prepare import ModelPreparer
from bpo.optimizer.optimizer import OptimizeParams, PromptInput, PromptOptimizer, RewriteResult
from tests.integration.conftest import MODEL, engine_settings

pytestmark = pytest.mark.integration

PROMPTS = [
    "How can I increase my productivity while working from home?",
    "What are the differences between plant-based and animal-based protein sources?",
    "Write a haiku about autumn rain.",
]


async def test_greedy_generation_matches_in_process(
    llama_server: str, llamacpp_engine: EngineClient, smollm2: ModelSpec, preparer: ModelPreparer
) -> None:
    remote = build_engine(
        engine_settings(
            "openai",
            openai_base_url=llama_server,
            openai_model=MODEL,
            # The server's own defaults add samplers the OpenAI API does not have; ask for the plain ones.
            openai_extra_body=LLAMA_CPP_PLAIN_SAMPLING,
        ),
        smollm2,
        preparer,
    )
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=64)
        requests = [GenerationRequest(messages=(ChatMessage("user", prompt),), params=greedy) for prompt in PROMPTS]
        local_out = await llamacpp_engine.generate(requests)
        remote_out = await remote.generate(requests)
        assert [c.text for c in remote_out] == [c.text for c in local_out]
        assert [c.completion_tokens for c in remote_out] == [c.completion_tokens for c in local_out]
        assert [c.prompt_tokens for c in remote_out] == [c.prompt_tokens for c in local_out]
        assert remote.usage.calls == len(PROMPTS)
        assert remote.usage.completion_tokens == sum(c.completion_tokens for c in remote_out)

        params = OptimizeParams(temperature=0.0, max_new_tokens=96)
        local_results = await PromptOptimizer(llamacpp_engine, PromptStyle.CHAT_INSTRUCTION, params).optimize_batch(
            [PromptInput(p) for p in PROMPTS]
        )
        remote_results = await PromptOptimizer(remote, PromptStyle.CHAT_INSTRUCTION, params).optimize_batch(
            [PromptInput(p) for p in PROMPTS]
        )
        assert all(isinstance(r, RewriteResult) for r in [*local_results, *remote_results])
        assert [r.optimized for r in remote_results if isinstance(r, RewriteResult)] == [
            r.optimized for r in local_results if isinstance(r, RewriteResult)
        ]
        assert remote.engine_name == "openai"
    finally:
        await remote.aclose()
