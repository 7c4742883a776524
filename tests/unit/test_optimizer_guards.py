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
    ],
)  # fmt: skip
async def test_each_issue_case_keeps_the_original_with_its_reason(prompt: str, rewrite: str, reason: str) -> None:
    result = await optimizer(FakeEngine({prompt: rewrite})).optimize(prompt)
    assert result.optimized == prompt
    assert result.fallback_reason == reason
