from __future__ import annotations

import pytest

from bpo.engines.base import FinishReason, GenerationRequest, derive_seed
from bpo.errors import InvalidPromptError
from bpo.generation.answers import AnswerGenerator, AnswerInput, AnswerPairResult, with_context
from tests.unit.scripted_engine import ScriptedEngine, last_user_turn

pytestmark = pytest.mark.unit


def answer_to(request: GenerationRequest) -> str:
    return "answer to: " + last_user_turn(request)


async def test_both_prompts_of_every_item_go_in_one_batch_in_order() -> None:
    engine = ScriptedEngine(answer_to)
    items = [AnswerInput("Tell me about Paris.", "Describe Paris for a first-time visitor."), AnswerInput("q2", "q2+")]
    results = await AnswerGenerator(engine).answer_pairs(items)
    assert len(engine.batches) == 1
    assert [last_user_turn(r) for r in engine.batches[0]] == [
        "Tell me about Paris.",
        "Describe Paris for a first-time visitor.",
        "q2",
        "q2+",
    ]
    assert results[0].original_answer == "answer to: Tell me about Paris."
    assert results[0].optimized_answer == "answer to: Describe Paris for a first-time visitor."
    assert results[1].optimized_answer == "answer to: q2+"
    assert not any(r.reused for r in results)
    for request in engine.requests:
        assert request.messages is not None and len(request.messages) == 1  # no system turn of ours
        assert request.params.greedy and request.params.max_tokens == 512 and request.params.seed is None


async def test_an_unchanged_prompt_is_answered_once_and_reused() -> None:
    engine = ScriptedEngine(answer_to)
    items = [AnswerInput("same", "same"), AnswerInput("old", "new"), AnswerInput("same", "same", "ctx")]
    results = await AnswerGenerator(engine).answer_pairs(items)
    assert [last_user_turn(r) for r in engine.requests] == ["same", "old", "new", "same\nctx"]
    assert results[0] == AnswerPairResult(
        original_answer="answer to: same",
        optimized_answer="answer to: same",
        reused=True,
        tokens_in=engine.count_prompt_tokens(engine.requests[0]),
        tokens_out=len("answer to: same") // 4 + 1,
        latency_s=0.25,
        original_truncated=False,
        optimized_truncated=False,
    )
    assert results[1].reused is False and results[1].latency_s == 0.5
    assert results[2].reused and results[2].optimized_answer == "answer to: same\nctx"
    assert engine.usage.calls == 4


async def test_a_whitespace_difference_is_a_different_prompt() -> None:
    engine = ScriptedEngine(answer_to)
    (result,) = await AnswerGenerator(engine).answer_pairs([AnswerInput("Hello", "Hello ")])
    assert not result.reused and len(engine.requests) == 2


async def test_the_context_follows_each_prompt_on_the_next_line() -> None:
    engine = ScriptedEngine(answer_to)
    article = "Paris is the capital of France.\n\nIt has {braces} and [PASSAGE 1] text."
    await AnswerGenerator(engine).answer_pairs([AnswerInput("Summarize.", "Summarize in 3 bullets.", article)])
    assert [last_user_turn(r) for r in engine.requests] == [
        f"Summarize.\n{article}",
        f"Summarize in 3 bullets.\n{article}",
    ]


@pytest.mark.parametrize("context", [None, ""])
def test_no_context_leaves_the_prompt_alone(context: str | None) -> None:
    assert with_context("Prompt.", context) == "Prompt."


async def test_tokens_and_truncation_per_item() -> None:
    def reply(request: GenerationRequest) -> tuple[str, FinishReason]:
        return ("cut off", "length") if last_user_turn(request) == "long" else ("ok", "stop")

    engine = ScriptedEngine(reply)
    (result,) = await AnswerGenerator(engine).answer_pairs([AnswerInput("short", "long")])
    assert (result.original_truncated, result.optimized_truncated) == (False, True)
    assert result.tokens_in == sum(engine.count_prompt_tokens(r) for r in engine.requests)
    assert result.tokens_out == (len("ok") // 4 + 1) + (len("cut off") // 4 + 1)


async def test_sampling_settings_and_per_prompt_seeds() -> None:
    engine = ScriptedEngine(answer_to)
    generator = AnswerGenerator(engine, max_new_tokens=64, temperature=0.7, seed=11)
    await generator.answer_pairs([AnswerInput("a", "b")])
    await generator.answer_pairs([AnswerInput("x", "y"), AnswerInput("a", "b")])
    first, later = engine.batches[0], engine.batches[1][2:]
    for request in engine.requests:
        assert request.params.temperature == 0.7 and request.params.top_p == 1.0 and request.params.max_tokens == 64
    # A prompt's seed depends on its text, not on where it sits in the batch.
    assert (
        [r.params.seed for r in first] == [r.params.seed for r in later] == [derive_seed(11, "a"), derive_seed(11, "b")]
    )


async def test_an_empty_batch_makes_no_call() -> None:
    engine = ScriptedEngine(answer_to)
    assert await AnswerGenerator(engine).answer_pairs([]) == []
    assert engine.batches == []


async def test_a_prompt_too_long_for_the_target_fails_before_any_call() -> None:
    engine = ScriptedEngine(answer_to, context_length=256)
    generator = AnswerGenerator(engine)
    await generator.answer_pairs([AnswerInput("short", "short")])
    assert engine.requests[0].params.max_tokens == 256 - engine.count_prompt_tokens(engine.requests[0])
    with pytest.raises(InvalidPromptError, match="answer item 1"):
        await generator.answer_pairs([AnswerInput("ok", "fine"), AnswerInput("ok", "x" * 1000)])
    assert len(engine.batches) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature")]
)
def test_invalid_settings_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AnswerGenerator(ScriptedEngine(answer_to), **kwargs)  # type: ignore[arg-type]
