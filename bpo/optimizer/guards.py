"""Decide whether a candidate rewrite may replace the user's prompt.

Each check returns a reason when the rewrite must not be used; the optimizer then keeps the original and
records the reason (``FallbackReason``: the one list of reasons). The checks are deliberately conservative:
keeping a prompt as the user wrote it costs little, while an answer, a refusal or a rewrite that dropped the
user's numbers costs the user their intent. In order, a rewrite is rejected when it:

- is empty, or was cut off at the token limit;
- repeats the optimizer's own instructions, labels or worked examples (``framing_leaked``);
- refuses;
- is written in another language or script (``bpo.optimizer.language``), or spells the words of a prompt in
  another script in Latin letters ("서울" come back as "Seoul");
- opens as an answer does ("Here are five cities ...");
- names a kind of harm the prompt did not (``bpo.optimizer.safety``);
- for a prompt that asks for something harmful: adds what would make it more effective, or does not turn it
  towards safety (the paper's safety enhancement); the facts of such a prompt are not held to, since turning
  it into a harmless request changes them on purpose;
- otherwise: changes a formula, drops a number, swaps what a quantitative relation compares, loses a named
  thing or a negated constraint (``bpo.optimizer.facts``), shrinks by more than the paper's bound, or grows or
  drifts into an answer.

The checks read model output and user text with RE2 patterns (``bpo.textscan``) and linear scanning code:
time linear in the text, whatever it holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from string import ascii_letters

from bpo.optimizer.facts import dropped_constraints, missing_entities, missing_formulas, reordered_relations
from bpo.optimizer.language import MIN_UNITS_TO_JUDGE, cjk_letters, language_changed, profile
from bpo.optimizer.prompting import framing_texts
from bpo.optimizer.safety import added_harm, assess, made_more_effective, reframed_safely
from bpo.optimizer.spans import MARKER_RE
from bpo.textscan import NOT_WORD, SPACE, linear


class FallbackReason(StrEnum):
    EMPTY_OUTPUT = "empty_output"
    REFUSAL = "refusal"
    FRAMING_LEAKED = "framing_leaked"
    ANSWER_NOT_REWRITE = "answer_not_rewrite"
    DROPPED_FACTS = "dropped_facts"
    FORMULA_ALTERED = "formula_altered"
    DROPPED_ENTITY = "dropped_entity"
    DROPPED_CONSTRAINT = "dropped_constraint"
    RELATION_CHANGED = "relation_changed"
    LANGUAGE_CHANGED = "language_changed"
    UNSAFE_NOT_REFRAMED = "unsafe_not_reframed"
    HARMFUL_DETAIL_ADDED = "harmful_detail_added"
    TRUNCATED = "truncated"
    PROTECTED_SPAN_ALTERED = "protected_span_altered"
    ENGINE_ERROR = "engine_error"


# Matched at the start of the text only. "as an ai" must end a word (``\b`` in ``re``; RE2's is ASCII-only).
_REFUSAL = linear(
    rf"^{SPACE}*(?:i['’]?m sorry|i am sorry|sorry,|i cannot|i can['’]?t|i won['’]?t|i will not|"
    rf"as an ai(?:{NOT_WORD}|\z)|i['’]?m (?:not able|unable)|i am (?:not able|unable)|unfortunately,? i|"
    rf"lo siento|no puedo|como (?:una )?(?:ia|inteligencia artificial)(?:{NOT_WORD}|\z)|"
    rf"抱歉|对不起|我不能|我无法|作为(?:一个)?(?:AI|人工智能))",
    ignore_case=True,
)
# How answers open and requests do not: "Here are five cities where ...", "Sure, ...", "The answer to this
# question is ...", "以下是...".
_ANSWER_OPENING = linear(
    rf"^{SPACE}*(?:here (?:are|is)|here['’]s|sure[,!.]|certainly[,!.]|of course[,!.]|the answer (?:is|to)|"
    rf"aqu[ií] (?:tienes|est[aá]n?|hay)|claro[,!.]|以下是|当然)",
    ignore_case=True,
)
# The paper's template markers, which no prompt of a user's holds by accident.
_TEMPLATE_MARKERS = ("[inst]", "[/inst]")
# A framing fragment shorter than this many words could be the user's own phrase; the labels are the exception.
_MIN_FRAGMENT_WORDS = 4
_HEAD_WORDS = 5
# Digit runs joined by single dots or commas ("3", "1,200", "2.5", "10.0.0.1"); ``_numbers_in`` looks at the
# character before each (RE2 has no look-behind).
_NUMBER_CHAIN = linear(r"\p{Nd}+(?:[.,]\p{Nd}+)*")
# Words are the matches of ``[A-Za-z][A-Za-z'’-]+``, found by ``_words`` with bytes.translate and split (a
# pattern would cost a call into RE2 for every word): bytes outside that class, and every character that is
# not ASCII but ’ (which stands in as NUL), become spaces.
_WORD_BYTES = bytes(byte if chr(byte) in ascii_letters + "'-\0" else ord(" ") for byte in range(256))
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


def _is_cjk(char: str) -> bool:
    return "\u3040" <= char <= "\u9fff" or "\uac00" <= char <= "\ud7af" or "\uf900" <= char <= "\ufaff"


# Characters of a Chinese or Japanese text per word, for the paper's word-count ratios.
_CJK_CHARS_PER_WORD = 1.5


def word_count(text: str) -> float:
    """Whitespace-separated words, plus the Chinese, Japanese and Korean characters as words of
    ``_CJK_CHARS_PER_WORD`` characters: a Chinese prompt holds no spaces, and its rewrite's length must still
    be comparable."""
    count = float(len(text.split()))
    if not text.isascii():
        count += cjk_letters(text) / _CJK_CHARS_PER_WORD
    return count


def _cjk_bigrams(text: str) -> set[str]:
    return {text[i : i + 2] for i in range(len(text) - 1) if _is_cjk(text[i]) and _is_cjk(text[i + 1])}


def _normalized(text: str) -> str:
    return " ".join(text.split()).casefold()


def _fragments(text: str, *, parts: bool) -> list[str]:
    """The sentences of one framing text, normalized; with ``parts`` their clauses and first ``_HEAD_WORDS``
    words too ("Please help me improve this prompt: ..."); labels (ending in a colon) whole. A worked example
    counts only by whole sentences: a rewrite may well follow it in part, which is what it is for."""
    pieces: list[str] = []
    for line in text.replace("{}", "\n").splitlines():
        stripped = line.strip()
        if stripped.endswith(":") and len(stripped.split()) <= 3:
            pieces.append(_normalized(stripped))
            continue
        for sentence in stripped.replace("? ", ". ").replace("! ", ". ").replace("。", ". ").split(". "):
            sentence_words = _normalized(sentence.strip(" .")).split()
            if parts and len(sentence_words) > _HEAD_WORDS:
                pieces.append(" ".join(sentence_words[:_HEAD_WORDS]))
            clauses = sentence.replace(": ", ", ").replace("; ", ", ").replace("，", ", ").split(", ")
            for clause in clauses if parts else [sentence]:
                normalized = _normalized(clause.strip(" .:,"))
                if word_count(normalized) >= _MIN_FRAGMENT_WORDS:
                    pieces.append(normalized)
    return pieces


@cache
def _framing_fragments() -> tuple[str, ...]:
    instructions, examples = framing_texts()
    found = [fragment for text in instructions for fragment in _fragments(text, parts=True)]
    found += [fragment for text in examples for fragment in _fragments(text, parts=False)]
    return tuple(dict.fromkeys(found))


def framing_leaked(original: str, rewrite: str) -> bool:
    """The rewrite repeats what the optimizer was told (its instructions, labels, template or worked
    examples), where the user's prompt does not hold the same words."""
    lowered = rewrite.casefold()
    if any(marker in lowered for marker in _TEMPLATE_MARKERS):
        return True
    said, asked = _normalized(rewrite), _normalized(original)
    return any(fragment in said and fragment not in asked for fragment in _framing_fragments())


def _words(text: str) -> Iterator[str]:
    """Each run of ASCII letters, apostrophes and hyphens, from its first letter on, when that leaves two
    characters or more: what ``[A-Za-z][A-Za-z'’-]+`` finds, left to right."""
    marked = text.replace("\0", " ").replace("’", "\0").encode("ascii", "replace")
    for run in marked.translate(_WORD_BYTES).split():
        word = run.decode("ascii").replace("\0", "’").lstrip("'’-")
        if len(word) >= 2:
            yield word


def latin_words_introduced(original: str, rewrite: str) -> bool:
    """A prompt written in another script comes back with Latin-script words it did not hold: a name or a word
    of the user's transliterated or translated ("서울에서" as "Seoul에서"), which the language check, reading
    shares of the whole text, lets through when the rest stays in the user's script. ``[PASSAGE n]`` markers
    are not the user's words."""
    before = profile(original)
    if before.units < MIN_UNITS_TO_JUDGE or before.system == "latin":
        return False
    held = {word.lower() for word in _words(MARKER_RE.sub(" ", original))}
    return any(word.lower() not in held for word in _words(MARKER_RE.sub(" ", rewrite)))


def content_words(text: str) -> set[str]:
    return {w.lower().strip("'’-") for w in _words(text)} - _STOPWORDS


def _continues_a_name(char: str) -> bool:
    """A digit after this character continues a name or a longer number ("x2", "GPT4", "v1.2", ".5"), which the
    entity guard reads, rather than starting a number: ASCII letters, digits, the underscore and the dot. A Chinese
    or Japanese character does not: "有3个" holds the number 3."""
    return char.isascii() and (char.isalnum() or char in "_.")


def _numbers_in(text: str) -> Iterator[str]:
    """Each maximal chain of digit runs joined by single dots or commas ("3", "1,200", "2.5", "10.0.0.1"), left to
    right, that does not continue a name (``_continues_a_name``); when it does, its part after its first comma
    is still a number ("x1,200" holds 200). What follows a chain does not matter: "100k", "1980s", "3rd", "3.5GHz"
    and "15和" hold numbers a rewrite must keep, and reading both texts the same way keeps "3.5GHz" and "3.5 GHz"
    the same number. One pass over the chains (``_NUMBER_CHAIN``)."""
    for start, end in _NUMBER_CHAIN.spans(text):
        if start > 0 and _continues_a_name(text[start - 1]):
            comma = text.find(",", start, end)
            if comma < 0:
                continue
            start = comma + 1
        yield text[start:end]


def numbers(text: str) -> set[str]:
    return set(_numbers_in(MARKER_RE.sub(" ", text)))


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
    inlined the passage (``span_inlined``) or lost a span that stands inside a sentence.
    """
    config = config or GuardConfig()
    if not rewrite.strip():
        return FallbackReason.EMPTY_OUTPUT
    if truncated:
        return FallbackReason.TRUNCATED
    if framing_leaked(original, rewrite):
        return FallbackReason.FRAMING_LEAKED
    if _REFUSAL.match(rewrite) and not _REFUSAL.match(original):
        return FallbackReason.REFUSAL
    if language_changed(original, rewrite) or latin_words_introduced(original, rewrite):
        return FallbackReason.LANGUAGE_CHANGED
    if _ANSWER_OPENING.match(rewrite) and not _ANSWER_OPENING.match(original):
        return FallbackReason.ANSWER_NOT_REWRITE
    if added_harm(original, rewrite):
        return FallbackReason.HARMFUL_DETAIL_ADDED
    original_words, rewrite_words = word_count(original), word_count(rewrite)
    grew_into_answer = (
        rewrite_words / max(original_words, 1) > MAX_GROWTH_RATIO and rewrite_words >= config.answer_min_words
    )
    if assess(original).unsafe:
        if made_more_effective(original, rewrite):
            return FallbackReason.HARMFUL_DETAIL_ADDED
        if not reframed_safely(original, rewrite):
            return FallbackReason.UNSAFE_NOT_REFRAMED
        return FallbackReason.ANSWER_NOT_REWRITE if grew_into_answer else None
    if missing_formulas(original, rewrite):
        return FallbackReason.FORMULA_ALTERED
    if not numbers(original) <= numbers(rewrite):
        return FallbackReason.DROPPED_FACTS
    if reordered_relations(original, rewrite):
        return FallbackReason.RELATION_CHANGED
    if missing_entities(original, rewrite):
        return FallbackReason.DROPPED_ENTITY
    if dropped_constraints(original, rewrite):
        return FallbackReason.DROPPED_CONSTRAINT
    if original_words / max(rewrite_words, 1) > MAX_SHRINK_RATIO:
        return FallbackReason.DROPPED_FACTS
    if grew_into_answer:
        return FallbackReason.ANSWER_NOT_REWRITE
    if _drifted(original, rewrite, config):
        return FallbackReason.ANSWER_NOT_REWRITE
    return None


def _drifted(original: str, rewrite: str, config: GuardConfig) -> bool:
    """Too little of the original's content is left: the words of an alphabetic text, the character pairs of
    a Chinese or Japanese one."""
    plain = MARKER_RE.sub(" ", original)
    if profile(plain).system in ("han", "japanese"):
        wanted = _cjk_bigrams(plain)
        kept = wanted & _cjk_bigrams(rewrite)
    else:
        wanted = content_words(plain)
        kept = wanted & content_words(rewrite)
    return len(wanted) >= config.min_words_for_overlap_check and len(kept) / len(wanted) < config.min_content_overlap
