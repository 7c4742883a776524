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
   holds no marker ("I hope this helps.") has given no readable verdict. A judge told to give its verdict
   first (``verdict_first``) is read the other way round: the first such block, so that what it says after
   its verdict, and a reply cut off there, do not change it.
3. **Unquoted echoes are dropped**: a marker in that paragraph counts as an echo, not as the judge's verdict,
   when the text beside it repeats the text beside the same marker in what the judge was shown (question or
   answers): at least ``ECHO_CONTEXT_CHARS`` characters on one side, or all of that side of a shown text
   when it is at least ``MIN_ECHO_CONTEXT_CHARS`` long, compared with whitespace collapsed. The rule only
   ever removes markers: an answer that mimics a judge's wording can get the judge's own marker dropped
   (leaving the order unreadable, or decided by another marker in that paragraph), but it cannot plant one.
4. **What remains decides**: markers all of one letter give that letter (case and inner spaces are
   tolerated: ``[[a]]`` and ``[[ A ]]`` cannot mean anything else); different letters, or none, give the
   unreadable verdict ``""`` with the reason recorded. A verdict is never guessed.

A judge sampled several times is read sample by sample, and ``majority_verdict`` adds them up: the letter
the most readable samples gave, unreadable when none was readable or the most frequent letters tie.

AlpacaEval-style ranking judges answer with a Python list of dicts; the last list literal in the output is
read with ``ast.literal_eval`` (never ``eval``) and must rank ``model_1`` and ``model_2`` as 1 and 2.

Reading takes time linear in the output and in the texts shown to the judge, whatever they hold: the patterns
are RE2's (``bpo.textscan``), each kind of quoted material is blanked in one rebuild, the echo rule compares
only the few characters beside each marker, and each bracket and string of a list literal is scanned once
(text that would need more than ``LIST_SCAN_STEPS_PER_CHAR`` steps a character, which only adversarial text
does, reads as holding no list).
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from bpo.textscan import SPACE, linear

VerdictLetter = Literal["A", "B", "C", ""]

ECHO_CONTEXT_CHARS = 16
MIN_ECHO_CONTEXT_CHARS = 6
# Finding list literals (brackets outside strings, string literals, then parsing) is bounded by this many steps
# a character of the output; each bracket and string is scanned once, so real outputs need a few at most.
LIST_SCAN_STEPS_PER_CHAR = 8
# What one ``ast.literal_eval`` call costs beyond the characters it parses, in the same steps, and the steps
# every text gets on top of its per-character allowance (64 calls' worth).
_PARSE_OVERHEAD_STEPS = 256
_BASE_STEPS = 64 * _PARSE_OVERHEAD_STEPS
_QUOTES = ("'", '"', "'''", '"""')

MARKER_RE = linear(rf"\[\[{SPACE}*([ABC]){SPACE}*\]\]", ignore_case=True)
_PARAGRAPH_BREAK_RE = linear(r"\n[ \t]*\n")
# From ``[User Question]`` up to (group 1) the next blank line, answer header or the end: the terminator is
# matched too (RE2 has no look-ahead) and left as it is; no header can begin inside one.
_QUESTION_ECHO_RE = linear(r"(\[User Question\](?s:.)*?)(?:\n[ \t]*\n|\[The Start of |\z)", ignore_case=True)
_ANSWER_ECHO_RE = linear(r"\[The Start of [^\[\]\n]*\](?s:.)*?(?:\[The End of [^\[\]\n]*\]|\z)", ignore_case=True)


def _fence(fence: str) -> str:
    """A block opened by a line starting with ``fence``, closed by a line of only that fence or by the end."""
    return rf"^[ \t]*{fence}[^\n]*\n(?s:.)*?(?:^[ \t]*{fence}[ \t]*$|\z)"


_FENCE_RE = linear("(?m)" + _fence("```") + "|" + _fence("~~~"))
_INLINE_CODE_RE = linear(r"`[^`\n]+`")
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
    core = span.strip(_DECORATION)
    return core.startswith("[[") and core.endswith("]]") and MARKER_RE.fullmatch(core) is not None


def _spaces(text: str) -> str:
    """``text`` with every character but newlines replaced by a space."""
    if "\n" not in text:
        return " " * len(text)
    return "\n".join(" " * len(line) for line in text.split("\n"))


def _blank_spans(text: str, spans: Iterable[tuple[int, int]], *, keep_marker_only: bool = False) -> str:
    """Blank disjoint spans given left to right (but those that hold only a marker, with ``keep_marker_only``).

    The text is rebuilt once; spans with nothing or only newlines between them are blanked as one.
    """
    pieces: list[str] = []
    cursor = run_start = run_end = 0  # text[cursor:run_start] is kept as it is, text[run_start:run_end] blanked
    for start, end in spans:
        if keep_marker_only and text.find("[[", start, end) >= 0 and _is_marker_only(text[start:end]):
            continue
        if run_start < run_end and text.count("\n", run_end, start) == start - run_end:
            run_end = end
            continue
        pieces.append(text[cursor:run_start])
        pieces.append(_spaces(text[run_start:run_end]))
        cursor, run_start, run_end = run_end, start, end
    if run_start == run_end and not pieces:
        return text
    pieces.append(text[cursor:run_start])
    pieces.append(_spaces(text[run_start:run_end]))
    pieces.append(text[run_end:])
    return "".join(pieces)


def _has_paragraph_break(text: str, start: int = 0, end: int | None = None) -> bool:
    """Whether ``text[start:end]`` holds a blank line (``\\n[ \\t]*\\n``); time linear in its length."""
    end = len(text) if end is None else end
    newline = text.find("\n", start, end)
    while newline >= 0:
        following = text.find("\n", newline + 1, end)
        if following < 0:
            return False
        if not text[newline + 1 : following].strip(" \t"):
            return True
        newline = following
    return False


def _question_echo_spans(text: str) -> Iterator[tuple[int, int]]:
    for match in _QUESTION_ECHO_RE.finditer(text):
        yield match.span(1)


def _block_quote_lines(text: str) -> Iterator[tuple[int, int]]:
    """Each block-quote line (``> ...``, maybe indented by spaces and tabs), without its newline."""
    start = 0
    for line in text.split("\n"):
        if line.lstrip(" \t").startswith(">"):
            yield start, start + len(line)
        start += len(line) + 1


def _blank_straight_quotes(text: str) -> str:
    """Blank pairs of ``"`` left to right; an opening quote whose partner lies past a blank line was a stray one.

    ``parts[i]`` is the text between the i-th quote and the next: each quote and each part is looked at once.
    """
    parts = text.split('"')
    if len(parts) < 3:
        return text
    out = [parts[0]]
    quote, last = 1, len(parts) - 1
    while quote < last:
        inside = parts[quote]
        if "\n" in inside and _has_paragraph_break(inside):
            out += ('"', inside)
            quote += 1
            continue
        if "[[" in inside and _is_marker_only(f'"{inside}"'):
            out += ('"', inside, '"', parts[quote + 1])
        else:
            out += (" ", _spaces(inside), " ", parts[quote + 1])
        quote += 2
    if quote == last:
        out += ('"', parts[last])
    return "".join(out)


def _curly_quote_spans(text: str) -> Iterator[tuple[int, int]]:
    """``“...”`` with no other curly quote inside and no blank line, left to right.

    An opening quote pairs with the next curly quote when that one closes; the next closing quote is found once
    for all the opening quotes before it.
    """
    closing = -1
    opening = text.find("“")
    while opening >= 0:
        if closing < opening:
            closing = text.find("”", opening + 1)
            if closing < 0:
                return
        reopening = text.find("“", opening + 1, closing)
        if reopening >= 0:
            opening = reopening
            continue
        if not _has_paragraph_break(text, opening, closing):
            yield opening, closing + 1
        opening = text.find("“", closing + 1)


def _blank_quoted(text: str) -> str:
    """Each kind is found in the text left by the kinds before it, and blanked in one rebuild."""
    text = _blank_spans(text, _question_echo_spans(text))
    text = _blank_spans(text, _ANSWER_ECHO_RE.spans(text))
    text = _blank_spans(text, _FENCE_RE.spans(text), keep_marker_only=True)
    text = _blank_spans(text, _INLINE_CODE_RE.spans(text), keep_marker_only=True)
    text = _blank_spans(text, _block_quote_lines(text), keep_marker_only=True)
    text = _blank_straight_quotes(text)
    return _blank_spans(text, _curly_quote_spans(text), keep_marker_only=True)


def _last_paragraph(text: str) -> tuple[int, int] | None:
    """Bounds of the last stretch between blank lines that holds any text.

    That stretch holds the last non-space character: it ends where the first blank line after that character
    begins (or at the end), and starts where the last blank line before it ends (or at the start). Two
    searches find them, the second over the text before that character read backwards (a blank line reads the
    same both ways).
    """
    last = len(text.rstrip()) - 1
    if last < 0:
        return None
    after = _PARAGRAPH_BREAK_RE.search(text, last + 1)
    end = len(text) if after is None else after.start()
    before = _PARAGRAPH_BREAK_RE.search(text[last - 1 :: -1]) if last > 0 else None
    start = 0 if before is None else last - before.start()
    return start, end


def _first_paragraph(text: str) -> tuple[int, int] | None:
    """Bounds of the first stretch between blank lines that holds any text: from its first non-space character
    to the first blank line after it (or the end)."""
    first = len(text) - len(text.lstrip())
    if first == len(text):
        return None
    after = _PARAGRAPH_BREAK_RE.search(text, first)
    return first, len(text) if after is None else after.start()


def _squash(text: str) -> str:
    return " ".join(text.split())


def _squashed_tail(text: str, end: int) -> str:
    """The last ``ECHO_CONTEXT_CHARS`` characters (all, when fewer) of ``_squash(text[:end] + "x")[:-1]``.

    Squashing a window that ends at ``end`` gives a suffix of squashing everything before ``end``, so the window
    only grows (doubling) until its squashed form is long enough: it never reaches further back than the
    characters it needs and the whitespace between them.
    """
    width = 4 * ECHO_CONTEXT_CHARS
    while True:
        begin = max(0, end - width)
        squashed = _squash(text[begin:end] + "x")[:-1]
        if begin == 0 or len(squashed) > ECHO_CONTEXT_CHARS:
            return squashed[-ECHO_CONTEXT_CHARS:]
        width *= 2


def _squashed_head(text: str, start: int) -> str:
    """The first ``ECHO_CONTEXT_CHARS`` characters (all, when fewer) of ``_squash("x" + text[start:])[1:]``."""
    width = 4 * ECHO_CONTEXT_CHARS
    while True:
        stop = min(len(text), start + width)
        squashed = _squash("x" + text[start:stop])[1:]
        if stop == len(text) or len(squashed) > ECHO_CONTEXT_CHARS:
            return squashed[:ECHO_CONTEXT_CHARS]
        width *= 2


@dataclass(slots=True)
class _EchoSide:
    """The context on one side of the shown markers of one letter.

    An output marker's context repeats a shown one when the two agree on the ``ECHO_CONTEXT_CHARS`` characters
    next to the markers (``full``, keyed by those characters), or on all of a shown side that has at least
    ``MIN_ECHO_CONTEXT_CHARS`` but fewer than ``ECHO_CONTEXT_CHARS`` characters (``short``).
    """

    full: set[str] = field(default_factory=set)
    short: set[str] = field(default_factory=set)

    def add(self, context: str) -> None:
        if len(context) >= ECHO_CONTEXT_CHARS:
            self.full.add(context)
        elif len(context) >= MIN_ECHO_CONTEXT_CHARS:
            self.short.add(context)

    def repeats_tail(self, tail: str) -> bool:
        """``tail`` ends the text before an output marker."""
        if len(tail) >= ECHO_CONTEXT_CHARS and tail in self.full:
            return True
        sizes = range(MIN_ECHO_CONTEXT_CHARS, min(len(tail), ECHO_CONTEXT_CHARS - 1) + 1)
        return any(tail[-size:] in self.short for size in sizes)

    def repeats_head(self, head: str) -> bool:
        """``head`` starts the text after an output marker."""
        if len(head) >= ECHO_CONTEXT_CHARS and head in self.full:
            return True
        sizes = range(MIN_ECHO_CONTEXT_CHARS, min(len(head), ECHO_CONTEXT_CHARS - 1) + 1)
        return any(head[:size] in self.short for size in sizes)


class _ShownMarkers:
    """The markers of the texts shown to the judge, by letter and by the context beside them."""

    def __init__(self, shown: Sequence[str]) -> None:
        self._before: dict[VerdictLetter, _EchoSide] = {}
        self._after: dict[VerdictLetter, _EchoSide] = {}
        for text in shown:
            for match in MARKER_RE.finditer(text):
                letter = _letter(match.group(1))
                self._before.setdefault(letter, _EchoSide()).add(_squashed_tail(text, match.start()))
                self._after.setdefault(letter, _EchoSide()).add(_squashed_head(text, match.end()))

    def is_echo(self, output: str, start: int, end: int, letter: VerdictLetter) -> bool:
        """The output's marker at ``start:end`` repeats the text beside a shown marker of the same letter.

        Whitespace is collapsed on both sides (judges re-wrap what they quote); a trailing or leading space is
        kept so that "foo [[B]]" and "foo[[B]]" stay distinct. Markdown emphasis hugging the marker is the
        judge's, not the quoted text's.
        """
        before, after = self._before.get(letter), self._after.get(letter)
        if before is None or after is None:
            return False
        while start > 0 and output[start - 1] in "*_":
            start -= 1
        while end < len(output) and output[end] in "*_":
            end += 1
        return before.repeats_tail(_squashed_tail(output, start)) or after.repeats_head(_squashed_head(output, end))


def parse_pair_verdict(output: str, shown: Sequence[str] = (), *, verdict_first: bool = False) -> ParsedVerdict:
    """The judge's final ``[[A]]``/``[[B]]``/``[[C]]`` (see the module docstring for the rule).

    ``shown`` is what the judge was asked to compare (the question and both answers): markers that repeat
    it are echoes, not verdicts. ``verdict_first``: the judge was told to open with its verdict, so the first
    paragraph is read instead of the last.
    """
    if not output.strip():
        return _unreadable("empty judge output")
    blanked = _blank_quoted(output)
    bounds = _first_paragraph(blanked) if verdict_first else _last_paragraph(blanked)
    where = "first" if verdict_first else "last"
    if bounds is None:
        return _unreadable("the judge output holds only quoted material")
    para_start, para_end = bounds
    shown_markers = _ShownMarkers(shown)
    letters: list[VerdictLetter] = []
    echoes = 0
    for match in MARKER_RE.finditer(blanked, para_start, para_end):
        letter = _letter(match.group(1))
        if shown_markers.is_echo(output, match.start(), match.end(), letter):
            echoes += 1
            continue
        letters.append(letter)
    distinct = sorted(set(letters))
    if not distinct:
        if echoes:
            return _unreadable(f"the {where} paragraph only repeats markers from the answers shown to the judge")
        return _unreadable(f"no [[A]]/[[B]]/[[C]] verdict in the {where} paragraph")
    if len(distinct) > 1:
        return _unreadable(f"conflicting verdicts in the {where} paragraph: " + ", ".join(f"[[{x}]]" for x in distinct))
    return ParsedVerdict(distinct[0])


def majority_verdict(samples: Sequence[ParsedVerdict]) -> ParsedVerdict:
    """The letter the most readable samples gave; unreadable, with the count, when no sample was readable or
    the most frequent letters tie."""
    counts = Counter(sample.letter for sample in samples if sample.readable).most_common()
    if not counts:
        return _unreadable(f"none of the {len(samples)} samples gave a readable verdict")
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        split = ", ".join(f"[[{letter}]] x{count}" for letter, count in sorted(counts))
        return _unreadable(f"the {len(samples)} samples split without a majority: {split}")
    return ParsedVerdict(counts[0][0])


# -- AlpacaEval-style ranking ----------------------------------------------------------------------------------


class _ScanBudgetError(Exception):
    """The text needs more than ``LIST_SCAN_STEPS_PER_CHAR`` steps a character."""


class _ListScanner:
    """Where the list opened at each ``[`` closes, skipping Python string literals, in time linear in the text.

    Each ``[`` is scanned to its ``]`` as a lone scan from it would go (a quote opens a string literal that
    only the same quote closes; a backslash in a string escapes the next character), but a nested ``[`` is
    jumped over to the ``]`` already found for it (scans run right to left), and string literals are scanned
    with ``str.find`` and never twice from the same point (``_string_end``). A step budget bounds the whole.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.closing = [-1] * len(text)  # at each scanned ``[``: its ``]``, or -1 if it is never closed
        self._string_ends: dict[int, int | None] = {}  # keyed by ``_string_state``
        self._steps_left = LIST_SCAN_STEPS_PER_CHAR * len(text) + _BASE_STEPS

    def _step(self) -> None:
        self._steps_left -= 1
        if self._steps_left < 0:
            raise _ScanBudgetError

    def _string_end(self, opening: int) -> int | None:
        """Index just past the string literal whose quote starts at ``opening``; None if it is never closed.

        Where a literal goes on from a point depends only on its quote and that point, so every point reached
        (its start, and the one past each backslash) is remembered: literals sharing one are scanned from it once.
        """
        text = self.text
        quote = text[opening : opening + 3] if text[opening : opening + 3] in ("'''", '"""') else text[opening]
        index = opening + len(quote)
        reached: list[int] = []
        closing = -1
        end: int | None = None
        while True:
            self._step()
            state = 4 * index + _QUOTES.index(quote)
            if state in self._string_ends:
                end = self._string_ends[state]
                break
            reached.append(state)
            if closing < index:
                closing = text.find(quote, index)
                if closing < 0:
                    break
            backslash = text.find("\\", index, closing)
            if backslash < 0:
                end = closing + len(quote)
                break
            index = backslash + 2
        for state in reached:
            self._string_ends[state] = end
        return end

    def scan(self, start: int) -> int | None:
        """Index of the ``]`` closing the ``[`` at ``start``; every ``[`` after it must have been scanned."""
        text = self.text
        index = start + 1
        length = len(text)
        while index < length:
            self._step()
            char = text[index]
            if char in "'\"":
                after = self._string_end(index)
                if after is None:
                    break
                index = after
            elif char == "[":
                inner = self.closing[index]
                if inner < 0:
                    break
                index = inner + 1
            elif char == "]":
                self.closing[start] = index
                return index
            else:
                index += 1
        return None


def last_list_literal(text: str) -> list[object] | None:
    """The list literal that ends last in ``text`` (the outermost one when lists nest), or None.

    Candidates are parsed latest end first, outermost first, until one is a list. Also None when finding them
    takes more than ``LIST_SCAN_STEPS_PER_CHAR`` steps a character of the text, or parsing them more (a
    character parsed is a step, a call ``_PARSE_OVERHEAD_STEPS``), beyond a base of ``_BASE_STEPS``: only
    adversarial text gets there.
    """
    scanner = _ListScanner(text)
    candidates: list[tuple[int, int]] = []  # (-end, start): the latest end first, then the outermost
    try:
        for start in range(len(text) - 1, -1, -1):
            if text[start] == "[":
                end = scanner.scan(start)
                if end is not None:
                    candidates.append((-end, start))
    except _ScanBudgetError:
        return None
    candidates.sort()
    parse_budget = LIST_SCAN_STEPS_PER_CHAR * len(text) + _BASE_STEPS
    for negative_end, start in candidates:
        literal = text[start : 1 - negative_end]
        parse_budget -= len(literal) + _PARSE_OVERHEAD_STEPS
        if parse_budget < 0:
            return None
        try:
            value = ast.literal_eval(literal)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list):
            return value
    return None


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
