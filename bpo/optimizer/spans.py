"""Context preservation: passages a prompt quotes or supplies pass through byte-for-byte.

A prompt is split into the instruction (rewritten) and protected spans (never shown to the optimizer as text
to rewrite): fenced code blocks, triple-quoted and long double-quoted passages, block quotes, a long passage
introduced by a line ending in a colon, and an explicit context field. Each span is replaced by a marker
such as ``[PASSAGE 1]``; after rewriting, the markers are replaced by the original bytes. A rewrite that
loses a marker is repaired by appending the passage in the paper's ``{instruction}\\n{context}`` layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MARKER_TEMPLATE = "[PASSAGE {}]"
MARKER_RE = re.compile(r"\[PASSAGE (\d+)\]")

_FENCED = re.compile(r"(?ms)^[ \t]*(```|~~~)[^\n]*\n.*?^[ \t]*\1[ \t]*\r?$")
_TRIPLE_QUOTED = re.compile(r'(?s)""".+?"""|\'\'\'.+?\'\'\'')
_BLOCK_QUOTE = re.compile(r"(?m)(?:^>[^\n]*(?:\n|$))+")
# A double-quoted passage is protected when it is long enough to be material rather than a phrase.
_DOUBLE_QUOTED = re.compile(r'"[^"\n]{80,}?"|“[^”]{80,}?”|"(?:[^"]*\n[^"]*)+?"')
_LEAD_IN_MIN_CHARS = 280


@dataclass(frozen=True, slots=True)
class ProtectedSpan:
    index: int
    text: str
    kind: str

    @property
    def marker(self) -> str:
        return MARKER_TEMPLATE.format(self.index)


@dataclass(frozen=True, slots=True)
class SegmentedPrompt:
    """The instruction with markers where spans stood, the spans, and the explicit context (if any)."""

    instruction: str
    spans: tuple[ProtectedSpan, ...]
    context: str | None

    @property
    def has_protected_text(self) -> bool:
        return bool(self.spans) or bool(self.context)


def _claim(text: str, pattern: re.Pattern[str], kind: str, found: list[tuple[int, int, str]]) -> None:
    for match in pattern.finditer(text):
        start, end = match.span()
        if any(start < other_end and other_start < end for other_start, other_end, _ in found):
            continue
        found.append((start, end, kind))


def _lead_in_passage(text: str, found: list[tuple[int, int, str]]) -> None:
    """``Summarize the following article:\\n<long text>``: everything after the colon line is material."""
    match = re.search(r"(?m)^[^\n]{3,200}:[ \t]*\r?\n", text)
    if match is None:
        return
    start = match.end()
    remainder = text[start:]
    if len(remainder.strip()) < _LEAD_IN_MIN_CHARS:
        return
    # Trailing instruction after the passage ("... Keep it under 50 words.") stays rewritable only when
    # it is separated by a blank line and short; otherwise the whole remainder is the passage.
    end = len(text)
    tail = re.search(r"\n\s*\n([^\n]{1,200})\s*$", remainder)
    if tail is not None and len(remainder[: tail.start()].strip()) >= _LEAD_IN_MIN_CHARS:
        end = start + tail.start()
    if any(start < other_end and other_start < end for other_start, other_end, _ in found):
        return
    found.append((start, end, "lead-in passage"))


def segment(prompt: str, context: str | None = None) -> SegmentedPrompt:
    found: list[tuple[int, int, str]] = []
    _claim(prompt, _FENCED, "code block", found)
    _claim(prompt, _TRIPLE_QUOTED, "quoted passage", found)
    _claim(prompt, _BLOCK_QUOTE, "block quote", found)
    _claim(prompt, _DOUBLE_QUOTED, "quoted passage", found)
    _lead_in_passage(prompt, found)
    found.sort()
    pieces: list[str] = []
    spans: list[ProtectedSpan] = []
    cursor = 0
    for start, end, kind in found:
        # Block quotes end with their newline: keep it outside the span so reassembly keeps the layout.
        span_text = prompt[start:end]
        trailing = ""
        if kind == "block quote" and span_text.endswith("\n"):
            span_text, trailing = span_text[:-1], "\n"
        spans.append(ProtectedSpan(len(spans) + 1, span_text, kind))
        pieces.append(prompt[cursor:start])
        pieces.append(spans[-1].marker + trailing)
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

    pieces: list[tuple[bool, str]] = []  # (is a span, text)
    cursor = 0
    for match in MARKER_RE.finditer(rewritten_instruction):
        pieces.append((False, rewritten_instruction[cursor : match.start()]))
        cursor = match.end()
        index = int(match.group(1))
        span = by_index.get(index)
        if span is None or index in placed:
            continue  # an invented or repeated marker carries no text of the user's
        placed.add(index)
        pieces.append((True, span.text))
    pieces.append((False, rewritten_instruction[cursor:]))
    # Trim the rewrite's own outer whitespace, never a span's: a passage that opens or closes the prompt
    # keeps its indentation and trailing newline.
    span_at = [i for i, (is_span, _) in enumerate(pieces) if is_span]
    if not span_at:
        text = "".join(piece for _, piece in pieces).strip()
    else:
        first, last = span_at[0], span_at[-1]
        text = (
            "".join(piece for _, piece in pieces[:first]).lstrip()
            + "".join(piece for _, piece in pieces[first : last + 1])
            + "".join(piece for _, piece in pieces[last + 1 :]).rstrip()
        )
    missing = tuple(span.index for span in segmented.spans if span.index not in placed)
    for index in missing:
        text = f"{text}\n{by_index[index].text}" if text else by_index[index].text
    return Reassembly(text, missing)


def markers_in(text: str) -> list[int]:
    return [int(m) for m in MARKER_RE.findall(text)]
