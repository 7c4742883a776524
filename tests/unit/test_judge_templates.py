"""Judge templates: the paper's prompts as published, and the prompting variants calibration compares."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from bpo.engines.base import GenerationRequest
from bpo.judging.pairwise import (
    JUDGE_TEMPLATES,
    RUBRIC,
    VERDICT_FIRST_OPENING,
    VERDICT_FIRST_REMINDER,
    VOTE_TEMPERATURE,
    JudgeInput,
    JudgeTemplateSpec,
    PairwiseJudge,
)
from bpo.judging.verdicts import ParsedVerdict, majority_verdict, parse_pair_verdict
from bpo.optimizer.prompting import reference_text
from tests.unit.scripted_engine import ScriptedEngine, last_user_turn

pytestmark = pytest.mark.unit

PAIR_V2 = json.loads(reference_text("judge_pair_v2.json"))
QUESTION = "How do I boil an egg?"
GOOD = "Put the egg in boiling water for 9 minutes, then cool it in cold water."
BAD = "Eggs are food."


def always(text: str) -> Callable[[GenerationRequest], str]:
    return lambda request: text


def system_of(template: str) -> str:
    system, _ = PairwiseJudge(ScriptedEngine(always("")), template).messages_for(QUESTION, GOOD, BAD)
    assert system.role == "system"
    return system.content


# -- names ---------------------------------------------------------------------------------------------------


def test_the_papers_templates_come_first_and_every_name_parses_back_to_itself() -> None:
    assert JUDGE_TEMPLATES[:2] == ("pair-v2", "ranking")
    assert len(set(JUDGE_TEMPLATES)) == len(JUDGE_TEMPLATES)
    for name in JUDGE_TEMPLATES:
        assert JudgeTemplateSpec.parse(name).name == name
    assert JudgeTemplateSpec.parse("pair-v2+rubric+verdict-first+vote3") == JudgeTemplateSpec(
        "pair-v2", rubric=True, verdict_first=True, votes=3
    )
    assert "ranking+vote5" in JUDGE_TEMPLATES


@pytest.mark.parametrize(
    "name",
    ["pair-v1", "ranking+rubric", "ranking+verdict-first", "pair-v2+vote2", "pair-v2+verdict-first+rubric", ""],
)
def test_invalid_names_are_refused_with_the_valid_ones(name: str) -> None:
    with pytest.raises(ValueError, match="unknown judge template") as raised:
        JudgeTemplateSpec.parse(name)
    assert "pair-v2+rubric+verdict-first" in str(raised.value)
    with pytest.raises(ValueError, match="unknown judge template"):
        PairwiseJudge(ScriptedEngine(always("")), name)


def test_invalid_combinations_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="ranking template is the paper's"):
        JudgeTemplateSpec("ranking", rubric=True)
    with pytest.raises(ValueError, match="votes must be"):
        JudgeTemplateSpec("pair-v2", votes=2)


# -- prompts -------------------------------------------------------------------------------------------------


def test_pair_v2_is_the_papers_prompt_unchanged() -> None:
    judge = PairwiseJudge(ScriptedEngine(always("")), "pair-v2")
    system, user = judge.messages_for(QUESTION, GOOD, BAD)
    assert system.content == PAIR_V2["system_prompt"]
    assert user.content.endswith("[The End of Assistant B's Answer]")


def test_rubric_replaces_the_papers_list_of_factors_and_keeps_the_rest() -> None:
    paper, rubric = PAIR_V2["system_prompt"], system_of("pair-v2+rubric")
    assert "helpfulness, relevance, accuracy, depth, creativity" in paper
    assert "helpfulness, relevance, accuracy, depth, creativity" not in rubric
    assert RUBRIC in rubric and rubric.startswith("Please act as an impartial judge")
    assert rubric.endswith('and "[[C]]" for a tie.')  # the paper's closing instruction stays


def test_verdict_first_asks_for_the_verdict_before_the_explanation() -> None:
    system = system_of("pair-v2+verdict-first")
    assert VERDICT_FIRST_OPENING in system
    assert "After providing your explanation" not in system
    assert "Begin your evaluation by comparing" not in system
    _, user = PairwiseJudge(ScriptedEngine(always("")), "pair-v2+verdict-first").messages_for(QUESTION, GOOD, BAD)
    assert user.content.endswith("[The End of Assistant B's Answer]" + VERDICT_FIRST_REMINDER)
    both = system_of("pair-v2+rubric+verdict-first")
    assert RUBRIC in both and VERDICT_FIRST_OPENING in both


def test_ranking_with_votes_keeps_the_papers_ranking_prompt() -> None:
    plain = PairwiseJudge(ScriptedEngine(always("")), "ranking").messages_for(QUESTION, GOOD, BAD)
    voted = PairwiseJudge(ScriptedEngine(always("")), "ranking+vote3").messages_for(QUESTION, GOOD, BAD)
    assert plain == voted and len(plain) == 1


# -- reading a verdict-first reply ---------------------------------------------------------------------------


def test_verdict_first_reads_the_first_paragraph_and_reasoning_first_the_last() -> None:
    output = "[[A]]\n\nAssistant A explains the timing; a judge that read on to here might say [[B]]."
    assert parse_pair_verdict(output, verdict_first=True) == ParsedVerdict("A")
    assert parse_pair_verdict(output).letter == "B"
    cut_off = "  \n[[B]] because Assistant B is"
    assert parse_pair_verdict(cut_off, verdict_first=True) == ParsedVerdict("B")
    assert "first paragraph" in str(parse_pair_verdict("I think\n\n[[A]]", verdict_first=True).problem)


async def test_a_verdict_first_judge_is_read_from_the_start_of_its_reply() -> None:
    engine = ScriptedEngine(always("[[A]]\n\nThe first answer is better than [[B]] would be."))
    (verdict,) = await PairwiseJudge(engine, "pair-v2+verdict-first").judge_batch([JudgeInput(QUESTION, BAD, GOOD)])
    assert [j.verdict for j in verdict.judgements] == ["A", "A"]
    assert verdict.winner == "tie" and not verdict.position_consistent


# -- votes ---------------------------------------------------------------------------------------------------


def test_majority_verdict() -> None:
    a, b, c, unreadable = ParsedVerdict("A"), ParsedVerdict("B"), ParsedVerdict("C"), ParsedVerdict("", "x")
    assert majority_verdict([a, a, b]) == a
    assert majority_verdict([unreadable, b, unreadable]) == b
    assert majority_verdict([a, b, c]).problem == "the 3 samples split without a majority: [[A]] x1, [[B]] x1, [[C]] x1"
    assert majority_verdict([a, b, unreadable]).letter == ""
    assert majority_verdict([unreadable] * 3).problem == "none of the 3 samples gave a readable verdict"


async def test_a_vote_samples_each_order_with_seeds_that_follow_the_request_not_its_batch_position() -> None:
    replies = iter(["[[A]]", "[[B]]", "[[A]]", "[[B]]", "[[B]]", "nothing"] * 2)
    engine = ScriptedEngine(lambda request: next(replies))
    judge = PairwiseJudge(engine, "pair-v2+vote3", max_new_tokens=40, seed=7)
    (verdict,) = await judge.judge_batch([JudgeInput(QUESTION, BAD, GOOD)])
    requests = engine.requests
    assert len(requests) == 6
    first_order, second_order = requests[:3], requests[3:]
    assert {last_user_turn(r) for r in first_order} == {last_user_turn(first_order[0])}
    assert last_user_turn(first_order[0]) != last_user_turn(second_order[0])
    seeds = [r.params.seed for r in requests]
    assert None not in seeds and len(set(seeds)) == 6
    assert all(r.params.temperature == VOTE_TEMPERATURE and r.params.max_tokens == 40 for r in requests)
    optimized_first, optimized_second = verdict.judgements
    assert optimized_first.votes == ("A", "B", "A") and optimized_first.verdict == "A"
    assert optimized_second.votes == ("B", "B", "") and optimized_second.verdict == "B"
    assert verdict.winner == "optimized" and verdict.position_consistent
    assert optimized_first.reasoning.startswith("[sample 1 of 3: A]\n[[A]]\n\n[sample 2 of 3: B]\n[[B]]")
    assert optimized_first.tokens_in == sum(engine.count_prompt_tokens(r) for r in first_order)

    again = ScriptedEngine(always("[[C]]"))
    await PairwiseJudge(again, "pair-v2+vote3", max_new_tokens=40, seed=7).judge_batch(
        [JudgeInput("another question", "x", "y"), JudgeInput(QUESTION, BAD, GOOD)]
    )
    assert [r.params.seed for r in again.requests[6:]] == seeds
    other_seed = ScriptedEngine(always("[[C]]"))
    await PairwiseJudge(other_seed, "pair-v2+vote3", seed=8).judge_batch([JudgeInput(QUESTION, BAD, GOOD)])
    assert [r.params.seed for r in other_seed.requests] != seeds


async def test_greedy_templates_make_one_greedy_call_per_order() -> None:
    engine = ScriptedEngine(always("Fine.\n\n[[C]]"))
    (verdict,) = await PairwiseJudge(engine, "pair-v2+rubric").judge_batch([JudgeInput(QUESTION, BAD, GOOD)])
    assert len(engine.requests) == 2 and all(r.params.greedy and r.params.seed is None for r in engine.requests)
    assert all(judgement.votes == () for judgement in verdict.judgements)
