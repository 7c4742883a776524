"""Evaluation statistics: rates, ΔWR and its bootstrap interval, categories, lengths and length strata."""

from __future__ import annotations

import json
import math
import random

import pytest

from bpo.evaluation.outcomes import ItemOutcome, Winner
from bpo.evaluation.stats import (
    LONGER_ABOVE,
    SHORTER_BELOW,
    bootstrap_delta_wr,
    by_category,
    length_controlled,
    length_ratio,
    length_stats,
    length_stratum,
    pearson,
    summarize,
)

pytestmark = pytest.mark.unit


def words(n: int) -> str:
    return " ".join(["w"] * n)


def outcome(
    winner: Winner = "tie",
    *,
    category: str = "",
    changed: bool = True,
    original_answer: str = "one two three four five",
    optimized_answer: str = "one two three four five",
    judged_orders: int = 2,
    position_consistent: bool = True,
) -> ItemOutcome:
    return ItemOutcome(
        item_id="i",
        source_id="s",
        category=category,
        prompt="Tell me about cats.",
        optimized_prompt="Tell me about cats, in detail." if changed else "Tell me about cats.",
        original_answer=original_answer,
        optimized_answer=optimized_answer,
        winner=winner,
        judged_orders=judged_orders,
        position_consistent=position_consistent,
    )


def repeat(winner: Winner, count: int) -> list[Winner]:
    return [winner] * count


def mixed(wins: int, ties: int, losses: int, *, seed: int = 1) -> list[ItemOutcome]:
    winners: list[Winner] = [*repeat("optimized", wins), *repeat("tie", ties), *repeat("original", losses)]
    random.Random(seed).shuffle(winners)
    return [outcome(w) for w in winners]


def test_rates_and_delta_wr_on_a_hand_made_set() -> None:
    items = mixed(5, 3, 2)
    items[0] = outcome(items[0].winner, changed=False)
    summary = summarize(items)
    outcomes = summary.outcomes
    assert (outcomes.n, outcomes.wins, outcomes.ties, outcomes.losses) == (10, 5, 3, 2)
    assert (outcomes.win_rate, outcomes.tie_rate, outcomes.lose_rate) == pytest.approx((0.5, 0.3, 0.2))
    assert outcomes.delta_wr == pytest.approx(0.3)
    assert summary.unchanged_prompts == 1
    assert summary.unchanged_rate == pytest.approx(0.1)
    low, high = outcomes.delta_wr_ci
    assert -1.0 <= low <= 0.3 <= high <= 1.0
    data = summary.to_dict()
    assert list(data) == [
        "n", "wins", "ties", "losses", "win_rate", "tie_rate", "lose_rate", "delta_wr", "delta_wr_ci",
        "position_consistency", "identical_answers", "unchanged_prompts", "unchanged_rate",
    ]  # fmt: skip
    assert data["delta_wr"] == 0.3 and data["win_rate"] == 0.5
    assert list(outcomes.to_dict()) == ["n", "wins", "ties", "losses", "delta_wr", "delta_wr_ci"]
    assert json.loads(json.dumps(data, allow_nan=False)) == data


def test_bootstrap_matches_the_normal_approximation_and_is_reproducible() -> None:
    items = mixed(500, 300, 200)
    outcomes = summarize(items, seed=7).outcomes
    assert outcomes.delta_wr == pytest.approx(0.3)
    low, high = outcomes.delta_wr_ci
    assert low < 0.3 < high
    variance = (0.5 + 0.2) - 0.3**2  # E[s²] - E[s]² of a +1 / 0 / -1 score
    expected_width = 2 * 1.96 * math.sqrt(variance / len(items))
    assert high - low == pytest.approx(expected_width, rel=0.15)
    assert summarize(items, seed=7).outcomes.delta_wr_ci == outcomes.delta_wr_ci
    # ΔWR of 1000 items moves in steps of 0.001, so two seeds can land on the same bounds; five rarely do.
    assert len({summarize(items, seed=seed).outcomes.delta_wr_ci for seed in range(5)}) > 1


def test_a_wider_confidence_gives_a_wider_interval() -> None:
    items = mixed(50, 30, 20)
    narrow = summarize(items, confidence=0.8).outcomes.delta_wr_ci
    wide = summarize(items, confidence=0.99).outcomes.delta_wr_ci
    assert wide[0] <= narrow[0] and narrow[1] <= wide[1]


def test_interval_collapses_when_every_item_agrees() -> None:
    assert summarize(mixed(20, 0, 0)).outcomes.delta_wr_ci == (1.0, 1.0)
    assert summarize(mixed(0, 0, 20)).outcomes.delta_wr_ci == (-1.0, -1.0)
    assert summarize(mixed(0, 20, 0)).outcomes.delta_wr_ci == (0.0, 0.0)


def test_zero_items() -> None:
    summary = summarize([])
    outcomes = summary.outcomes
    assert (outcomes.n, outcomes.wins, outcomes.ties, outcomes.losses) == (0, 0, 0, 0)
    assert (outcomes.win_rate, outcomes.tie_rate, outcomes.lose_rate, outcomes.delta_wr) == (0.0, 0.0, 0.0, 0.0)
    assert outcomes.delta_wr_ci == (0.0, 0.0)
    assert summary.position_consistency is None
    assert (summary.unchanged_prompts, summary.unchanged_rate, summary.identical_answers) == (0, 0.0, 0)
    assert by_category([]) == {}
    assert length_stats([]).to_dict() == {
        "n": 0, "original_mean": 0.0, "original_median": 0.0, "optimized_mean": 0.0, "optimized_median": 0.0,
        "median_ratio": 0.0, "optimized_longer_share": 0.0,
    }  # fmt: skip
    control = length_controlled([])
    assert [(name, s.n) for name, s in control.strata.items()] == [("shorter", 0), ("similar", 0), ("longer", 0)]
    assert control.length_controlled_delta_wr is None and control.length_controlled_ci is None
    assert control.length_win_correlation is None
    for data in (summary.to_dict(), control.to_dict(), length_stats([]).to_dict()):
        json.dumps(data, allow_nan=False)


def test_position_consistency_leaves_out_identical_answers() -> None:
    items = [
        outcome("optimized", position_consistent=True),
        outcome("tie", position_consistent=False),
        outcome("original", position_consistent=True),
        outcome("optimized", position_consistent=True),
        # Identical answers: a tie without a judge call, which says nothing about the judge.
        outcome("tie", judged_orders=0, position_consistent=False),
        outcome("tie", judged_orders=0, position_consistent=False),
    ]
    summary = summarize(items)
    assert summary.position_consistency == pytest.approx(0.75)
    assert summary.identical_answers == 2
    assert summary.to_dict()["position_consistency"] == 0.75
    only_identical = summarize([outcome("tie", judged_orders=0, position_consistent=False)])
    assert only_identical.position_consistency is None
    assert only_identical.to_dict()["position_consistency"] is None


def test_per_category_sorted_with_empty_category_named() -> None:
    items = [
        outcome("optimized", category="writing"),
        outcome("optimized", category="writing"),
        outcome("original", category="writing"),
        outcome("original", category="math"),
        outcome("tie", category=""),
    ]
    categories = by_category(items)
    assert list(categories) == ["(none)", "math", "writing"]
    none, math_, writing = categories.values()
    assert (none.n, none.ties, none.delta_wr) == (1, 1, 0.0)
    assert (math_.n, math_.losses, math_.delta_wr, math_.delta_wr_ci) == (1, 1, -1.0, (-1.0, -1.0))
    assert (writing.n, writing.wins, writing.losses) == (3, 2, 1)
    assert writing.delta_wr == pytest.approx(1 / 3)
    assert writing.to_dict()["delta_wr"] == 0.3333
    assert "category" not in writing.to_dict()  # the report names each group


def test_strata_bounds_belong_to_similar() -> None:
    assert (SHORTER_BELOW, LONGER_ABOVE) == (0.8, 1.25)
    assert length_stratum(0.8) == "similar"
    assert length_stratum(1.25) == "similar"
    assert length_stratum(1.0) == "similar"
    assert length_stratum(0.7999) == "shorter"
    assert length_stratum(1.2501) == "longer"
    # Ratios computed from word counts land exactly on the bounds.
    at_low = outcome(original_answer=words(5), optimized_answer=words(4))
    at_high = outcome(original_answer=words(4), optimized_answer=words(5))
    assert length_ratio(at_low) == SHORTER_BELOW and length_ratio(at_high) == LONGER_ABOVE
    items = [
        outcome("optimized", original_answer=words(10), optimized_answer=words(8)),  # 0.8: similar
        outcome("original", original_answer=words(8), optimized_answer=words(10)),  # 1.25: similar
        outcome("optimized", original_answer=words(10), optimized_answer=words(7)),  # shorter
        outcome("optimized", original_answer=words(4), optimized_answer=words(20)),  # longer
        outcome("optimized", original_answer=words(4), optimized_answer=words(6)),  # longer
    ]
    control = length_controlled(items)
    assert [(name, s.n) for name, s in control.strata.items()] == [("shorter", 1), ("similar", 2), ("longer", 2)]
    assert control.strata["longer"].delta_wr == 1.0
    assert control.length_controlled_delta_wr == 0.0
    assert control.length_controlled_ci == control.strata["similar"].delta_wr_ci
    assert [(s["stratum"], s["n"]) for s in control.to_dict()["strata"]] == [
        ("shorter", 1), ("similar", 2), ("longer", 2),
    ]  # fmt: skip


def test_empty_answers_count_as_one_word() -> None:
    both_empty = outcome(original_answer="", optimized_answer="   ")
    grew = outcome(original_answer="", optimized_answer="two words")
    vanished = outcome(original_answer="a b c d", optimized_answer="")
    assert length_ratio(both_empty) == 1.0
    assert length_ratio(grew) == 2.0
    assert length_ratio(vanished) == 0.25
    stats = length_stats([both_empty, grew, vanished])
    assert stats.original_mean == pytest.approx(4 / 3)
    assert stats.optimized_mean == pytest.approx(2 / 3)
    assert (stats.original_median, stats.optimized_median) == (0.0, 0.0)
    assert stats.median_ratio == 1.0
    assert stats.optimized_longer_share == pytest.approx(1 / 3)
    control = length_controlled([both_empty, grew, vanished])
    assert [s.n for s in control.strata.values()] == [1, 1, 1]
    json.dumps(control.to_dict(), allow_nan=False)


def test_length_statistics() -> None:
    items = [
        outcome(original_answer=words(10), optimized_answer=words(20)),
        outcome(original_answer=words(20), optimized_answer=words(20)),
        outcome(original_answer=words(30), optimized_answer=words(15)),
    ]
    stats = length_stats(items)
    assert (stats.n, stats.original_mean, stats.original_median) == (3, 20.0, 20.0)
    assert stats.optimized_mean == pytest.approx(55 / 3)
    assert stats.optimized_median == 20.0
    assert stats.median_ratio == 1.0  # ratios 2.0, 1.0, 0.5
    assert stats.optimized_longer_share == pytest.approx(1 / 3)


def test_length_win_correlation() -> None:
    longer_wins = [
        outcome("original", original_answer=words(10), optimized_answer=words(5)),
        outcome("tie", original_answer=words(10), optimized_answer=words(10)),
        outcome("optimized", original_answer=words(10), optimized_answer=words(20)),
        outcome("optimized", original_answer=words(10), optimized_answer=words(40)),
    ]
    correlation = length_controlled(longer_wins).length_win_correlation
    assert correlation is not None and 0.9 < correlation <= 1.0


@pytest.mark.parametrize(
    "items",
    [
        pytest.param([outcome("optimized"), outcome("original")], id="fewer-than-three"),
        pytest.param([outcome("optimized"), outcome("original"), outcome("tie")], id="same-length-ratio"),
        pytest.param([outcome("optimized", optimized_answer=words(n)) for n in (1, 5, 9)], id="same-score"),
    ],
)
def test_length_win_correlation_undefined(items: list[ItemOutcome]) -> None:
    assert length_controlled(items).length_win_correlation is None


def test_pearson() -> None:
    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert pearson([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert pearson([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]) is None
    with pytest.raises(ValueError, match="pairs"):
        pearson([1.0], [1.0, 2.0])


def test_bootstrap_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="bootstrap_samples"):
        bootstrap_delta_wr(1, 1, 1, bootstrap_samples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_delta_wr(1, 1, 1, confidence=1.0)
    with pytest.raises(ValueError, match="negative"):
        bootstrap_delta_wr(-1, 1, 1)
