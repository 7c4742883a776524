"""Linear-time text scanning: the one place a regular expression over user or model text is compiled.

Every pattern that runs on a prompt, a context, a rewrite, an answer, a judge's output or an imported record is
compiled here by ``linear``, with RE2 (``google-re2``): RE2 matches with automata, never by backtracking, so a
search takes time linear in the input whatever the pattern and the text. The price is RE2's syntax: no
backreferences and no lookarounds (callers express those with two patterns or a little scanning code), and
``\\z`` for the end of the text. ``tests/unit/test_linear_time.py`` feeds adversarial inputs through every user
of this module under a time bound, and fails when the backtracking ``re`` module is imported anywhere in
``bpo/``, ``services/`` or ``training/``.

What differs from Python's ``re``, and how patterns written here account for it:

- RE2's ``\\s``, ``\\d``, ``\\w`` and ``\\b`` are ASCII-only; Python's are Unicode. Patterns use ``SPACE``
  (exactly Python's ``\\s``), ``\\p{Nd}`` for ``\\d`` and ``WORD``/``NOT_WORD`` for ``\\w``. The last two come
  from RE2's Unicode tables, which are newer than Python 3.11's (Unicode 14): a few thousand characters
  assigned since then count as digits or word characters here and not in ``re``.
- ``ignore_case=True`` is Python's ``re.IGNORECASE``: RE2 folds the ASCII letters as Python does (``k`` with
  the Kelvin sign, ``s`` with the long s) but for ``i``, which Python also matches against ``İ`` and ``ı``:
  those two are read as ``i`` before matching.
- Positions and groups are those of the text as given: lone surrogates (which a str can hold, and UTF-8
  cannot) are passed through to RE2 as single characters.
- An empty match is followed by a search one character further on (no pattern here can match empty text).
- ``sub`` takes a literal replacement string (no ``\\1`` expansion) or a function.

Each match is one call into RE2, which costs about two microseconds and releases the GIL (so, while another
thread of the process is busy in Python, it waits for that thread's switch interval): patterns here are for
structure (fences, quotes, headers, markers), which real text holds a few of; text read token by token (words)
is scanned with str and bytes methods instead. The matching loop calls RE2's extension module (``re2._re2``)
directly, because the package's pure-Python layer costs several microseconds more per match; the version is
pinned in pyproject.toml.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import re2
from re2 import _re2

__all__ = ["NOT_WORD", "SPACE", "WORD", "WORD_CHARS", "Match", "Pattern", "escape", "is_word_char", "linear"]

# Python's ``\s`` for str patterns (``str.isspace``), as an RE2 character class.
SPACE = r"[\t\n\x0b\x0c\r\x1c-\x1f \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
# Python's ``\w`` for str patterns (letters, digits and numerics, underscore): the characters, for use inside
# a class, the class, and its complement.
WORD_CHARS = r"\p{L}\p{N}_"
WORD = f"[{WORD_CHARS}]"
NOT_WORD = f"[^{WORD_CHARS}]"

_UNANCHORED = _re2.RE2.Anchor.UNANCHORED
_ANCHOR_START = _re2.RE2.Anchor.ANCHOR_START
_ANCHOR_BOTH = _re2.RE2.Anchor.ANCHOR_BOTH
_NO_SPAN = (-1, -1)
_DOTTED_I = str.maketrans({"İ": "i", "ı": "i"})


def is_word_char(char: str) -> bool:
    """Python's ``\\w`` for one character."""
    return char.isalnum() or char == "_"


def escape(text: str) -> str:
    """``text`` as an RE2 pattern that matches it literally."""
    quoted: bytes = _re2.RE2.QuoteMeta(text.encode("utf-8", "surrogatepass"))
    return quoted.decode("utf-8", "surrogatepass")


class Match:
    """One match: ``start``, ``end``, ``span`` and ``group`` as in ``re``; a group that took no part is ``""``."""

    __slots__ = ("_spans", "string")

    def __init__(self, string: str, spans: list[tuple[int, int]]) -> None:
        self.string = string
        self._spans = spans

    def span(self, group: int = 0) -> tuple[int, int]:
        return self._spans[group]

    def start(self, group: int = 0) -> int:
        return self._spans[group][0]

    def end(self, group: int = 0) -> int:
        return self._spans[group][1]

    def group(self, group: int = 0) -> str:
        start, end = self._spans[group]
        return "" if start < 0 else self.string[start:end]

    def __repr__(self) -> str:
        return f"<textscan.Match span={self.span()} {self.group()!r}>"


class Pattern:
    """An RE2 pattern: linear in the input, no backreferences or lookarounds (see the module docstring)."""

    __slots__ = ("_fold_dotted_i", "_regexp", "groups", "pattern")

    def __init__(self, pattern: str, *, ignore_case: bool = False) -> None:
        options = re2.Options()
        options.log_errors = False
        if ignore_case:
            options.case_sensitive = False
        regexp: Any = _re2.RE2(pattern.encode("utf-8", "surrogatepass"), options)
        if not regexp.ok():
            raise ValueError(f"not an RE2 pattern: {pattern!r}: {regexp.error()}")
        self.pattern = pattern
        self._regexp = regexp
        self._fold_dotted_i = ignore_case
        self.groups: int = regexp.NumberOfCapturingGroups()

    def __repr__(self) -> str:
        return f"textscan.linear({self.pattern!r})"

    def _group_spans(self, anchor: Any, text: str, pos: int, endpos: int | None) -> Iterator[list[tuple[int, int]]]:
        """Every group's span of each match from ``pos`` on, left to right, without overlaps; text past ``endpos``
        is not searched. One RE2 call per match, each starting where the last match ended."""
        length = len(text)
        pos = max(0, min(pos, length))
        endpos = length if endpos is None else max(0, min(endpos, length))
        if pos > endpos:
            return iter(())
        if text.isascii():  # byte offsets are character offsets
            return self._ascii_matches(anchor, text.encode("ascii"), pos, endpos)
        return self._unicode_matches(anchor, text, pos, endpos)

    def _ascii_matches(self, anchor: Any, data: bytes, pos: int, end: int) -> Iterator[list[tuple[int, int]]]:
        match_fn = self._regexp.Match
        unanchored = anchor == _UNANCHORED
        while True:
            spans: list[tuple[int, int]] = match_fn(anchor, data, pos, end)
            start, stop = spans[0]
            if start < 0:
                return
            yield spans
            if stop == end or not unanchored:
                return
            pos = stop if stop > start else stop + 1  # after an empty match, one character on

    def _unicode_matches(self, anchor: Any, text: str, pos: int, endpos: int) -> Iterator[list[tuple[int, int]]]:
        subject = text.translate(_DOTTED_I) if self._fold_dotted_i else text  # positions do not move
        data = subject.encode("utf-8", "surrogatepass")
        byte_pos = _re2.CharLenToBytes(data, 0, pos)
        byte_end = byte_pos + _re2.CharLenToBytes(data, byte_pos, endpos - pos)
        # Byte offsets become character offsets by counting on from the last one converted: one pass in all.
        known_byte, known_char = byte_pos, pos
        match_fn = self._regexp.Match
        unanchored = anchor == _UNANCHORED
        while True:
            raw: list[tuple[int, int]] = match_fn(anchor, data, byte_pos, byte_end)
            start, stop = raw[0]
            if start < 0:
                return
            if len(raw) == 1:  # no groups: two offsets to convert
                first = known_char + _re2.BytesToCharLen(data, known_byte, start)
                known_char = first + _re2.BytesToCharLen(data, start, stop)
                known_byte = stop
                yield [(first, known_char)]
            else:
                chars: dict[int, int] = {}
                for offset in sorted({offset for span in raw for offset in span if offset >= 0}):
                    known_char += _re2.BytesToCharLen(data, known_byte, offset)
                    known_byte = offset
                    chars[offset] = known_char
                yield [_NO_SPAN if span == _NO_SPAN else (chars[span[0]], chars[span[1]]) for span in raw]
            if stop == byte_end or not unanchored:
                return
            byte_pos = stop if stop > start else stop + _re2.CharLenToBytes(data, stop, 1)

    def _matches(self, anchor: Any, text: str, pos: int, endpos: int | None) -> Iterator[Match]:
        return (Match(text, spans) for spans in self._group_spans(anchor, text, pos, endpos))

    def spans(self, text: str, pos: int = 0, endpos: int | None = None) -> Iterator[tuple[int, int]]:
        """``(start, end)`` of each match, as ``finditer`` finds them, without building match objects."""
        return (spans[0] for spans in self._group_spans(_UNANCHORED, text, pos, endpos))

    def finditer(self, text: str, pos: int = 0, endpos: int | None = None) -> Iterator[Match]:
        return self._matches(_UNANCHORED, text, pos, endpos)

    def search(self, text: str, pos: int = 0, endpos: int | None = None) -> Match | None:
        return next(self._matches(_UNANCHORED, text, pos, endpos), None)

    def match(self, text: str, pos: int = 0) -> Match | None:
        """A match that starts at ``pos``."""
        return next(self._matches(_ANCHOR_START, text, pos, None), None)

    def fullmatch(self, text: str) -> Match | None:
        return next(self._matches(_ANCHOR_BOTH, text, 0, None), None)

    def findall(self, text: str) -> list[str]:
        """The whole matches, or group 1's text when the pattern has exactly one group."""
        if self.groups > 1:
            raise ValueError("findall reads at most one group")
        return [match.group(self.groups) for match in self._matches(_UNANCHORED, text, 0, None)]

    def sub(self, repl: str | Callable[[Match], str], text: str, count: int = 0) -> str:
        """Replace the first ``count`` matches (all when 0); ``repl`` is literal text or a function of the match."""
        pieces: list[str] = []
        cursor = 0
        for number, match in enumerate(self._matches(_UNANCHORED, text, 0, None), start=1):
            pieces.append(text[cursor : match.start()])
            pieces.append(repl if isinstance(repl, str) else repl(match))
            cursor = match.end()
            if number == count:
                break
        pieces.append(text[cursor:])
        return "".join(pieces)

    def split(self, text: str) -> list[str]:
        """As ``re.split``: the pieces between matches, with every group's text between them."""
        pieces: list[str] = []
        cursor = 0
        for match in self._matches(_UNANCHORED, text, 0, None):
            pieces.append(text[cursor : match.start()])
            pieces.extend(match.group(group) for group in range(1, self.groups + 1))
            cursor = match.end()
        pieces.append(text[cursor:])
        return pieces


def linear(pattern: str, *, ignore_case: bool = False) -> Pattern:
    """Compile ``pattern`` with RE2: linear in the input, no backreferences or lookarounds."""
    return Pattern(pattern, ignore_case=ignore_case)
