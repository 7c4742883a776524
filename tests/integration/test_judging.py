"""Answers and pairwise verdicts from the real SmolLM2 engine: too weak a judge for its verdicts to mean
anything, so only their structure is checked."""

from __future__ import annotations

import pytest

from bpo.engines.base import EngineClient
from bpo.generation.answers import AnswerGenerator, AnswerInput
from bpo.judging.pairwise import JudgeInput, PairVerdict, PairwiseJudge

pytestmark = pytest.mark.integration

ARTICLE = "The Eiffel Tower was finished in 1889 for the World's Fair in Paris and is 330 metres tall."
ITEMS = [
    AnswerInput(
        "Summarize this.", "Summarize the text below in one sentence, keeping the year and the height.", ARTICLE
    ),
    AnswerInput("Name a primary colour.", "Name a primary colour."),
]


def assert_well_formed(verdict: PairVerdict) -> None:
    first, second = verdict.judgements
    assert (first.optimized_first, second.optimized_first) == (True, False)
    for judgement in verdict.judgements:
        assert judgement.verdict in ("A", "B", "C", "")
        assert judgement.winner in ("optimized", "original", "tie")
        assert judgement.reasoning.strip()
        assert (judgement.problem is None) == judgement.readable
        assert judgement.tokens_in > 100 and judgement.tokens_out > 0
    expected = first.winner if first.winner == second.winner else "tie"
    assert verdict.winner == expected
    assert verdict.position_consistent == (first.winner == second.winner and first.readable and second.readable)
    assert verdict.tokens_in == first.tokens_in + second.tokens_in


async def test_answers_then_judge_both_orders(llamacpp_engine: EngineClient) -> None:
    calls_before = llamacpp_engine.usage.calls
    pairs = await AnswerGenerator(llamacpp_engine, max_new_tokens=64).answer_pairs(ITEMS)
    assert llamacpp_engine.usage.calls - calls_before == 3  # the unchanged prompt is answered once
    changed, unchanged = pairs
    assert not changed.reused and unchanged.reused
    assert changed.original_answer.strip() and changed.optimized_answer.strip()
    assert unchanged.original_answer == unchanged.optimized_answer
    assert changed.tokens_in > unchanged.tokens_in > 0 and changed.latency_s > 0

    judge_items = [
        JudgeInput(
            f"{item.original}\n{item.context}" if item.context else item.original, p.original_answer, p.optimized_answer
        )
        for item, p in zip(ITEMS, pairs, strict=True)
    ]
    calls_before = llamacpp_engine.usage.calls
    judged, identical = await PairwiseJudge(llamacpp_engine, max_new_tokens=96).judge_batch(judge_items)
    assert llamacpp_engine.usage.calls - calls_before == 2  # identical answers tie without a judge call
    assert_well_formed(judged)
    assert identical.identical_answers and identical.winner == "tie" and identical.judgements == ()

    (ranked,) = await PairwiseJudge(llamacpp_engine, template="ranking", max_new_tokens=48).judge_batch(judge_items[:1])
    assert_well_formed(ranked)
