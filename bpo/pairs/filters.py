"""The rule filters applied before the LLM sees a record, and the paper's filters on what the LLM wrote.

Decisions are strings stored in ``prompt_pairs.decision``: ``kept`` or ``dropped:<filter>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

KEPT: Final = "kept"
TOO_SHORT: Final = "dropped:too_short"
EMPTY_RESPONSE: Final = "dropped:empty_response"
IDENTICAL_RESPONSES: Final = "dropped:identical_responses"
SELF_BLEU: Final = "dropped:self_bleu"
NO_MARKER: Final = "dropped:no_marker"
LENGTH_RATIO: Final = "dropped:length_ratio"
PROTECTED: Final = "dropped:protected"
PROMPT_TOO_LONG: Final = "dropped:prompt_too_long"
GENERATION_ERROR: Final = "dropped:generation_error"

# Decided before any model call: a record dropped by one of these never reaches the LLM, and the self-BLEU
# filter compares a new instruction only with records that passed them.
PREFILTER_DECISIONS: Final = frozenset({TOO_SHORT, EMPTY_RESPONSE, IDENTICAL_RESPONSES, SELF_BLEU})

# The paper's bounds (thu-coai/BPO process_optimized_prompts.py): a rewrite this much shorter or longer than
# the instruction is more likely an answer, a refusal or a truncation than a better prompt.
MAX_SHRINK: Final = 2  # words(X_user) / words(X_opt) above this is dropped
MAX_GROWTH: Final = 6  # words(X_opt) / words(X_user) above this is dropped
PROTECTED_MARKER: Final = "[protected"


DEFAULT_MIN_WORDS: Final = 3
DEFAULT_MIN_CHARS: Final = 10


@dataclass(frozen=True, slots=True)
class RuleConfig:
    """Thresholds of the rule filters. The paper names the filter ("too short") but not its numbers."""

    min_words: int = DEFAULT_MIN_WORDS
    min_chars: int = DEFAULT_MIN_CHARS

    def __post_init__(self) -> None:
        if self.min_words < 1 or self.min_chars < 1:
            raise ValueError("min_words and min_chars must be at least 1")


def rule_decision(instruction: str, chosen: str, rejected: str, config: RuleConfig) -> str | None:
    """The first rule filter the record fails, or None when it passes them all."""
    text = instruction.strip()
    if len(text.split()) < config.min_words or len(text) < config.min_chars:
        return TOO_SHORT
    if not chosen.strip() or not rejected.strip():
        return EMPTY_RESPONSE
    if chosen.strip() == rejected.strip():
        return IDENTICAL_RESPONSES
    return None


def length_ratio_ok(x_user: str, x_opt: str) -> bool:
    """The paper's bounds on word counts (``str.split``), compared in integers so the edges are exact."""
    user_words, opt_words = len(x_user.split()), len(x_opt.split())
    if opt_words == 0:
        return False
    return user_words <= MAX_SHRINK * opt_words and opt_words <= MAX_GROWTH * user_words


def has_protected_marker(x_opt: str) -> bool:
    return PROTECTED_MARKER in x_opt.lower()
