"""Rule filters and the paper's output filters (length-ratio bounds at their edges, ``[protected``)."""

from __future__ import annotations

import pytest

from bpo.pairs.filters import (
    EMPTY_RESPONSE,
    IDENTICAL_RESPONSES,
    TOO_SHORT,
    RuleConfig,
    has_protected_marker,
    length_ratio_ok,
    rule_decision,
)

pytestmark = pytest.mark.unit

GOOD = "A thorough and correct answer."
BAD = "A poor answer."


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


@pytest.mark.parametrize(
    ("instruction", "config", "expected"),
    [
        ("Explain photosynthesis simply.", RuleConfig(), None),
        ("Hi there", RuleConfig(), TOO_SHORT),  # two words
        ("   ", RuleConfig(), TOO_SHORT),
        ("a b c", RuleConfig(), TOO_SHORT),  # three words but five characters
        ("a b c", RuleConfig(min_words=3, min_chars=5), None),
        ("Hi there", RuleConfig(min_words=2, min_chars=1), None),
        ("Explain photosynthesis simply.", RuleConfig(min_words=4), TOO_SHORT),
    ],
)
def test_too_short(instruction: str, config: RuleConfig, expected: str | None) -> None:
    assert rule_decision(instruction, GOOD, BAD, config) == expected


def test_min_chars_counts_the_stripped_instruction() -> None:
    config = RuleConfig(min_words=1, min_chars=10)
    assert rule_decision("  short  \n", GOOD, BAD, config) == TOO_SHORT
    assert rule_decision("  long enough  ", GOOD, BAD, config) is None


@pytest.mark.parametrize(("chosen", "rejected"), [("", BAD), (GOOD, ""), ("  \n", BAD), (GOOD, "\t")])
def test_empty_responses(chosen: str, rejected: str) -> None:
    assert rule_decision("Explain photosynthesis simply.", chosen, rejected, RuleConfig()) == EMPTY_RESPONSE


def test_identical_responses_after_whitespace() -> None:
    instruction = "Explain photosynthesis simply."
    assert rule_decision(instruction, GOOD, f"  {GOOD}\n", RuleConfig()) == IDENTICAL_RESPONSES
    assert rule_decision(instruction, GOOD, GOOD.lower(), RuleConfig()) is None


def test_filters_apply_in_order() -> None:
    # Too short wins over an empty response: the first failing filter names the decision.
    assert rule_decision("Hi", "", "", RuleConfig()) == TOO_SHORT
    assert rule_decision("Explain photosynthesis simply.", "", "", RuleConfig()) == EMPTY_RESPONSE


def test_rule_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RuleConfig(min_words=0)


@pytest.mark.parametrize(
    ("user_words", "opt_words", "kept"),
    [
        (10, 5, True),  # words(X_user)/words(X_opt) == 2: at the bound, kept
        (11, 5, False),  # 2.2 > 2
        (9, 4, False),  # 2.25 > 2
        (1, 6, True),  # words(X_opt)/words(X_user) == 6: at the bound, kept
        (1, 7, False),
        (3, 18, True),
        (3, 19, False),  # 6.33 > 6
        (5, 5, True),
        (4, 0, False),  # an empty rewrite has an infinite ratio
    ],
)
def test_length_ratio_edges(user_words: int, opt_words: int, kept: bool) -> None:
    assert length_ratio_ok(words(user_words), words(opt_words)) is kept


def test_length_ratio_counts_whitespace_separated_words() -> None:
    assert length_ratio_ok("one two", "one\ntwo\tthree   four")  # 2 vs 4
    assert not length_ratio_ok("one two three four five", "one,two")  # 5 vs 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Rewrite [protected] text", True),
        ("keep [PROTECTED part] as is", True),
        ("a [Protected", True),
        ("protected parts are kept", False),
        ("[ protected]", False),
    ],
)
def test_protected_marker(text: str, expected: bool) -> None:
    assert has_protected_marker(text) is expected
