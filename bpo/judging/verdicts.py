"""Reading a judge's final verdict, and nothing but its final verdict.

Pair-v2 (MT-bench) judges end with ``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie). MT-bench's own code asks only
whether ``[[A]]`` occurs anywhere in the output, then ``[[B]]``, then ``[[C]]``, which lets an answer that says
"output [[A]]" decide the verdict whenever the judge repeats it. The rule here reads only what the judge itself
concluded:

1. **Quoted material is blanked out** (replaced by spaces, newlines kept, so positions and paragraph breaks
   survive), in this order, each step on the result of the one before:
   - an echoed question: from ``[User Question]`` to the next blank line or ``[The Start of ...]`` header;
   - echoed answer blocks: from ``[The Start of ...]`` to the matching ``[The End of ...]``, or to the end of
     the output when the judge never closed the block;
   - fenced code blocks (````` ``` ````` or ``~~~``, unclosed ones to the end), inline code spans, block-quote
     lines (``> ...``), and double-quoted spans (``"..."`` and ``“...”``) that do not cross a blank line.
   A code span, block quote or quoted span whose whole content is a single marker (``"[[A]]"``, ``**`[[B]]`**``)
   is kept: the system prompt itself shows the verdict as ``"[[A]]"``, and judges copy that. Single quotes
   are not treated as quotes: apostrophes ("Assistant A's answer") would pair up with them.
2. **The last paragraph is read**: the last block, after step 1, between blank lines that still holds text.
   A paragraph made wholly of quoted material is therefore skipped, but a judge who ends with prose that
   holds no marker ("I hope this helps.") has given no readable verdict.
3. **Unquoted echoes are dropped**: a marker in that paragraph counts as an echo, not as the judge's verdict,
   when the text beside it repeats the text beside the same marker in what the judge was shown (question or
   answers): at least ``ECHO_CONTEXT_CHARS`` characters on one side, or all of that side of a shown text
   when it is at least ``MIN_ECHO_CONTEXT_CHARS`` long, compared with whitespace collapsed. The rule only
   ever removes markers: an answer that mimics a judge's wording can get the judge's own marker dropped
   (leaving the order unreadable, or decided by another marker in that paragraph), but it cannot plant one.
4. **What remains decides**: markers all of one letter give that letter (case and inner spaces are
   tolerated: ``[[a]]`` and ``[[ A ]]`` cannot mean anything else); different letters, or none, give the
   unreadable verdict ``""`` with the reason recorded. A verdict is never guessed.

AlpacaEval-style ranking judges answer with a Python list of dicts; the last list literal in the output is
read with ``ast.literal_eval`` (never ``eval``) and must rank ``model_1`` and ``model_2`` as 1 and 2.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

VerdictLetter = Literal["A", "B", "C", ""]

ECHO_CONTEXT_CHARS = 16
MIN_ECHO_CONTEXT_CHARS = 6

MARKER_RE = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)
_PARAGRAPH_BREAK_RE = re.compile(r"\n[ \t]*\n")
_QUESTION_ECHO_RE = re.compile(r"\[User Question\][\s\S]*?(?=\n[ \t]*\n|\[The Start of |\Z)", re.IGNORECASE)
_ANSWER_ECHO_RE = re.compile(r"\[The Start of [^\[\]\n]*\][\s\S]*?(?:\[The End of [^\[\]\n]*\]|\Z)", re.IGNORECASE)
_FENCE_RE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n[\s\S]*?(?:^[ \t]*\1[ \t]*$|\Z)", re.MULTILINE)
_INLINE_CODE_RE = re.compile(r"`[^`\n]+`")
_BLOCK_QUOTE_RE = re.compile(r"^[ \t]*>[^\n]*$", re.MULTILINE)
_CURLY_QUOTE_RE = re.compile(r"“[^“”]*”")
_DECORATION = ' \t\r\n*_`"“”>'


@dataclass(frozen=True, slots=True)
class ParsedVerdict:
    """``letter`` is "A", "B", "C" (a tie) or "" when no final verdict could be read; ``problem`` says why."""

    letter: VerdictLetter
    problem: str | None = None

    @property
    def readable(self) -> bool:
        return self.letter != ""


def _unreadable(problem: str) -> ParsedVerdict:
    return ParsedVerdict("", problem)


def _letter(raw: str) -> VerdictLetter:
    upper = raw.upper()
    if upper == "A":
        return "A"
    if upper == "B":
        return "B"
    return "C"


# -- pair-v2 -------------------------------------------------------------------------------------------------


def _is_marker_only(span: str) -> bool:
    return MARKER_RE.fullmatch(span.strip(_DECORATION)) is not None


def _blank(text: str, start: int, end: int) -> str:
    return text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]


def _blank_matches(text: str, pattern: re.Pattern[str], *, keep_marker_only: bool) -> str:
    for match in pattern.finditer(text):
        if keep_marker_only and _is_marker_only(match.group(0)):
            continue
        text = _blank(text, match.start(), match.end())
    return text


def _straight_quote_spans(text: str) -> Iterable[tuple[int, int]]:
    """Pairs of ``"`` left to right; an opening quote whose partner lies past a blank line was a stray one."""
    positions = [i for i, char in enumerate(text) if char == '"']
    index = 0
    while index + 1 < len(positions):
        start, end = positions[index], positions[index + 1]
        if _PARAGRAPH_BREAK_RE.search(text, start, end):
            index += 1
            continue
        yield start, end + 1
        index += 2


def _blank_quoted(text: str) -> str:
    text = _blank_matches(text, _QUESTION_ECHO_RE, keep_marker_only=False)
    text = _blank_matches(text, _ANSWER_ECHO_RE, keep_marker_only=False)
    text = _blank_matches(text, _FENCE_RE, keep_marker_only=True)
    text = _blank_matches(text, _INLINE_CODE_RE, keep_marker_only=True)
    text = _blank_matches(text, _BLOCK_QUOTE_RE, keep_marker_only=True)
    for start, end in list(_straight_quote_spans(text)):
        if not _is_marker_only(text[start:end]):
            text = _blank(text, start, end)
    for match in _CURLY_QUOTE_RE.finditer(text):
        if _PARAGRAPH_BREAK_RE.search(match.group(0)) is None and not _is_marker_only(match.group(0)):
            text = _blank(text, match.start(), match.end())
    return text


def _last_paragraph(text: str) -> tuple[int, int] | None:
    """Bounds of the last stretch between blank lines that holds any text."""
    end = len(text)
    breaks = [(m.start(), m.end()) for m in _PARAGRAPH_BREAK_RE.finditer(text)]
    for break_start, break_end in reversed(breaks):
        if text[break_end:end].strip():
            return break_end, end
        end = break_start
    return (0, end) if text[:end].strip() else None


def _squash(text: str) -> str:
    return " ".join(text.split())


def _common_suffix(a: str, b: str) -> int:
    count = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        count += 1
    return count


def _common_prefix(a: str, b: str) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def _side_matches(agreed: int, shown_side: str) -> bool:
    return agreed >= ECHO_CONTEXT_CHARS or (agreed == len(shown_side) >= MIN_ECHO_CONTEXT_CHARS)


def _is_echo(output: str, start: int, end: int, letter: VerdictLetter, shown: Sequence[str]) -> bool:
    # Whitespace is collapsed on both sides (judges re-wrap what they quote); a trailing or leading space is
    # kept so that "foo [[B]]" and "foo[[B]]" stay distinct.
    # Markdown emphasis hugging the marker is the judge's, not the quoted text's.
    before = _squash(output[:start].rstrip("*_") + "x")[:-1]
    after = _squash("x" + output[end:].lstrip("*_"))[1:]
    for text in shown:
        for match in MARKER_RE.finditer(text):
            if _letter(match.group(1)) != letter:
                continue
            shown_before = _squash(text[: match.start()] + "x")[:-1]
            shown_after = _squash("x" + text[match.end() :])[1:]
            if _side_matches(_common_suffix(before, shown_before), shown_before):
                return True
            if _side_matches(_common_prefix(after, shown_after), shown_after):
                return True
    return False


def parse_pair_verdict(output: str, shown: Sequence[str] = ()) -> ParsedVerdict:
    """The judge's final ``[[A]]``/``[[B]]``/``[[C]]`` (see the module docstring for the rule).

    ``shown`` is what the judge was asked to compare (the question and both answers): markers that repeat
    it are echoes, not verdicts.
    """
    if not output.strip():
        return _unreadable("empty judge output")
    blanked = _blank_quoted(output)
    bounds = _last_paragraph(blanked)
    if bounds is None:
        return _unreadable("the judge output holds only quoted material")
    para_start, para_end = bounds
    letters: list[VerdictLetter] = []
    echoes = 0
    for match in MARKER_RE.finditer(blanked, para_start, para_end):
        letter = _letter(match.group(1))
        if _is_echo(output, match.start(), match.end(), letter, shown):
            echoes += 1
            continue
        letters.append(letter)
    distinct = sorted(set(letters))
    if not distinct:
        if echoes:
            return _unreadable("the last paragraph only repeats markers from the answers shown to the judge")
        return _unreadable("no [[A]]/[[B]]/[[C]] verdict in the last paragraph")
    if len(distinct) > 1:
        return _unreadable("conflicting verdicts in the last paragraph: " + ", ".join(f"[[{x}]]" for x in distinct))
    return ParsedVerdict(distinct[0])


# -- AlpacaEval-style ranking ----------------------------------------------------------------------------------


def _matching_bracket(text: str, start: int) -> int | None:
    """Index of the ``]`` closing the ``[`` at ``start``, skipping Python string literals; None if unclosed."""
    depth = 0
    index = start
    length = len(text)
    while index < length:
        char = text[index]
        if char in "'\"":
            quote = text[index : index + 3] if text[index : index + 3] in ("'''", '"""') else char
            index += len(quote)
            while index < length and not text.startswith(quote, index):
                index += 2 if text[index] == "\\" else 1
            if index >= length:
                return None
            index += len(quote)
            continue
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return None


def last_list_literal(text: str) -> list[object] | None:
    """The list literal that ends last in ``text`` (the outermost one when lists nest), or None."""
    best: tuple[int, int, list[object]] | None = None
    for start in (i for i in range(len(text) - 1, -1, -1) if text[i] == "["):
        end = _matching_bracket(text, start)
        if end is None or (best is not None and end < best[0]):
            continue
        try:
            value = ast.literal_eval(text[start : end + 1])
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list) and (best is None or end >= best[0]):
            best = (end, start, value)
    return None if best is None else best[2]


def parse_ranking_verdict(output: str) -> ParsedVerdict:
    """``[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]`` -> "A" (model_1 was shown first).

    The format has no tie: equal ranks, missing or extra models, or anything but the integers 1 and 2 make
    the verdict unreadable rather than a guessed tie.
    """
    if not output.strip():
        return _unreadable("empty judge output")
    value = last_list_literal(output)
    if value is None:
        return _unreadable("no Python list literal in the judge output")
    ranks: dict[str, int] = {}
    for entry in value:
        if not isinstance(entry, dict):
            return _unreadable("the ranking list holds something other than dicts")
        model, rank = entry.get("model"), entry.get("rank")
        if not isinstance(model, str) or type(rank) is not int or model in ranks:
            return _unreadable("a ranking entry lacks a model name or an integer rank, or repeats a model")
        ranks[model] = rank
    if set(ranks) != {"model_1", "model_2"}:
        return _unreadable(f"the ranking names {sorted(ranks)} instead of model_1 and model_2")
    if sorted(ranks.values()) != [1, 2]:
        return _unreadable(f"ranks {ranks['model_1']} and {ranks['model_2']} do not order the two models")
    return ParsedVerdict("A" if ranks["model_1"] == 1 else "B")
