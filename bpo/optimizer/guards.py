"""Decide whether a candidate rewrite may replace the user's prompt.

Each check returns a reason when the rewrite must not be used; the optimizer then keeps the original and
records the reason. The checks are deliberately conservative: keeping a prompt as the user wrote it costs
little, while an answer, a refusal or a rewrite that dropped the user's numbers costs the user their intent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from bpo.optimizer.spans import MARKER_RE


class FallbackReason(StrEnum):
    EMPTY_OUTPUT = "empty_output"
    REFUSAL = "refusal"
    TEMPLATE_COPY = "template_copy"
    ANSWER_NOT_REWRITE = "answer_not_rewrite"
    DROPPED_FACTS = "dropped_facts"
    TRUNCATED = "truncated"
    PROTECTED_SPAN_ALTERED = "protected_span_altered"
    ENGINE_ERROR = "engine_error"


_REFUSAL = re.compile(
    r"^\s*(?:i['’]?m sorry|i am sorry|sorry,|i cannot|i can['’]?t|i won['’]?t|i will not|as an ai\b|"
    r"i['’]?m (?:not able|unable)|i am (?:not able|unable)|unfortunately,? i)",
    re.IGNORECASE,
)
_TEMPLATE_FRAGMENTS = (
    "[INST]",
    "[/INST]",
    "You are an expert prompt engineer",
    "Please help me improve this prompt",
    "Reply with the improved prompt only",
)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])")
_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]+")
_STOPWORDS = frozenset(
    """a an the and or but if then of to in on at by for with from into about as is are was were be been being
    it its this that these those there here what which who whom whose when where why how i me my we our you
    your he she they them his her their do does did can could should would will shall may might must not no
    please some any all more most very just so than too also only give tell write make explain describe list
    provide create generate""".split()
)
# The paper keeps a pair only if words(X_user)/words(X_opt) <= 2 and words(X_opt)/words(X_user) <= 6.
MAX_SHRINK_RATIO = 2.0
MAX_GROWTH_RATIO = 6.0


def words(text: str) -> list[str]:
    return text.split()


def content_words(text: str) -> set[str]:
    return {w.lower().strip("'’-") for w in _WORD.findall(text)} - _STOPWORDS


def numbers(text: str) -> set[str]:
    return set(_NUMBER.findall(MARKER_RE.sub(" ", text)))


@dataclass(frozen=True, slots=True)
class GuardConfig:
    min_content_overlap: float = 0.34
    min_words_for_overlap_check: int = 3
    answer_min_words: int = 60


def span_inlined(rewrite: str, span_text: str, *, threshold: float = 0.6) -> bool:
    """The rewrite carries the passage's material itself (copied or paraphrased) instead of its marker."""
    material = content_words(span_text)
    if len(material) < 5:
        return span_text.strip() in rewrite
    return len(material & content_words(rewrite)) / len(material) >= threshold


def check_rewrite(
    original: str, rewrite: str, *, truncated: bool, config: GuardConfig | None = None
) -> FallbackReason | None:
    """``original`` and ``rewrite`` are instructions with ``[PASSAGE n]`` markers, not the reassembled prompts.

    Lost markers are not judged here: reassembly repairs them, or the optimizer rejects a rewrite that
    inlined the passage (``span_inlined``).
    """
    config = config or GuardConfig()
    if not rewrite.strip():
        return FallbackReason.EMPTY_OUTPUT
    if truncated:
        return FallbackReason.TRUNCATED
    if any(fragment.lower() in rewrite.lower() for fragment in _TEMPLATE_FRAGMENTS):
        return FallbackReason.TEMPLATE_COPY
    if _REFUSAL.match(rewrite) and not _REFUSAL.match(original):
        return FallbackReason.REFUSAL
    if not numbers(original) <= numbers(rewrite):
        return FallbackReason.DROPPED_FACTS
    original_words, rewrite_words = len(words(original)), len(words(rewrite))
    if original_words / max(rewrite_words, 1) > MAX_SHRINK_RATIO:
        return FallbackReason.DROPPED_FACTS
    if rewrite_words / max(original_words, 1) > MAX_GROWTH_RATIO and rewrite_words >= config.answer_min_words:
        return FallbackReason.ANSWER_NOT_REWRITE
    wanted = content_words(MARKER_RE.sub(" ", original))
    if len(wanted) >= config.min_words_for_overlap_check:
        kept = len(wanted & content_words(rewrite)) / len(wanted)
        if kept < config.min_content_overlap:
            return FallbackReason.ANSWER_NOT_REWRITE
    return None
