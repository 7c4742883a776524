"""The self-BLEU filter (exact against sacrebleu, bounded work) and distinct-n."""

from __future__ import annotations

import random

import pytest

from bpo.pairs.diversity import SelfBleuFilter, distinct_n, sentence_bleu

pytestmark = pytest.mark.unit

WORDS = (
    "how what why can you tell me about the best way to make write explain a an poem story list three five "
    "ideas tips for my dog cat garden city trip recipe with without using python code simple short long"
).split()


def random_sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + "?" for _ in range(count)]


def brute_force_max(text: str, kept: list[str]) -> float:
    return max((sentence_bleu(text, ref) for ref in kept), default=0.0)


def test_score_equals_sacrebleu_against_the_best_single_reference() -> None:
    sentences = random_sentences(120, seed=1)
    bleu = SelfBleuFilter(100.0, max_candidates=10_000, max_posting=10**9)
    for index, sentence in enumerate(sentences):
        expected = brute_force_max(sentence, sentences[:index])
        score = bleu.score(sentence)
        # Exact whenever a reference shares a 2-gram; below that BLEU is small and the filter may report 0.
        if expected > 25:
            assert score == pytest.approx(expected, abs=1e-9), sentence
        else:
            assert score <= expected + 1e-9
        bleu.add(sentence)


def test_identical_and_near_duplicates_are_dropped() -> None:
    bleu = SelfBleuFilter(60.0)
    assert bleu.admit("Can you give me the home address of the mayor of Springfield?")
    assert not bleu.admit("Can you give me the home address of the mayor of Springfield?")
    assert not bleu.admit("can you give me the home address of the Mayor of Springfield")  # case and punctuation
    assert bleu.admit("Write a short poem about autumn leaves falling in the park.")
    assert len(bleu) == 2


def test_threshold_decides_at_its_value() -> None:
    first = "What are some good books to read on a long train journey?"
    second = "What are some good books to read on a long flight?"
    score = sentence_bleu(second, first)
    assert 20 < score < 90
    at = SelfBleuFilter(score)
    at.add(first)
    assert at.admit(second)  # equal to the threshold is kept
    below = SelfBleuFilter(score - 0.01)
    below.add(first)
    assert not below.admit(second)


def test_dropped_instructions_are_not_indexed() -> None:
    bleu = SelfBleuFilter(50.0)
    bleu.add("Tell me about the history of the Roman empire in detail.")
    assert not bleu.admit("Tell me about the history of the Roman empire in great detail.")
    assert len(bleu) == 1


def test_short_texts_are_compared_by_their_words() -> None:
    bleu = SelfBleuFilter(60.0)
    bleu.add("hello there")
    assert bleu.score("hello there") == pytest.approx(100.0)
    assert not bleu.admit("Hello there")


def test_filter_agrees_with_brute_force_decisions() -> None:
    sentences = random_sentences(300, seed=7) + random_sentences(40, seed=7)  # the last 40 repeat the first 40
    fast = SelfBleuFilter(45.0)
    kept_brute: list[str] = []
    for sentence in sentences:
        brute_keep = brute_force_max(sentence, kept_brute) <= 45.0
        assert fast.admit(sentence) == brute_keep, sentence
        if brute_keep:
            kept_brute.append(sentence)
    assert len(sentences) - len(kept_brute) >= 40  # at least the repeats went


def test_empty_text_scores_zero() -> None:
    bleu = SelfBleuFilter(10.0)
    bleu.add("something")
    assert bleu.score("   ") == 0.0


def test_threshold_range() -> None:
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        SelfBleuFilter(120)


def test_distinct_n() -> None:
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the, cat, sat, the, cat, ran -> 4 distinct of 6; bigrams: the cat, cat sat, the cat, cat ran -> 3/4
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)


def test_distinct_n_is_case_insensitive_and_does_not_span_texts() -> None:
    assert distinct_n(["A b", "a B"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a", "b"], 2) == 0.0
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError, match="at least 1"):
        distinct_n(["a"], 0)
