"""The optimizer's own instructions coming back inside a rewrite: stripped where they stand alone, else rejected."""

from __future__ import annotations

import pytest

from bpo.optimizer.cleaning import clean_rewrite, strip_framing_echo
from bpo.optimizer.guards import FallbackReason, check_rewrite, framing_leaked
from bpo.optimizer.prompting import (
    CHAT_SYSTEM_INSTRUCTION,
    LANGUAGE_NOTE,
    PASSAGE_EXAMPLE,
    PASSAGE_NOTE,
    PLAIN_EXAMPLE,
    REWRITE_REQUEST,
    SAFETY_NOTE,
)

pytestmark = pytest.mark.unit


def test_the_issues_leak_is_stripped_and_what_is_left_is_judged() -> None:
    # Through the openai engine, SmolLM2 turned "explain kubernetes" into this.
    raw = f"Explain kube-cocos-2038\n{REWRITE_REQUEST}"
    assert clean_rewrite(raw) == "Explain kube-cocos-2038"
    assert check_rewrite("explain kubernetes", clean_rewrite(raw), truncated=False) is FallbackReason.DROPPED_ENTITY
    assert check_rewrite("explain kubernetes", raw, truncated=False) is FallbackReason.FRAMING_LEAKED


def test_an_echoed_exchange_keeps_only_the_improved_prompt() -> None:
    raw = "Original prompt: explain kubernetes\nImproved prompt: Explain how Kubernetes schedules containers."
    assert clean_rewrite(raw) == "Explain how Kubernetes schedules containers."
    # Without an echoed original, the label is for clean_rewrite's own label stripping.
    assert strip_framing_echo("Improved prompt: Explain X.") == "Improved prompt: Explain X."


@pytest.mark.parametrize(
    "rewrite",
    [
        "Explain how Kubernetes works. Do not answer it.",
        "Explain how Kubernetes works. Rewrite it as a better prompt.",
        "You are an expert prompt engineer. Explain how Kubernetes works.",
        "Explain how Kubernetes works. Reply with the improved prompt only.",
        "Explain how Kubernetes works; keep each marker exactly as written and do not write the passage out.",
        "Explain how Kubernetes works. Write the improved prompt in Spanish.",
        "Explain how Kubernetes works. Original prompt: explain kubernetes",
        "[INST] Explain how Kubernetes works [/INST]",
        f"Explain how Kubernetes works. {PLAIN_EXAMPLE[1]}",
    ],
)
def test_leaked_framing_is_rejected(rewrite: str) -> None:
    assert framing_leaked("explain kubernetes", rewrite)
    assert check_rewrite("explain kubernetes", rewrite, truncated=False) is FallbackReason.FRAMING_LEAKED


def test_every_instruction_text_is_recognised() -> None:
    for text in (CHAT_SYSTEM_INSTRUCTION, PASSAGE_NOTE, SAFETY_NOTE, LANGUAGE_NOTE.format(language="German")):
        assert framing_leaked("explain kubernetes", f"Explain Kubernetes. {text}"), text


def test_the_users_own_words_are_not_a_leak() -> None:
    original = "Here is a riddle; do not answer it, just make it harder."
    assert not framing_leaked(original, "Make this riddle harder without solving it; do not answer it.")
    assert not framing_leaked("Give me tips for a job interview", "Give me practical tips for a job interview.")


def test_a_prompt_like_a_worked_examples_original_may_be_rewritten_like_it() -> None:
    # The passage example's original reads like a user's prompt; only what the examples' answers say is framing.
    original = "fix this function:\n[PASSAGE 1]"
    rewrite = "Fix this function [PASSAGE 1] and explain what the bug was."
    assert not framing_leaked(original, rewrite)
    assert check_rewrite(original, rewrite, truncated=False) is None
    assert framing_leaked(original, f"{rewrite} {PASSAGE_EXAMPLE[1]}")
