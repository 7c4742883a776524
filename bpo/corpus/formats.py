"""Reading prompt corpora and writing results as JSONL.

Formats: JSON Lines, a JSON document (an array of records, or an object holding one), CSV, Parquet, and each of
them gzip-compressed. The format is told by the file's content where it can be (Parquet's and gzip's magic
bytes, Parquet's inside gzip's; ``[`` or a first line that is a whole JSON object) and by its name otherwise
(``.jsonl``, ``.ndjson``, ``.json``, ``.csv``, ``.parquet``, each optionally followed by ``.gz``). Every format is
read record by record in bounded memory: a file of any size is never held whole (a gzip-compressed Parquet file
is decompressed to a temporary file first, as Parquet is read by seeking).

A record is one of three shapes, told by its fields (unless ``field`` names the prompt field, which makes it
a flat record):

* an OpenAI Batch request line (``custom_id`` and ``body``): ``custom_id`` is the record's id, and the prompt
  and context come from ``body.messages`` (``bpo.corpus.chat``);
* a chat record (``messages``): the same rule for its conversation;
* a flat record: the four test sets of the paper are recognised by their fields (``text`` for Vicuna Eval,
  ``instruction`` and ``context`` for Dolly and Self-Instruct, ``prompt`` for BPO-test).

A malformed record fails alone: the reader yields a ``CorpusError`` with its number and the reason, and goes on.
The number is the line for JSON Lines and CSV, and the record's position (from 1) in a JSON document or a
Parquet file. What spoils the rest of the file (a JSON syntax error, a damaged gzip stream, text that is not
UTF-8 in a CSV or JSON document) ends the read with a ``CorpusFormatError`` after the records before it.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from io import BufferedReader
from pathlib import Path
from typing import IO, Any

from bpo.corpus.chat import (
    BATCH_BODY_FIELD,
    BATCH_FIELDS,
    BATCH_ID_FIELD,
    MESSAGES_FIELD,
    batch_request_prompt,
    conversation_prompt,
    is_batch_request,
    is_conversation,
)
from bpo.corpus.json_stream import json_document_records
from bpo.corpus.parquet import PARQUET_MAGIC, parquet_row_count, parquet_rows
from bpo.errors import CorpusFormatError

PROMPT_FIELDS = ("prompt", "text", "instruction", "question", "turns")
CONTEXT_FIELDS = ("context", "input")
# custom_id last: a flat record (or a Batch line read with a named field) keeps the id a Batch output line is
# matched by.
ID_FIELDS = ("id", "question_id", "idx", BATCH_ID_FIELD)
CATEGORY_FIELD = "category"
CATEGORY_FIELDS = (CATEGORY_FIELD,)
# The largest record read: bytes of a JSON Lines line, characters of a CSV field or of a JSON document's record
# (a record's fields together are then held to the platform's item size limit).
RECORD_SIZE_LIMIT = 64 * 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
# How much of a file is read to tell a JSON document from JSON Lines.
SNIFF_CHARS = 1 << 20

BUILTIN_DATASETS = {
    "vicuna": "vicuna_eval.jsonl",
    "dolly": "dolly_eval.json",
    "self-instruct": "self_instruct_eval.json",
    "bpo-test": "bpo_test.json",
}


class CorpusFormat(StrEnum):
    JSONL = "jsonl"
    JSON = "json"
    CSV = "csv"
    PARQUET = "parquet"


SUFFIX_FORMATS = {
    ".jsonl": CorpusFormat.JSONL,
    ".ndjson": CorpusFormat.JSONL,
    ".json": CorpusFormat.JSON,
    ".csv": CorpusFormat.CSV,
    ".parquet": CorpusFormat.PARQUET,
    ".pq": CorpusFormat.PARQUET,
}


@dataclass(frozen=True, slots=True)
class CorpusLayout:
    format: CorpusFormat
    gzipped: bool


@dataclass(frozen=True, slots=True)
class CorpusRecord:
    line: int
    id: str
    prompt: str
    context: str | None
    category: str | None


@dataclass(frozen=True, slots=True)
class CorpusError:
    line: int
    reason: str


def builtin_dataset_path(name: str) -> Path:
    if name not in BUILTIN_DATASETS:
        raise CorpusFormatError(f"unknown dataset {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}")
    return Path(str(resources.files("bpo.resources").joinpath("datasets", BUILTIN_DATASETS[name])))


def _pick_prompt(record: dict[str, Any], field: str | None) -> str:
    candidates = (field,) if field else PROMPT_FIELDS
    for name in candidates:
        if name in record:
            value = record[name]
            if name == "turns" and isinstance(value, list) and value:
                value = value[0]  # MT-bench style: the first turn is the prompt (single-turn only)
            if not isinstance(value, str):
                raise ValueError(f"field {name!r} is {type(value).__name__}, expected a string")
            if not value.strip():
                raise ValueError(f"field {name!r} is empty")
            return value
    wanted = repr(field) if field else f"any of {', '.join(PROMPT_FIELDS)}"
    raise ValueError(f"no prompt field ({wanted}); fields present: {', '.join(sorted(record)) or 'none'}")


def _optional_str(record: dict[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            if value.strip():
                return value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):  # a tuple: faster than int | float
            return str(value)
    return None


def to_record(raw: Any, line: int, field: str | None) -> CorpusRecord | CorpusError:
    if not isinstance(raw, dict):
        return CorpusError(line, f"expected an object, got {type(raw).__name__}")
    category = _optional_str(raw, CATEGORY_FIELDS)
    try:
        if field is None and is_batch_request(raw):
            record_id, chat = batch_request_prompt(raw)
            prompt, context = chat.prompt, chat.context
        else:
            record_id = _optional_str(raw, ID_FIELDS) or str(line)
            if field is None and is_conversation(raw):
                chat = conversation_prompt(raw)
                prompt, context = chat.prompt, chat.context
            else:
                prompt, context = _pick_prompt(raw, field), _optional_str(raw, CONTEXT_FIELDS)
    except ValueError as exc:
        return CorpusError(line, str(exc))
    # ASCII text always encodes: the check below runs only for the records that hold other characters.
    ascii_only = (
        record_id.isascii()
        and prompt.isascii()
        and (context is None or context.isascii())
        and (category is None or category.isascii())
    )
    if not ascii_only:
        for name, value in (("id", record_id), ("prompt", prompt), ("context", context), ("category", category)):
            try:
                if value is not None:
                    value.encode("utf-8")
            except UnicodeEncodeError as exc:
                # JSON allows "\ud800" escapes that decode to a lone surrogate: no UTF-8 message can carry it.
                reason = f"field {name!r} is not valid Unicode ({exc.reason} at character {exc.start})"
                return CorpusError(line, reason)
    return CorpusRecord(line, record_id, prompt, context, category)


def detect_layout(path: Path) -> CorpusLayout:
    """The format of the corpus at ``path`` and whether it is gzip-compressed: content first, then the name."""
    with path.open("rb") as handle:
        head = handle.read(len(PARQUET_MAGIC))
    if head.startswith(PARQUET_MAGIC):
        return CorpusLayout(CorpusFormat.PARQUET, gzipped=False)
    gzipped = head.startswith(GZIP_MAGIC)
    if gzipped and _decompressed_head(path).startswith(PARQUET_MAGIC):
        return CorpusLayout(CorpusFormat.PARQUET, gzipped=True)
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    named = SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None
    if named is CorpusFormat.PARQUET:
        # Not Parquet's magic bytes (checked above, compressed or not): pyarrow will say what the file is not.
        return CorpusLayout(CorpusFormat.PARQUET, gzipped)
    if named is CorpusFormat.CSV or named is CorpusFormat.JSONL:
        return CorpusLayout(named, gzipped)
    with _open_text(path, gzipped, errors="replace") as text:
        try:
            head_text = text.read(SNIFF_CHARS)
        except (EOFError, OSError, zlib.error) as exc:
            raise CorpusFormatError(f"{path}: cannot be read: {exc}") from None
    return CorpusLayout(_json_kind(head_text, named), gzipped)


def _decompressed_head(path: Path) -> bytes:
    """The first bytes of a gzip-compressed file's content; empty when the stream is damaged from its start (the
    read that follows reports it)."""
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read(len(PARQUET_MAGIC))
    except (EOFError, OSError, zlib.error):
        return b""


def _json_kind(head: str, named: CorpusFormat | None) -> CorpusFormat:
    """A JSON document or JSON Lines, from the start of the text (``named``: what the file's name says)."""
    text = head.lstrip("\ufeff \t\r\n")
    if text.startswith("["):
        return CorpusFormat.JSON
    if text.startswith("{"):
        first_line, newline, rest = text.partition("\n")
        try:
            whole_line = isinstance(json.loads(first_line), dict)
        except (json.JSONDecodeError, RecursionError):
            whole_line = False
        if whole_line:
            # After a whole object, more text cannot be the same JSON document: it is JSON Lines.
            return CorpusFormat.JSONL if named is None or rest.strip() else CorpusFormat.JSON
        if newline:
            return CorpusFormat.JSON  # an object spread over lines: a pretty-printed document
    return named or CorpusFormat.JSONL


def _open_binary(path: Path, gzipped: bool) -> gzip.GzipFile | BufferedReader:
    return gzip.open(path, "rb") if gzipped else path.open("rb")


def _open_text(path: Path, gzipped: bool, errors: str = "strict") -> IO[str]:
    # utf-8-sig: spreadsheet exports start with a BOM that would otherwise be part of the first field.
    # newline="": the csv module reads line ends itself; JSON counts them for error positions.
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8-sig", errors=errors, newline="")
    return path.open(encoding="utf-8-sig", errors=errors, newline="")


def read_corpus(path: Path, field: str | None = None) -> Iterator[CorpusRecord | CorpusError]:
    if not path.exists():
        raise CorpusFormatError(f"{path}: no such file")
    layout = detect_layout(path)
    if layout.format is CorpusFormat.PARQUET:
        yield from _read_parquet(path, field, layout.gzipped)
        return
    try:
        if layout.format is CorpusFormat.CSV:
            with _open_text(path, layout.gzipped) as text:
                yield from _read_csv(text, path, field)
        elif layout.format is CorpusFormat.JSON:
            with _open_text(path, layout.gzipped) as text:
                yield from _read_json(text, path, field)
        else:
            with _open_binary(path, layout.gzipped) as binary:
                yield from _read_jsonl(binary, field)
    except (EOFError, OSError, zlib.error) as exc:
        # A truncated or damaged gzip stream (or a failing disk): what follows cannot be read.
        raise CorpusFormatError(f"{path}: cannot be read past this point: {exc}") from None


def _bounded_lines(handle: gzip.GzipFile | BufferedReader) -> Iterator[bytes | None]:
    """Each line of ``handle``; None for a line longer than ``RECORD_SIZE_LIMIT``, which is skipped unread."""
    while line := handle.readline(RECORD_SIZE_LIMIT + 1):
        if len(line) <= RECORD_SIZE_LIMIT:
            yield line
            continue
        rest = line
        while rest and not rest.endswith(b"\n"):  # bounded by the file's size
            rest = handle.readline(RECORD_SIZE_LIMIT)
        yield None


def _read_jsonl(handle: gzip.GzipFile | BufferedReader, field: str | None) -> Iterator[CorpusRecord | CorpusError]:
    # Bytes, decoded line by line: one line that is not UTF-8 fails alone instead of ending the read.
    for number, raw_line in enumerate(_bounded_lines(handle), start=1):
        if raw_line is None:
            yield CorpusError(number, f"line longer than {RECORD_SIZE_LIMIT} bytes")
            continue
        try:
            text = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield CorpusError(number, f"not valid UTF-8: {exc.reason} at byte {exc.start}")
            continue
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            yield CorpusError(number, f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        except RecursionError:
            yield CorpusError(number, "invalid JSON: nested too deeply")
            continue
        yield to_record(raw, number, field)


def _read_json(text: IO[str], path: Path, field: str | None) -> Iterator[CorpusRecord | CorpusError]:
    # One document: after a syntax error nothing can be salvaged record by record. JSONL is the resilient format.
    try:
        for number, raw in enumerate(json_document_records(text, str(path), RECORD_SIZE_LIMIT), start=1):
            yield to_record(raw, number, field)
    except UnicodeDecodeError as exc:
        raise CorpusFormatError(f"{path}: not valid UTF-8 ({exc.reason})") from None


def _read_csv(text: IO[str], path: Path, field: str | None) -> Iterator[CorpusRecord | CorpusError]:
    # The csv module refuses fields over 128 KiB by default, ending the read; a large field is read here, and
    # the platform refuses its record alone if it is too large for an item.
    csv.field_size_limit(RECORD_SIZE_LIMIT)
    reader = csv.DictReader(text)
    try:
        if reader.fieldnames is None:
            return
        # Bounded by the file: each pass reads one row (or stops).
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield CorpusError(reader.line_num, f"invalid CSV: {exc}")
                continue
            number = reader.line_num
            if None in row:
                yield CorpusError(number, f"{len(row[None])} more values than the header's columns")
                continue
            yield to_record(dict(row), number, field)
    except UnicodeDecodeError as exc:
        # Decoded a block at a time: the line cannot be told, only that the rest of the file is unreadable.
        raise CorpusFormatError(f"{path}: not valid UTF-8 after line {reader.line_num} ({exc.reason})") from None


# The columns of a Parquet file a record can use, and those that can hold its prompt.
_PARQUET_USABLE = frozenset(
    (*PROMPT_FIELDS, *CONTEXT_FIELDS, *ID_FIELDS, CATEGORY_FIELD, MESSAGES_FIELD, *BATCH_FIELDS)
)
_PARQUET_PROMPT_COLUMNS = (*PROMPT_FIELDS, MESSAGES_FIELD, BATCH_BODY_FIELD)


def _read_parquet(path: Path, field: str | None, gzipped: bool) -> Iterator[CorpusRecord | CorpusError]:
    usable = (_PARQUET_USABLE | {field}) if field else _PARQUET_USABLE
    required = (field,) if field else _PARQUET_PROMPT_COLUMNS
    for number, row in enumerate(parquet_rows(path, usable, required, gzipped=gzipped), start=1):
        yield to_record(row, number, field)


def count_records(path: Path) -> int | None:
    """For a progress bar's total; None for a JSON document, which would have to be read twice to count, and for
    a gzip-compressed Parquet file, which would have to be decompressed twice."""
    layout = detect_layout(path)
    if layout.format is CorpusFormat.PARQUET:
        return None if layout.gzipped else parquet_row_count(path)
    if layout.format is CorpusFormat.JSON:
        return None
    try:
        if layout.format is CorpusFormat.CSV:
            csv.field_size_limit(RECORD_SIZE_LIMIT)
            with _open_text(path, layout.gzipped, errors="replace") as text:
                return max(sum(1 for _ in csv.reader(text)) - 1, 0)
        with _open_binary(path, layout.gzipped) as binary:
            return sum(1 for line in _bounded_lines(binary) if line is None or line.strip())
    except (EOFError, OSError, zlib.error, csv.Error) as exc:
        raise CorpusFormatError(f"{path}: cannot be read: {exc}") from None


class ResultWriter:
    """Appends one JSON object a line and flushes it, so a crash loses at most the line being written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(path)
        self._handle = path.open("a", encoding="utf-8")

    def write(self, payload: dict[str, Any]) -> None:
        self._handle.write(json.dumps(payload, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def completed_ids(path: Path) -> set[str]:
    """Ids already written by an earlier run; a torn last line (crash mid-write) counts as not done."""
    done: set[str] = set()
    if not path.exists():
        return done
    with path.open("rb") as handle:
        for raw_line in handle:
            if not raw_line.endswith(b"\n"):
                continue  # torn: ResultWriter drops it before appending, so it must be redone
            try:
                payload = json.loads(raw_line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(payload, dict) and "id" in payload and "optimized" in payload:
                done.add(str(payload["id"]))
    return done


def _drop_torn_tail(path: Path) -> None:
    """A crash mid-write leaves a last line without its newline; appending after it would fuse two records."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as handle:
        data = handle.read()
        if data.endswith(b"\n"):
            return
        handle.truncate(data.rfind(b"\n") + 1)
