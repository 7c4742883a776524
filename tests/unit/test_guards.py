from __future__ import annotations

import pytest

from bpo.optimizer.guards import (
    FallbackReason,
    GuardConfig,
    check_rewrite,
    content_words,
    numbers,
    span_inlined,
)

pytestmark = pytest.mark.unit

ORIGINAL = "Give me 3 tips for a job interview in 2024."
GOOD = "Give me 3 practical tips for a job interview in 2024, covering research, common questions and follow-up."


def check(rewrite: str, original: str = ORIGINAL, truncated: bool = False) -> FallbackReason | None:
    return check_rewrite(original, rewrite, truncated=truncated)


def test_good_rewrite_passes() -> None:
    assert check(GOOD) is None


def test_unchanged_rewrite_passes() -> None:
    assert check(ORIGINAL) is None


def test_short_prompt_may_grow_into_a_real_instruction() -> None:
    # A 1-word prompt may grow more than 6x as long as the result stays short (not an answer).
    assert check("Say hello back to me in a warm, friendly way with a short greeting.", original="hi") is None


@pytest.mark.parametrize("rewrite", ["", "   \n\t"])
def test_empty_output(rewrite: str) -> None:
    assert check(rewrite) is FallbackReason.EMPTY_OUTPUT


def test_truncated_output() -> None:
    assert check(GOOD, truncated=True) is FallbackReason.TRUNCATED


@pytest.mark.parametrize(
    "rewrite",
    [
        "[INST] Give me 3 tips for a job interview in 2024 [/INST]",
        "You are an expert prompt engineer. Give me 3 tips for a job interview in 2024.",
        "Please help me improve this prompt: give me 3 tips for a job interview in 2024.",
        "Give me 3 tips for a job interview in 2024. Reply with the improved prompt only.",
    ],
)
def test_template_copy_is_leaked_framing(rewrite: str) -> None:
    assert check(rewrite) is FallbackReason.FRAMING_LEAKED


@pytest.mark.parametrize(
    "rewrite",
    [
        "I'm sorry, but I can't help with 3 job interview tips for 2024.",
        "As an AI, I cannot give 3 job interview tips for 2024.",
        "Unfortunately I am unable to list 3 job interview tips for 2024.",
    ],
)
def test_refusal(rewrite: str) -> None:
    assert check(rewrite) is FallbackReason.REFUSAL


def test_apologetic_original_may_keep_its_apology() -> None:
    original = "I'm sorry to bother you, but write a note to my boss about my absence."
    rewrite = "I'm sorry to bother you, but write a short, polite note to my boss explaining my absence."
    assert check(rewrite, original=original) is None


@pytest.mark.parametrize(
    "rewrite",
    [
        "Give me practical tips for a job interview in 2024, covering preparation and follow-up.",
        "Give me 3 practical tips for a job interview this year, covering preparation and follow-up.",
        "Give me 3.5 practical tips for a job interview in 2024.",
    ],
)
def test_dropped_numbers(rewrite: str) -> None:
    assert check(rewrite) is FallbackReason.DROPPED_FACTS


def test_shrinking_by_more_than_half_drops_facts() -> None:
    original = "Write a short poem about the sea at night under a full moon for children"
    assert check("Write a sea poem.", original=original) is FallbackReason.DROPPED_FACTS
    # Exactly half the words is allowed (ratio 2.0 is not above the limit).
    assert check("Write a poem about the sea at night.", original="Write a poem about the sea at night " * 2) is None


def test_long_growth_is_an_answer() -> None:
    answer = "Job interview tips for 2024: research the company, practise 3 answers. " + "Be ready. " * 40
    assert len(answer.split()) >= 60
    assert check(answer) is FallbackReason.ANSWER_NOT_REWRITE


def test_low_content_overlap_is_an_answer() -> None:
    answer = "Photosynthesis converts sunlight into chemical energy in plants; 3 stages matter in 2024."
    assert check(answer) is FallbackReason.ANSWER_NOT_REWRITE


def test_overlap_check_is_configurable_and_skipped_for_tiny_prompts() -> None:
    loose = GuardConfig(min_content_overlap=0.0)
    answer = "Photosynthesis converts sunlight into chemical energy in plants; 3 stages matter in 2024."
    assert check_rewrite(ORIGINAL, answer, truncated=False, config=loose) is None
    # Fewer than 3 content words in the original: no overlap judgement.
    assert check("Compose a rhyming verse about winter mornings.", original="Write a poem.") is None


def test_markers_are_neither_numbers_nor_content() -> None:
    original = "Summarize [PASSAGE 1] in 2 sentences."
    assert numbers(original) == {"2"}
    assert check("Summarize the article in [PASSAGE 1] in exactly 2 clear sentences.", original=original) is None
    # Marker numbers may disappear (reassembly repairs them); real numbers may not.
    assert check("Summarize the article below in exactly 2 clear sentences.", original=original) is None
    assert check("Summarize the article in [PASSAGE 1] in two clear sentences.", original=original) is (
        FallbackReason.DROPPED_FACTS
    )


def test_numbers() -> None:
    assert numbers("Version 1.2.3 has 1,000 items, x2 and 50% of [PASSAGE 2].") == {"1.2.3", "1,000", "50"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A number runs into a unit or suffix, or into Chinese, and is still a number.
        ("How amazing would 100k context be?", {"100"}),
        ("Music of the 1980s", {"1980"}),
        ("比较一下iPhone 15和华为Mate 60的优缺点", {"15", "60"}),
        ("我有3个苹果", {"3"}),
        ("A 3.5GHz or a 3.5 GHz chip", {"3.5"}),
        # After an ASCII letter, digit, underscore or dot it continues a name, kept by the entity guard.
        ("Compare GPT4, x86 and v2 with .5", set()),
        ("x1,200", {"200"}),
    ],
)
def test_numbers_next_to_letters(text: str, expected: set[str]) -> None:
    assert numbers(text) == expected


def test_a_number_with_a_suffix_must_be_kept() -> None:
    original = "How amazing would 100k context be in a transformer?"
    assert check("How useful would a very long context be in a transformer?", original) is FallbackReason.DROPPED_FACTS
    assert check("How useful would a 100k-token context be in a transformer?", original) is None


def test_content_words_drop_stopwords_and_case() -> None:
    assert content_words("Please explain THE Theory of relativity") == {"theory", "relativity"}


PASSAGE = (
    "The quick brown fox jumps over the lazy dog near the riverbank while farmers harvest golden wheat "
    "under a cloudless September sky."
)


def test_span_inlined_long_passage() -> None:
    assert span_inlined(f"Summarize this: {PASSAGE}", PASSAGE)
    paraphrase = "Summarize: a brown fox jumps over a lazy dog by the riverbank as farmers harvest wheat in September."
    assert span_inlined(paraphrase, PASSAGE)
    assert not span_inlined("Summarize the passage [PASSAGE 1] in two sentences.", PASSAGE)


def test_span_inlined_short_passage_needs_the_exact_text() -> None:
    assert span_inlined("Fix `x = 1` please", "x = 1")
    assert not span_inlined("Fix the assignment please", "x = 1")
