"""The embedded default: SmolLM2 in-process through llama-cpp-python."""

from __future__ import annotations

import json

import pytest

from bpo.engines.base import EngineClient
from bpo.errors import InvalidPromptError, PromptTooLongError
from bpo.models.catalogue import PromptStyle
from bpo.optimizer.optimizer import OptimizeParams, PromptInput, PromptOptimizer, RewriteResult
from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration

VICUNA = [
    "How can I improve my time management skills?",
    "What are the most effective ways to deal with stress?",
    "Can you explain the basics of quantum computing?",
]


async def test_batch_rewrite_carries_every_field(llamacpp_engine: EngineClient) -> None:
    optimizer = PromptOptimizer(
        llamacpp_engine, PromptStyle.CHAT_INSTRUCTION, OptimizeParams(seed=7, max_new_tokens=160)
    )
    outcomes = await optimizer.optimize_batch([PromptInput(p) for p in VICUNA])
    assert len(outcomes) == len(VICUNA)
    for prompt, outcome in zip(VICUNA, outcomes, strict=True):
        assert isinstance(outcome, RewriteResult)
        assert outcome.original == prompt
        assert outcome.optimized.strip()
        assert outcome.model == MODEL
        assert outcome.model_version == "b179c9523d0e"
        assert outcome.engine == "llamacpp"
        assert outcome.params["temperature"] == 0.6 and outcome.params["top_p"] == 0.9
        assert outcome.tokens_in > 50 and outcome.tokens_out > 0
        assert outcome.latency_s > 0
        # Either a real rewrite or the original with the guard's reason: never an unexplained copy.
        assert outcome.changed or outcome.fallback_reason is not None or outcome.stop_reason == "unchanged"
    json.dumps([o.to_dict() for o in outcomes if isinstance(o, RewriteResult)])


async def test_seed_makes_sampling_reproducible(llamacpp_engine: EngineClient) -> None:
    params = OptimizeParams(seed=1234, max_new_tokens=96)
    optimizer = PromptOptimizer(llamacpp_engine, PromptStyle.CHAT_INSTRUCTION, params)
    first = await optimizer.optimize(VICUNA[0])
    second = await optimizer.optimize(VICUNA[0])
    assert first.round_outputs == second.round_outputs
    assert first.tokens_out == second.tokens_out


async def test_iterative_rounds_record_each_round(llamacpp_engine: EngineClient) -> None:
    optimizer = PromptOptimizer(
        llamacpp_engine, PromptStyle.CHAT_INSTRUCTION, OptimizeParams(temperature=0.0, max_new_tokens=128)
    )
    result = await optimizer.optimize(VICUNA[2], rounds=3)
    assert 0 <= result.rounds_done <= 3
    assert result.params["rounds"] == 3
    assert len(result.round_outputs) == result.rounds_done
    if result.stop_reason == "rounds_completed":
        assert result.rounds_done == 3


async def test_code_block_passes_through_byte_for_byte(llamacpp_engine: EngineClient) -> None:
    code = "```python\ndef add(a, b):\n    return a - b   # bug:  subtracts\n```"
    prompt = f"why does this not add? {code}\nthanks"
    optimizer = PromptOptimizer(
        llamacpp_engine, PromptStyle.CHAT_INSTRUCTION, OptimizeParams(temperature=0.0, max_new_tokens=128)
    )
    result = await optimizer.optimize(prompt)
    assert code in result.optimized
    assert result.optimized.count(code) == 1


async def test_explicit_context_is_never_sent_for_rewriting(llamacpp_engine: EngineClient) -> None:
    context = "The Eiffel Tower is 330 metres tall and was completed in 1889. " * 60
    optimizer = PromptOptimizer(
        llamacpp_engine, PromptStyle.CHAT_INSTRUCTION, OptimizeParams(temperature=0.0, max_new_tokens=96)
    )
    result = await optimizer.optimize("How tall is it?", context=context)
    assert result.context == context
    assert result.tokens_in < 400  # the 60-sentence context stayed out of the optimizer's input


async def test_too_long_instruction_is_a_clear_error(llamacpp_engine: EngineClient) -> None:
    optimizer = PromptOptimizer(llamacpp_engine, PromptStyle.CHAT_INSTRUCTION, OptimizeParams())
    huge = "Please rewrite every sentence I give you in a formal register and keep the meaning. " * 400
    with pytest.raises(PromptTooLongError, match="context holds"):
        await optimizer.optimize(huge)
    with pytest.raises(InvalidPromptError, match="empty"):
        await optimizer.optimize("   \n")
