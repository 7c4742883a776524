from __future__ import annotations

from typing import Any

import pytest

from bpo.engines.base import derive_seed
from bpo.errors import EngineUnavailableError, InvalidPromptError
from bpo.models.catalogue import PromptStyle
from bpo.optimizer.optimizer import (
    MIN_OUTPUT_TOKENS,
    OptimizeParams,
    PromptInput,
    PromptOptimizer,
    RewriteFailure,
    RewriteResult,
)
from bpo.optimizer.prompting import optimizer_request
from bpo.optimizer.spans import segment
from tests.unit.fakes import FAKE_IDENTITY, FakeEngine, Reply, completion_tokens_for, user_prompt_of

pytestmark = pytest.mark.unit

TIPS = "Give me 3 tips for a job interview."
TIPS_1 = "Give me 3 practical tips for a job interview, covering preparation, common questions and follow-up."
TIPS_2 = (
    "Give me 3 practical, concrete tips for a job interview, covering preparation, common questions, "
    "body language and follow-up."
)
TIPS_3 = (
    "Give me 3 practical, concrete tips for a job interview, covering preparation, common questions, "
    "body language, salary talk and follow-up, with one example each."
)
PARIS = "Tell me about Paris."
PARIS_1 = "Tell me about Paris: its history, main landmarks, neighbourhoods and food, for a first-time visitor."
COPPER = "List uses of copper."
COPPER_1 = "List the main industrial and household uses of copper, with a short explanation of each."

CODE = "```python\ndef add(a, b):\n    return a - b\n```"
CODE_PROMPT = f"Fix the bug in this function:\n{CODE}\nIt should return the sum."
CODE_INSTRUCTION = "Fix the bug in this function:\n[PASSAGE 1]\nIt should return the sum."

LONG_CODE = (
    "```python\n"
    "def total_price(items, tax_rate):\n"
    "    subtotal = sum(item.price for item in items)\n"
    "    return subtotal * tax_rate  # should add tax\n"
    "```"
)
LONG_CODE_PROMPT = f"Fix the tax bug in this function:\n{LONG_CODE}"


def optimizer_for(
    engine: FakeEngine,
    style: PromptStyle = PromptStyle.CHAT_INSTRUCTION,
    **params: Any,
) -> PromptOptimizer:
    return PromptOptimizer(engine, style, OptimizeParams(**params))


def result_of(outcome: RewriteResult | RewriteFailure) -> RewriteResult:
    assert isinstance(outcome, RewriteResult), outcome
    return outcome


@pytest.mark.parametrize("style", [PromptStyle.CHAT_INSTRUCTION, PromptStyle.BPO_TEMPLATE])
async def test_single_rewrite(style: PromptStyle) -> None:
    engine = FakeEngine({TIPS: f'Sure! Here\'s an improved version of your prompt:\n\n"{TIPS_1}"'})
    result = await optimizer_for(engine, style).optimize(TIPS)
    assert result.optimized == TIPS_1
    assert result.original == TIPS
    assert result.changed
    assert result.fallback_reason is None
    assert result.stop_reason == "rounds_completed"
    assert result.rounds_done == 1
    assert result.model == FAKE_IDENTITY.name
    assert result.model_version == FAKE_IDENTITY.version
    assert result.engine == "fake"
    assert result.round_outputs == [TIPS_1]
    assert engine.prompts_seen == [TIPS]
    request = engine.requests[0]
    assert (request.messages is None) == (style == PromptStyle.BPO_TEMPLATE)
    assert request.params.temperature == 0.6
    assert request.params.top_p == 0.9
    assert request.params.max_tokens == 1024


async def test_batch_keeps_order_and_sends_one_batch() -> None:
    engine = FakeEngine({TIPS: TIPS_1, PARIS: PARIS_1, COPPER: COPPER_1})
    inputs = [PromptInput(PARIS), PromptInput(COPPER), PromptInput(TIPS)]
    outcomes = await optimizer_for(engine).optimize_batch(inputs)
    assert [result_of(o).original for o in outcomes] == [PARIS, COPPER, TIPS]
    assert [result_of(o).optimized for o in outcomes] == [PARIS_1, COPPER_1, TIPS_1]
    assert len(engine.batches) == 1
    assert engine.prompts_seen == [PARIS, COPPER, TIPS]


async def test_batch_with_invalid_item_keeps_the_others_aligned() -> None:
    engine = FakeEngine({TIPS: TIPS_1, PARIS: PARIS_1})
    outcomes = await optimizer_for(engine).optimize_batch([PromptInput(PARIS), PromptInput("  \n"), PromptInput(TIPS)])
    assert result_of(outcomes[0]).optimized == PARIS_1
    assert isinstance(outcomes[1], RewriteFailure)
    assert outcomes[1].status_code == "INVALID_ARGUMENT"
    assert outcomes[1].original == "  \n"
    assert result_of(outcomes[2]).optimized == TIPS_1
    assert engine.prompts_seen == [PARIS, TIPS]


async def test_empty_batch() -> None:
    engine = FakeEngine()
    assert await optimizer_for(engine).optimize_batch([]) == []
    assert engine.batches == []


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
async def test_empty_prompt_is_invalid(prompt: str) -> None:
    engine = FakeEngine()
    optimizer = optimizer_for(engine)
    (outcome,) = await optimizer.optimize_batch([PromptInput(prompt)])
    assert isinstance(outcome, RewriteFailure)
    assert outcome.status_code == "INVALID_ARGUMENT"
    assert "empty" in outcome.error
    with pytest.raises(InvalidPromptError, match="empty"):
        await optimizer.optimize(prompt)
    assert engine.batches == []


async def test_too_long_prompt() -> None:
    engine = FakeEngine(context_length=300)
    optimizer = optimizer_for(engine, PromptStyle.BPO_TEMPLATE)
    prompt = "Explain this, word by word: " + "lorem ipsum dolor " * 60
    (outcome,) = await optimizer.optimize_batch([PromptInput(prompt)])
    assert isinstance(outcome, RewriteFailure)
    assert outcome.status_code == "INVALID_ARGUMENT"
    assert "context holds 300" in outcome.error
    assert f"at least {MIN_OUTPUT_TOKENS} kept for the rewrite" in outcome.error
    assert "context field" in outcome.error
    with pytest.raises(InvalidPromptError, match=r"prompt needs \d+ tokens but the engine's context holds 300"):
        await optimizer.optimize(prompt)
    assert engine.batches == []


async def test_max_tokens_is_limited_by_the_room_left() -> None:
    engine = FakeEngine({TIPS: TIPS_1}, context_length=200)
    await optimizer_for(engine, PromptStyle.BPO_TEMPLATE).optimize(TIPS)
    request = engine.requests[0]
    assert request.params.max_tokens == 200 - engine.count_prompt_tokens(request)
    assert MIN_OUTPUT_TOKENS <= request.params.max_tokens < 1024


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply("I'm sorry, but I can't help with job interview tips."), "refusal"),
        (Reply("   "), "empty_output"),
        (Reply("You are an expert prompt engineer. Give me 3 tips for a job interview."), "framing_leaked"),
        (Reply("[INST] Give me 3 tips for a job interview. [/INST]"), "empty_output"),
        (Reply(TIPS_1, finish_reason="length"), "truncated"),
        (
            Reply("Give me practical tips for a job interview, covering preparation and follow-up."),
            "dropped_facts",
        ),
        (
            Reply("Photosynthesis turns sunlight into chemical energy; 3 stages are involved."),
            "answer_not_rewrite",
        ),
    ],
)
async def test_fallback_keeps_the_original_byte_for_byte(reply: Reply, reason: str) -> None:
    prompt = "  Give me 3 tips\tfor a job   interview.  \n"
    engine = FakeEngine({prompt: reply})
    result = await optimizer_for(engine).optimize(prompt)
    assert result.optimized == prompt
    assert not result.changed
    assert result.fallback_reason == reason
    assert result.stop_reason == reason
    assert result.rounds_done == 0
    assert result.round_outputs == []


async def test_unchanged_rewrite_returns_the_original_byte_for_byte() -> None:
    prompt = "Give me 3 tips   for a job interview.\n"
    engine = FakeEngine({prompt: "Give me 3 tips for a job interview."})
    result = await optimizer_for(engine, rounds=3).optimize(prompt)
    assert result.optimized == prompt
    assert result.stop_reason == "unchanged"
    assert result.rounds_done == 1
    assert result.fallback_reason is None
    assert len(engine.batches) == 1


async def test_iterative_rounds_stop_when_unchanged() -> None:
    engine = FakeEngine({TIPS: TIPS_1, TIPS_1: TIPS_2, TIPS_2: f"  {TIPS_2.replace(', ', ',  ')}\n"})
    result = await optimizer_for(engine).optimize(TIPS, rounds=5)
    assert result.optimized == TIPS_2
    assert result.stop_reason == "unchanged"
    assert result.rounds_done == 3
    assert engine.prompts_seen == [TIPS, TIPS_1, TIPS_2]
    assert len(result.round_outputs) == 3
    assert result.round_outputs[:2] == [TIPS_1, TIPS_2]
    assert result.params["rounds"] == 5


async def test_iterative_rounds_run_to_completion() -> None:
    engine = FakeEngine({TIPS: TIPS_1, TIPS_1: TIPS_2, TIPS_2: TIPS_3})
    result = await optimizer_for(engine, rounds=3).optimize(TIPS)
    assert result.optimized == TIPS_3
    assert result.stop_reason == "rounds_completed"
    assert result.rounds_done == 3
    assert result.round_outputs == [TIPS_1, TIPS_2, TIPS_3]
    assert result.params["rounds"] == 3


async def test_items_leave_the_batch_independently() -> None:
    engine = FakeEngine({TIPS: TIPS_1, TIPS_1: TIPS_2, PARIS: PARIS})
    outcomes = await optimizer_for(engine, rounds=2).optimize_batch([PromptInput(PARIS), PromptInput(TIPS)])
    assert [len(batch) for batch in engine.batches] == [2, 1]
    assert result_of(outcomes[0]).stop_reason == "unchanged"
    assert result_of(outcomes[1]).optimized == TIPS_2


async def test_rejected_later_round_keeps_the_previous_rewrite() -> None:
    engine = FakeEngine({TIPS: TIPS_1, TIPS_1: "I'm sorry, I cannot improve this prompt further."})
    result = await optimizer_for(engine).optimize(TIPS, rounds=3)
    assert result.optimized == TIPS_1
    assert result.fallback_reason is None
    assert result.stop_reason == "refusal_in_round_2"
    assert result.rounds_done == 1
    assert result.round_outputs == [TIPS_1]
    assert len(engine.batches) == 2


async def test_later_round_too_long_for_the_context_keeps_the_previous_rewrite() -> None:
    engine = FakeEngine({TIPS: TIPS_3}, context_length=4096)
    style = PromptStyle.BPO_TEMPLATE
    probe = engine.count_prompt_tokens(optimizer_request(TIPS, style, OptimizeParams().sampling_for(TIPS, 1)))
    grown = engine.count_prompt_tokens(optimizer_request(TIPS_3, style, OptimizeParams().sampling_for(TIPS_3, 1)))
    engine.context_length = probe + MIN_OUTPUT_TOKENS + 1
    assert grown + MIN_OUTPUT_TOKENS > engine.context_length
    result = await optimizer_for(engine, style).optimize(TIPS, rounds=2)
    assert result.optimized == TIPS_3
    assert result.stop_reason == "prompt_too_long_in_round_2"
    assert result.rounds_done == 1
    assert len(engine.batches) == 1


@pytest.mark.parametrize("rounds", [0, -1])
async def test_rounds_below_one_are_rejected(rounds: int) -> None:
    engine = FakeEngine()
    with pytest.raises(InvalidPromptError, match="rounds must be at least 1"):
        await optimizer_for(engine).optimize(TIPS, rounds=rounds)
    assert engine.batches == []


async def test_protected_code_block_is_sent_as_a_marker_and_repaired() -> None:
    rewrite = "Find and fix the bug in the following Python function so that it returns the sum, and explain the fix."
    engine = FakeEngine({CODE_INSTRUCTION: rewrite})
    result = await optimizer_for(engine).optimize(CODE_PROMPT)
    sent = engine.prompts_seen[0]
    assert sent == CODE_INSTRUCTION
    assert "[PASSAGE 1]" in sent and "def add" not in sent
    assert result.optimized == f"{rewrite}\n{CODE}"
    assert result.repaired_spans == [1]
    assert result.fallback_reason is None


async def test_protected_code_block_kept_in_place_when_marker_survives() -> None:
    rewrite = "Find and fix the bug in this Python function:\n[PASSAGE 1]\nIt must return the sum of a and b."
    engine = FakeEngine({CODE_INSTRUCTION: rewrite})
    result = await optimizer_for(engine, PromptStyle.BPO_TEMPLATE).optimize(CODE_PROMPT)
    assert result.optimized == rewrite.replace("[PASSAGE 1]", CODE)
    assert result.repaired_spans == []


async def test_passage_inlined_by_the_model_is_rejected() -> None:
    instruction = segment(LONG_CODE_PROMPT).instruction
    assert instruction == "Fix the tax bug in this function:\n[PASSAGE 1]"
    inlined = (
        "Fix the tax bug in this Python function, total_price(items, tax_rate), which computes subtotal "
        "as the sum of item price for each item in items and returns subtotal * tax_rate instead of "
        "adding the tax."
    )
    engine = FakeEngine({instruction: inlined})
    result = await optimizer_for(engine).optimize(LONG_CODE_PROMPT)
    assert result.fallback_reason == "protected_span_altered"
    assert result.optimized == LONG_CODE_PROMPT


async def test_context_inlined_by_the_model_is_rejected() -> None:
    context = "Marie Curie won the Nobel Prize in Physics in 1903 and in Chemistry in 1911 for radium research."
    question = "When did she win her Nobel prizes?"
    inlined = (
        "When did she win her Nobel prizes? Marie Curie won the Nobel Prize in Physics in 1903 and "
        "in Chemistry in 1911 for radium research."
    )
    engine = FakeEngine({question: inlined})
    result = await optimizer_for(engine).optimize(question, context)
    assert result.fallback_reason == "protected_span_altered"
    assert result.optimized == question
    assert result.context == context
    assert context not in engine.prompts_seen[0]


async def test_prompt_that_is_only_protected_material_is_not_sent() -> None:
    engine = FakeEngine()
    result = await optimizer_for(engine).optimize(f"{CODE}\n")
    assert result.optimized == f"{CODE}\n"
    assert result.stop_reason == "no_instruction"
    assert engine.batches == []


async def test_tokens_are_summed_over_rounds() -> None:
    engine = FakeEngine({TIPS: TIPS_1, TIPS_1: TIPS_2})
    result = await optimizer_for(engine, rounds=2).optimize(TIPS)
    assert len(engine.requests) == 2
    expected_in = sum(engine.count_prompt_tokens(r) for r in engine.requests)
    assert result.tokens_in == expected_in
    assert result.tokens_out == completion_tokens_for(TIPS_1) + completion_tokens_for(TIPS_2)
    assert engine.usage.calls == 2
    assert engine.usage.prompt_tokens == expected_in


async def test_params_dict() -> None:
    engine = FakeEngine({TIPS: TIPS_1, TIPS_1: TIPS_1})
    result = await optimizer_for(engine, temperature=0.2, top_p=0.5, max_new_tokens=300, seed=9).optimize(
        TIPS, rounds=2
    )
    assert result.params == {"temperature": 0.2, "top_p": 0.5, "max_new_tokens": 300, "seed": 9, "rounds": 2}
    assert result.to_dict()["params"]["rounds"] == 2
    assert engine.requests[0].params.temperature == 0.2
    assert engine.requests[0].params.top_p == 0.5
    assert engine.requests[0].params.max_tokens == 300


async def test_per_item_seed_does_not_depend_on_batch_position() -> None:
    engine = FakeEngine({TIPS: TIPS_1, PARIS: PARIS_1, COPPER: COPPER_1})
    optimizer = optimizer_for(engine, seed=1234)
    await optimizer.optimize_batch([PromptInput(TIPS), PromptInput(PARIS)])
    await optimizer.optimize_batch([PromptInput(COPPER), PromptInput(PARIS), PromptInput(TIPS)])
    seeds: dict[str, set[int | None]] = {}
    for request in engine.requests:
        seeds.setdefault(user_prompt_of(request), set()).add(request.params.seed)
    assert seeds[TIPS] == {derive_seed(1234, TIPS)}
    assert seeds[PARIS] == {derive_seed(1234, PARIS)}
    assert seeds[COPPER] == {derive_seed(1234, COPPER)}
    assert len({derive_seed(1234, p) for p in (TIPS, PARIS, COPPER)}) == 3
    assert derive_seed(1234, TIPS) != derive_seed(1235, TIPS)


async def test_no_seed_means_no_seed() -> None:
    engine = FakeEngine({TIPS: TIPS_1})
    await optimizer_for(engine).optimize(TIPS)
    assert engine.requests[0].params.seed is None
    assert derive_seed(None, TIPS) is None


async def test_engine_unavailable_fails_every_item() -> None:
    engine = FakeEngine(error=EngineUnavailableError("endpoint down"))
    optimizer = optimizer_for(engine)
    outcomes = await optimizer.optimize_batch([PromptInput(TIPS), PromptInput(PARIS)])
    for outcome, prompt in zip(outcomes, [TIPS, PARIS], strict=True):
        assert isinstance(outcome, RewriteFailure)
        assert outcome.status_code == "UNAVAILABLE"
        assert outcome.error == "endpoint down"
        assert outcome.original == prompt
    with pytest.raises(EngineUnavailableError, match="endpoint down"):
        await optimizer.optimize(TIPS)
