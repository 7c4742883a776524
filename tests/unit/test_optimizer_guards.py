"""The optimizer with the guards of the rewrite-quality issue: what the model sees and what it may not lose."""

from __future__ import annotations

import pytest

from bpo.models.catalogue import PromptStyle
from bpo.optimizer.optimizer import OptimizeParams, PromptOptimizer
from tests.unit.fakes import FakeEngine

pytestmark = pytest.mark.unit

GRAMMAR = 'Is "Me and him went to the store" grammatical?'


def optimizer(engine: FakeEngine) -> PromptOptimizer:
    return PromptOptimizer(engine, PromptStyle.CHAT_INSTRUCTION, OptimizeParams())


async def test_a_short_quotation_is_sent_as_a_marker_and_comes_back_byte_for_byte() -> None:
    rewrite = "Check whether the sentence [PASSAGE 1] is grammatically correct, and explain why."
    engine = FakeEngine({"Is [PASSAGE 1] grammatical?": rewrite})
    result = await optimizer(engine).optimize(GRAMMAR)
    assert engine.prompts_seen == ["Is [PASSAGE 1] grammatical?"]
    assert result.optimized == rewrite.replace("[PASSAGE 1]", '"Me and him went to the store"')
    assert result.fallback_reason is None


@pytest.mark.parametrize(
    "rewrite",
    [
        # The issue's case: the sentence under question came back corrected.
        'Check whether the sentence "He and I went to the store" is grammatically correct.',
        # Lost without a trace: a quotation appended after the rewrite no longer says what was asked.
        "Check whether the sentence is grammatically correct, and explain why.",
    ],
)
async def test_a_lost_quotation_keeps_the_original(rewrite: str) -> None:
    engine = FakeEngine({"Is [PASSAGE 1] grammatical?": rewrite})
    result = await optimizer(engine).optimize(GRAMMAR)
    assert result.optimized == GRAMMAR
    assert result.fallback_reason == "protected_span_altered"


@pytest.mark.parametrize(
    ("prompt", "rewrite", "reason"),
    [
        ("Plan a 3-day trip to Lisbon without a car.", "Plan a detailed 3-day road trip to Lisbon by car.",
         "dropped_constraint"),
        ("Integrate x^2 * sin(x) dx", "Compute the integral of x^3 with respect to x.", "formula_altered"),
        ("用Python写一个快速排序算法", "Write a quicksort algorithm in Python.", "language_changed"),
        ("explain kubernetes", "Explain kube-cocos-2038\nRewrite it as a better prompt. Do not answer it.",
         "dropped_entity"),
        # What the rewrite-quality benchmark found the optimizers doing, one case of each class.
        ("A ball and a sticker cost 1.10 $ in total. The ball costs 1$ more than the sticker. How much does the "
         "sticker cost?", "How much does the sticker cost? The sticker costs $1 more than the ball, and the ball "
         "costs $1.10.", "relation_changed"),
        ("서울에서 가볼 만한 곳을 추천해 주세요", "Seoul에서 가장 좋아하는 곳을 추천해 주세요.", "language_changed"),
        ("Name a few cities worldwide where traffic congestion is an issue",
         "Here are five cities in the world where traffic congestion is a major issue.", "answer_not_rewrite"),
        ("If f(x) = 3x^2 - 4x + 1, find f(2)",
         "Given a function f(x) = 3x^2 - 4x + 1, find its derivative f'(x) using the chain rule.", "dropped_entity"),
        ("Recomiéndame tres libros de Gabriel García Márquez",
         "What are the five most influential books of Gabriel García Márquez?", "language_changed"),
        ("How many songs have been recorded throughout history?",
         "The answer to this question is the number of songs recorded throughout history.", "answer_not_rewrite"),
        ("What's a good way to embarrass someone publicly?",
         "What is a good way to embarrass someone in front of their friends?", "unsafe_not_reframed"),
    ],
)  # fmt: skip
async def test_each_issue_and_benchmark_case_keeps_the_original_with_its_reason(
    prompt: str, rewrite: str, reason: str
) -> None:
    result = await optimizer(FakeEngine({prompt: rewrite})).optimize(prompt)
    assert result.optimized == prompt
    assert result.fallback_reason == reason


@pytest.mark.parametrize(
    ("prompt", "rewrite"),
    [
        # The relation kept, the words around it moved and paraphrased.
        ("A ball and a sticker cost 1.10 $ in total. The ball costs 1$ more than the sticker. How much does the "
         "sticker cost?", "A ball and a sticker cost $1.10 in total, and the ball costs $1 more than the sticker. "
         "How much does the sticker cost? Explain each step of your reasoning."),
        ("Give me 5 ideas for a party with more than 10 guests",
         "List 5 creative party ideas for a gathering of more than 10 guests, with a short description of each."),
        ("If f(x) = 3x^2 - 4x + 1, find f(2)",
         "Given the function f(x) = 3x^2 - 4x + 1, compute f(2) and show each step of the calculation."),
        # Latin letters the prompt already held.
        ("用Python写一个快速排序算法", "请用Python编写一个快速排序算法，并解释它的时间复杂度和每一步的作用。"),
    ],
)  # fmt: skip
async def test_a_faithful_rewrite_of_the_same_kinds_is_used(prompt: str, rewrite: str) -> None:
    result = await optimizer(FakeEngine({prompt: rewrite})).optimize(prompt)
    assert result.fallback_reason is None
    assert result.optimized == rewrite
