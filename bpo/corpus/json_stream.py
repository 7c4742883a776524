"""The records of a JSON document, one at a time: an array of records, or an object holding exactly one array.

``json.load`` would hold the whole document, and every record in it, at once; here the text is read in chunks
and each record is decoded as soon as its text is complete, so memory holds one record (and a chunk) whatever
the document's size. A document is one syntax: an error anywhere ends the read with its line and column (the
records before it have been yielded), as no later record can be located reliably after it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO, Any

from bpo.errors import CorpusFormatError

CHUNK_CHARS = 1 << 20
_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"
# A decoding error this close to the end of the text read so far may only mean the value goes on past it.
_TRUNCATION_MARGIN = 8


class _Cursor:
    def __init__(self, handle: IO[str], source: str, max_value_chars: int) -> None:
        self._handle = handle
        self._source = source
        self._max_value_chars = max_value_chars
        self._text = ""
        self._pos = 0
        self._eof = False
        self._lines_before = 0  # newlines in the text already dropped, for error positions

    def _more(self) -> bool:
        """Read on, keeping the unread text; False at the end of the document."""
        if self._eof:
            return False
        self._lines_before += self._text.count("\n", 0, self._pos)
        pending = self._text[self._pos :]
        # At least as much again as is pending: a value spanning many chunks is decoded O(log n) times, not O(n).
        chunk = self._handle.read(max(CHUNK_CHARS, len(pending)))
        self._text, self._pos = pending + chunk, 0
        if not chunk:
            self._eof = True
        return bool(chunk)

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end), left unread."""
        while True:
            while self._pos < len(self._text) and self._text[self._pos] in _WHITESPACE:
                self._pos += 1
            if self._pos < len(self._text):
                return self._text[self._pos]
            if not self._more():
                return ""

    def take(self, expected: str, what: str) -> None:
        if self.peek() != expected:
            raise self.error(self._pos, f"Expecting {what}")
        self._pos += 1

    def value(self) -> Any:
        # Bounded: each retry reads more of the document (or reaches its end), and a value is refused past
        # max_value_chars.
        while True:
            self.peek()  # raw_decode does not skip the whitespace before a value
            try:
                value, end = _DECODER.raw_decode(self._text, self._pos)
            except RecursionError:
                raise self.error(self._pos, "a record nested too deeply") from None
            except json.JSONDecodeError as exc:
                truncated = exc.pos >= len(self._text) - _TRUNCATION_MARGIN or exc.msg.startswith("Unterminated")
                if self._eof or not truncated:
                    raise self.error(exc.pos, exc.msg) from None
                self._check_size()
                self._more()  # positions move: decode again, at the end of the document too
                continue
            if end == len(self._text) and not self._eof:
                self._more()  # a number (or literal) at the end of the text read so far may go on
                continue
            self._pos = end
            return value

    def _check_size(self) -> None:
        if len(self._text) - self._pos > self._max_value_chars:
            raise self.error(self._pos, f"a record longer than {self._max_value_chars} characters")

    def error(self, pos: int, message: str) -> CorpusFormatError:
        line = self._lines_before + self._text.count("\n", 0, pos) + 1
        column = pos - self._text.rfind("\n", 0, pos)
        return CorpusFormatError(f"{self._source}: invalid JSON at line {line}, column {column}: {message}")


def json_document_records(handle: IO[str], source: str, max_value_chars: int) -> Iterator[Any]:
    """Each record of the document in ``handle``, as ``json.loads`` would decode it; ``source`` names the
    document in errors."""
    cursor = _Cursor(handle, source, max_value_chars)
    first = cursor.peek()
    if first == "[":
        yield from _array(cursor)
    elif first == "{":
        yield from _object_with_one_array(cursor, source)
    elif first == "":
        raise cursor.error(0, "Expecting value")
    else:
        cursor.value()  # a syntax error is reported as such, before the shape
        raise CorpusFormatError(f"{source}: expected a JSON array of records")
    if cursor.peek() != "":
        raise cursor.error(0, "Extra data after the document")


def _array(cursor: _Cursor) -> Iterator[Any]:
    cursor.take("[", "'['")
    if cursor.peek() == "]":
        cursor.take("]", "']'")
        return
    # Bounded by the document: each pass consumes one element.
    while True:
        yield cursor.value()
        if cursor.peek() == "]":
            cursor.take("]", "']'")
            return
        cursor.take(",", "',' delimiter")


def _object_with_one_array(cursor: _Cursor, source: str) -> Iterator[Any]:
    cursor.take("{", "'{'")
    found = False
    if cursor.peek() == "}":
        cursor.take("}", "'}'")
    else:
        # Bounded by the document: each pass consumes one member.
        while True:
            if cursor.peek() != '"':
                cursor.take('"', "property name enclosed in double quotes")
            cursor.value()
            cursor.take(":", "':' delimiter")
            if cursor.peek() == "[":
                if found:
                    raise CorpusFormatError(f"{source}: a JSON object must hold exactly one list of records")
                found = True
                yield from _array(cursor)
            else:
                cursor.value()
            if cursor.peek() == "}":
                cursor.take("}", "'}'")
                break
            cursor.take(",", "',' delimiter")
    if not found:
        raise CorpusFormatError(f"{source}: a JSON object must hold exactly one list of records")
