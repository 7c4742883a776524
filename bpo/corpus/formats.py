"""Reading prompt corpora (JSONL, JSON, CSV) and writing results as JSONL.

A malformed record fails alone: the reader yields a ``CorpusError`` with its line (or record) number and the
reason, and goes on. The four test sets of the paper are recognised by their fields (``text`` for Vicuna
Eval, ``instruction`` and ``context`` for Dolly and Self-Instruct, ``prompt`` for BPO-test).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from bpo.errors import CorpusFormatError

PROMPT_FIELDS = ("prompt", "text", "instruction", "question", "turns")
CONTEXT_FIELDS = ("context", "input")
ID_FIELDS = ("id", "question_id", "idx")

BUILTIN_DATASETS = {
    "vicuna": "vicuna_eval.jsonl",
    "dolly": "dolly_eval.json",
    "self-instruct": "self_instruct_eval.json",
    "bpo-test": "bpo_test.json",
}


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
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    return None


def to_record(raw: Any, line: int, field: str | None) -> CorpusRecord | CorpusError:
    if not isinstance(raw, dict):
        return CorpusError(line, f"expected an object, got {type(raw).__name__}")
    try:
        prompt = _pick_prompt(raw, field)
    except ValueError as exc:
        return CorpusError(line, str(exc))
    return CorpusRecord(
        line=line,
        id=_optional_str(raw, ID_FIELDS) or str(line),
        prompt=prompt,
        context=_optional_str(raw, CONTEXT_FIELDS),
        category=_optional_str(raw, ("category",)),
    )


def read_corpus(path: Path, field: str | None = None) -> Iterator[CorpusRecord | CorpusError]:
    if not path.exists():
        raise CorpusFormatError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from _read_csv(path, field)
    elif suffix == ".json":
        yield from _read_json(path, field)
    else:
        yield from _read_jsonl(path, field)


def _read_jsonl(path: Path, field: str | None) -> Iterator[CorpusRecord | CorpusError]:
    # Bytes, decoded line by line: one line that is not UTF-8 fails alone instead of ending the read.
    with path.open("rb") as handle:
        for number, raw_line in enumerate(handle, start=1):
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
            yield to_record(raw, number, field)


def _read_json(path: Path, field: str | None) -> Iterator[CorpusRecord | CorpusError]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        # One document: nothing can be salvaged record by record. JSONL is the resilient format.
        raise CorpusFormatError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise CorpusFormatError(f"{path}: a JSON object must hold exactly one list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise CorpusFormatError(f"{path}: expected a JSON array of records")
    for number, raw in enumerate(data, start=1):
        yield to_record(raw, number, field)


def _read_csv(path: Path, field: str | None) -> Iterator[CorpusRecord | CorpusError]:
    # utf-8-sig: spreadsheet exports start with a BOM that would otherwise be part of the first column's name.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return
        for row in reader:
            number = reader.line_num
            if None in row:
                yield CorpusError(number, f"{len(row[None])} more values than the header's columns")
                continue
            yield to_record(dict(row), number, field)


def count_records(path: Path) -> int | None:
    """For a progress bar's total; None when counting would mean reading a huge JSON document twice."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".txt", ""):
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            return max(sum(1 for _ in csv.reader(handle)) - 1, 0)
    return None


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
