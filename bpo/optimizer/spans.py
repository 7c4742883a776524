"""Context preservation: passages a prompt quotes or supplies pass through byte-for-byte.

A prompt is split into the instruction (rewritten) and protected spans (never shown to the optimizer as text
to rewrite): fenced code blocks, triple-quoted passages, block quotes, quoted text of any length (double,
single and typographic quotes, guillemets, corner brackets), inline code, formulas in TeX delimiters (``$...$``,
``$$...$$``, ``\\(...\\)``, ``\\[...\\]``), a long passage introduced by a line ending in a colon, and an
explicit context field. Each span is replaced by a marker such as ``[PASSAGE 1]``; after rewriting, the markers
are replaced by the original bytes. A rewrite that loses the marker of a block (a span over several lines or
a passage) is repaired by appending the block in the paper's ``{instruction}\\n{context}`` layout; the
optimizer rejects one that loses the marker of a span inside a sentence (``ProtectedSpan.inline``), which no
place at the end could stand for.

Quote marks that also serve as apostrophes, inch marks or currency (``'``, ``"``, ``’``, ``$``) open and close
a span only where a quotation can (an opening mark not after a letter or digit and not before a space, a
closing mark not after a space and not before a letter or digit), found by scanning each line once. The other
spans are found with RE2 patterns (``bpo.textscan``), linear in the prompt whatever it holds (an unclosed quote
or fence included), and every loop here is bounded by the number of matches or the prompt's length: a prompt
of any size is segmented and reassembled in linear time.
"""

from __future__ import annotations

from dataclasses import dataclass

from bpo.textscan import SPACE, Pattern, linear

MARKER_TEMPLATE = "[PASSAGE {}]"
MARKER_RE = linear(r"\[PASSAGE (\p{Nd}+)\]")
_MARKER_PREFIX = len("[PASSAGE ")
_MARKER_SPAN = linear(r"\[PASSAGE \p{Nd}+\]")  # MARKER_RE without its group: RE2 finds these faster


def _fenced(fence: str) -> str:
    """A block opened by a line starting with ``fence`` and closed by a line holding only the same fence."""
    return rf"^[ \t]*{fence}[^\n]*\n.*?^[ \t]*{fence}[ \t]*\r?$"


# ``` and ~~~ blocks (an unclosed fence protects nothing).
_FENCED = linear(r"(?ms)" + _fenced("```") + "|" + _fenced("~~~"))
_TRIPLE_QUOTED = linear(r'(?s)""".+?"""|' + r"'''.+?'''")
_BLOCK_QUOTE = linear(r"(?m)(?:^>[^\n]*(?:\n|$))+")
# A double-quoted passage across lines (a passage ends at the first closing quote); on one line, quotes are
# paired by ``_paired_quotes``.
_MULTILINE_DOUBLE_QUOTED = linear(r'"[^"\n]*\n[^"]*"')
# Quote marks that are never anything else, any length; corner brackets and guillemets nest no further.
_TYPOGRAPHIC_QUOTED = linear(r"“[^”]+”|«[^»]+»|‹[^›\n]+›|„[^“”]+[“”]|「[^」]+」|『[^』]+』")
_INLINE_CODE = linear(r"`[^`\n]+`")
_TEX_DISPLAY = linear(r"(?s)\$\$.+?\$\$|\\\[.+?\\\]|\\\(.+?\\\)")
# Kinds whose marker may be lost and repaired by appending the span (blocks of their own).
_BLOCK_KINDS = frozenset({"code block", "block quote", "lead-in passage"})
_LEAD_IN_LINE = linear(r"(?m)^[^\n]{3,200}:[ \t]*\r?\n")
_TRAILING_INSTRUCTION = linear(rf"\n{SPACE}*\n[^\n]{{1,200}}{SPACE}*\z")
_LEAD_IN_MIN_CHARS = 280


@dataclass(frozen=True, slots=True)
class ProtectedSpan:
    index: int
    text: str
    kind: str

    @property
    def marker(self) -> str:
        return MARKER_TEMPLATE.format(self.index)

    @property
    def inline(self) -> bool:
        """The span stands inside a sentence (a quotation, code or formula on one line): appended after the
        rewrite it would no longer say what the user asked about."""
        return self.kind not in _BLOCK_KINDS and "\n" not in self.text


@dataclass(frozen=True, slots=True)
class SegmentedPrompt:
    """The instruction with markers where spans stood, the spans, and the explicit context (if any)."""

    instruction: str
    spans: tuple[ProtectedSpan, ...]
    context: str | None

    @property
    def has_protected_text(self) -> bool:
        return bool(self.spans) or bool(self.context)


def _overlaps_any(start: int, end: int, found: list[tuple[int, int, str]]) -> bool:
    return any(start < other_end and other_start < end for other_start, other_end, _ in found)


def _claim(text: str, pattern: Pattern, kind: str, found: list[tuple[int, int, str]]) -> None:
    """Add the matches of ``pattern`` that overlap no span already found.

    Spans found earlier never overlap each other, so, sorted, they are walked once alongside the matches
    (which come left to right): linear, where testing every match against every span was quadratic.
    """
    if not found:
        found.extend((start, end, kind) for start, end in pattern.spans(text))
        return
    earlier = sorted(found)
    index = 0
    for start, end in pattern.spans(text):
        while index < len(earlier) and earlier[index][1] <= start:
            index += 1
        if index < len(earlier) and earlier[index][0] < end:
            continue
        found.append((start, end, kind))


def _claim_spans(spans: list[tuple[int, int]], kind: str, found: list[tuple[int, int, str]]) -> None:
    """Add ``spans`` (sorted, not overlapping each other) that overlap no span already found: one walk."""
    earlier = sorted(found)
    index = 0
    for start, end in spans:
        while index < len(earlier) and earlier[index][1] <= start:
            index += 1
        if index < len(earlier) and earlier[index][0] < end:
            continue
        found.append((start, end, kind))


def _opens(text: str, position: int) -> bool:
    """A quotation can begin here: not after a letter or digit, not before a space or the line's end."""
    before_ok = position == 0 or not text[position - 1].isalnum()
    return before_ok and position + 1 < len(text) and not text[position + 1].isspace()


def _closes(text: str, position: int) -> bool:
    """A quotation can end here: not after a space, not before a letter or digit."""
    return (
        position > 0
        and not text[position - 1].isspace()
        and (position + 1 == len(text) or not text[position + 1].isalnum())
    )


def _positions(text: str, mark: str) -> list[int]:
    found = []
    position = text.find(mark)
    while position >= 0:
        found.append(position)
        position = text.find(mark, position + 1)
    return found


def _paired_quotes(text: str, opening: str, closing: str, found: list[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """Spans from an opening mark to the first closing mark after it on the same line, each mark read as
    ``_opens`` and ``_closes`` allow (and for ``$``, neither may stand before a digit: "$5 and $10"), outside
    the spans ``found`` already and not across one.

    One walk over the marks in order alongside the spans found (both sorted), finding each line's end once:
    linear in the text."""
    if opening not in text:
        return []
    marks = _positions(text, opening)
    if closing != opening:
        marks = sorted(marks + _positions(text, closing))
    claimed = sorted((start, end) for start, end, _ in found)
    length = len(text)
    spans: list[tuple[int, int]] = []
    next_claimed = 0  # the first span found that does not end before the current mark
    pending = -1  # an opening mark waiting for its closing one
    limit = -1  # the pending mark's closing one must come before this: its line's end or the next span found
    line_end = -1  # the end of the line the last opening mark stood on
    for position in marks:
        while next_claimed < len(claimed) and claimed[next_claimed][1] <= position:
            next_claimed += 1
        if next_claimed < len(claimed) and claimed[next_claimed][0] <= position:
            continue  # inside a span found already
        if pending >= 0 and position >= limit:
            pending = -1
        before_digit = opening == "$" and position + 1 < length and text[position + 1].isdigit()
        if pending >= 0:
            if text[position] == closing and _closes(text, position) and not before_digit:
                spans.append((pending, position + 1))
                pending = -1
            continue
        if text[position] == opening and _opens(text, position) and not before_digit:
            pending = position
            if position >= line_end:
                newline = text.find("\n", position)
                line_end = length if newline < 0 else newline
            limit = min(line_end, claimed[next_claimed][0] if next_claimed < len(claimed) else length)
    return spans


def _lead_in_passage(text: str, found: list[tuple[int, int, str]]) -> None:
    """``Summarize the following article:\\n<long text>``: everything after the colon line is material."""
    match = _LEAD_IN_LINE.search(text)
    if match is None:
        return
    start = match.end()
    remainder = text[start:]
    if len(remainder.strip()) < _LEAD_IN_MIN_CHARS:
        return
    # Trailing instruction after the passage ("... Keep it under 50 words.") stays rewritable only when
    # it is separated by a blank line and short; otherwise the whole remainder is the passage.
    end = len(text)
    tail = _TRAILING_INSTRUCTION.search(remainder)
    if tail is not None and len(remainder[: tail.start()].strip()) >= _LEAD_IN_MIN_CHARS:
        end = start + tail.start()
    if _overlaps_any(start, end, found):
        return
    found.append((start, end, "lead-in passage"))


def segment(prompt: str, context: str | None = None) -> SegmentedPrompt:
    found: list[tuple[int, int, str]] = []
    _claim(prompt, _FENCED, "code block", found)
    _claim(prompt, _TRIPLE_QUOTED, "quoted passage", found)
    _claim(prompt, _BLOCK_QUOTE, "block quote", found)
    _claim(prompt, _TEX_DISPLAY, "formula", found)
    _claim(prompt, _INLINE_CODE, "inline code", found)
    _claim(prompt, _MULTILINE_DOUBLE_QUOTED, "quoted passage", found)
    _claim(prompt, _TYPOGRAPHIC_QUOTED, "quoted passage", found)
    for opening, closing in (('"', '"'), ("'", "'"), ("‘", "’")):
        _claim_spans(_paired_quotes(prompt, opening, closing, found), "quoted passage", found)
    _claim_spans(_paired_quotes(prompt, "$", "$", found), "formula", found)
    _lead_in_passage(prompt, found)
    found.sort()
    pieces: list[str] = []
    spans: list[ProtectedSpan] = []
    cursor = 0
    for number, (start, end, kind) in enumerate(found, start=1):
        # Block quotes end with their newline: keep it outside the span so reassembly keeps the layout.
        span_text = prompt[start:end]
        marker = MARKER_TEMPLATE.format(number)
        if kind == "block quote" and span_text.endswith("\n"):
            span_text, marker = span_text[:-1], marker + "\n"
        spans.append(ProtectedSpan(number, span_text, kind))
        pieces += (prompt[cursor:start], marker)
        cursor = end
    pieces.append(prompt[cursor:])
    normalized_context = context if context and context.strip() else None
    return SegmentedPrompt("".join(pieces), tuple(spans), normalized_context)


@dataclass(frozen=True, slots=True)
class Reassembly:
    prompt: str
    repaired: tuple[int, ...]


def reassemble(rewritten_instruction: str, segmented: SegmentedPrompt) -> Reassembly:
    """Put every span back byte-for-byte; append (in order) any whose marker the rewrite lost."""
    by_index = {span.index: span for span in segmented.spans}
    placed: set[int] = set()
    text = rewritten_instruction
    pieces: list[str] = []  # the rewrite's own text and the spans' texts, in order
    first_span = last_span = -1  # where in ``pieces`` the first and last span stand
    cursor = 0
    for start, end in _MARKER_SPAN.spans(text):
        pieces.append(text[cursor:start])
        cursor = end
        index = _marker_index(text[start + _MARKER_PREFIX : end - 1])
        span = None if index is None else by_index.get(index)
        if span is None or span.index in placed:
            continue  # an invented or repeated marker carries no text of the user's
        placed.add(span.index)
        if first_span < 0:
            first_span = len(pieces)
        last_span = len(pieces)
        pieces.append(span.text)
    pieces.append(text[cursor:])
    # Trim the rewrite's own outer whitespace, never a span's: a passage that opens or closes the prompt
    # keeps its indentation and trailing newline.
    if first_span < 0:
        prompt = "".join(pieces).strip()
    else:
        prompt = (
            "".join(pieces[:first_span]).lstrip()
            + "".join(pieces[first_span : last_span + 1])
            + "".join(pieces[last_span + 1 :]).rstrip()
        )
    missing = tuple(span.index for span in segmented.spans if span.index not in placed)
    # Joined once: appending to the text passage by passage copied it once per lost marker.
    repaired = [prompt]
    has_text = bool(prompt)
    for lost in missing:
        if has_text:
            repaired.append("\n")
        repaired.append(by_index[lost].text)
        has_text = has_text or bool(by_index[lost].text)
    return Reassembly("".join(repaired), missing)


def _marker_index(digits: str) -> int | None:
    """The number in a marker; None for one no passage can have (past int()'s digit limit, or not a number
    this Python reads: RE2's digit class is a Unicode version newer than Python 3.11's)."""
    try:
        return int(digits)
    except ValueError:
        return None


def markers_in(text: str) -> list[int]:
    indices = (_marker_index(digits) for digits in MARKER_RE.findall(text))
    return [index for index in indices if index is not None]
