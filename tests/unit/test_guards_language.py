"""A rewrite stays in the prompt's language and script; the optimizer is told which that is."""

from __future__ import annotations

import pytest

from bpo.engines.base import SamplingParams
from bpo.models.catalogue import PromptStyle
from bpo.optimizer.guards import FallbackReason, check_rewrite, word_count
from bpo.optimizer.language import language_changed, profile
from bpo.optimizer.prompting import LANGUAGE_NOTE, PLAIN_EXAMPLE, PLAIN_EXAMPLES_BY_LANGUAGE, optimizer_request

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "system", "language", "name"),
    [
        ("Write a poem about the sea at night", "latin", "en", "English"),
        ("Escribe un plan de viaje de tres días por Madrid sin coche", "latin", "es", "Spanish"),
        ("Explique-moi la photosynthèse et son rôle", "latin", "fr", "French"),
        ("Erkläre mir bitte die Relativitätstheorie", "latin", "de", "German"),
        ("用Python写一个快速排序算法", "han", None, "Chinese"),
        ("東京で一番おいしいラーメン屋を教えてください", "japanese", None, "Japanese"),
        ("서울에서 가볼 만한 곳을 추천해 주세요", "hangul", None, "Korean"),
        ("Объясни, как работает квантовый компьютер", "cyrillic", None, "Russian"),
        ("Поясни, як працює квантовий комп'ютер", "ukrainian", None, "Ukrainian"),
        ("Εξήγησε τη φωτοσύνθεση", "greek", None, "Greek"),
        ("explain kubernetes", "latin", None, None),
    ],
)
def test_profile_tells_the_writing_system_and_language(
    text: str, system: str, language: str | None, name: str | None
) -> None:
    found = profile(text)
    assert (found.system, found.language, found.name) == (system, language, name)


def test_passage_markers_are_not_the_users_words() -> None:
    assert profile("解释 [PASSAGE 1] 的意思").system == "han"


@pytest.mark.parametrize(
    ("original", "rewrite"),
    [
        # The cases: a Chinese prompt back in English around one Chinese word, a Spanish one in English.
        (
            "用Python写一个快速排序算法，并解释时间复杂度",
            "Write a quicksort algorithm in Python and explain its 时间复杂度.",
        ),
        ("Escribe un plan de viaje de tres días por Madrid sin coche", "Write a three-day travel plan for Madrid."),
        ("Объясни, как работает квантовый компьютер", "Explain how a quantum computer works, step by step."),
        ("Write a poem about the sea at night", "Escribe un poema sobre el mar de noche con tres estrofas."),
    ],
)
def test_another_language_is_rejected(original: str, rewrite: str) -> None:
    assert language_changed(original, rewrite)
    assert check_rewrite(original, rewrite, truncated=False) is FallbackReason.LANGUAGE_CHANGED


@pytest.mark.parametrize(
    ("original", "rewrite"),
    [
        ("用Python写一个快速排序算法", "请用Python编写一个快速排序算法，并解释其时间复杂度和空间复杂度。"),
        ("Escribe un plan de viaje por Madrid", "Escribe un plan de viaje detallado de tres días por Madrid."),
        ("explain kubernetes", "Explain how Kubernetes schedules and scales containers."),
        ("42", "Explain the significance of the number 42 in The Hitchhiker's Guide to the Galaxy."),
    ],
)
def test_the_same_language_passes(original: str, rewrite: str) -> None:
    assert not language_changed(original, rewrite)


def test_chinese_length_counts_characters() -> None:
    assert word_count("hello world") == 2
    assert word_count("请用Python编写一个快速排序算法") == pytest.approx(1 + 12 / 1.5)
    # A Chinese answer instead of a rewrite: far more words than the prompt, with almost none of its pairs.
    original = "解释一下光合作用"
    assert check_rewrite(original, "光合作用是植物利用阳光的过程。" * 20, truncated=False) is (
        FallbackReason.ANSWER_NOT_REWRITE
    )


def test_the_optimizer_is_told_the_prompts_language_with_an_example_in_it() -> None:
    request = optimizer_request("Escribe un plan de viaje sin coche", PromptStyle.CHAT_INSTRUCTION, SamplingParams())
    assert request.messages is not None
    assert request.messages[0].content.endswith(LANGUAGE_NOTE.format(language="Spanish"))
    assert PLAIN_EXAMPLES_BY_LANGUAGE["es"][0] in request.messages[1].content
    chinese = optimizer_request("用Python写一个快速排序算法", PromptStyle.CHAT_INSTRUCTION, SamplingParams())
    assert chinese.messages is not None
    assert LANGUAGE_NOTE.format(language="Chinese") in chinese.messages[0].content
    assert PLAIN_EXAMPLES_BY_LANGUAGE["han"][1] in chinese.messages[2].content
    english = optimizer_request("Write a poem about the sea", PromptStyle.CHAT_INSTRUCTION, SamplingParams())
    assert english.messages is not None
    assert "The original prompt is in" not in english.messages[0].content
    assert PLAIN_EXAMPLE[0] in english.messages[1].content
