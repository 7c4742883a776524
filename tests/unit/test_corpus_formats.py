from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bpo.corpus import formats, json_stream
from bpo.corpus.formats import (
    BUILTIN_DATASETS,
    CorpusError,
    CorpusFormat,
    CorpusLayout,
    CorpusRecord,
    ResultWriter,
    builtin_dataset_path,
    completed_ids,
    count_records,
    detect_layout,
    read_corpus,
)
from bpo.errors import CorpusFormatError

pytestmark = pytest.mark.unit


def records(entries: list[CorpusRecord | CorpusError]) -> list[CorpusRecord]:
    return [e for e in entries if isinstance(e, CorpusRecord)]


def errors(entries: list[CorpusRecord | CorpusError]) -> list[CorpusError]:
    return [e for e in entries if isinstance(e, CorpusError)]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_malformed_line_fails_alone(tmp_path: Path) -> None:
    path = write(
        tmp_path / "in.jsonl",
        '{"id": "a", "prompt": "first"}\n'
        "\n"
        '{"id": "b", "prompt": "sec\n'
        '{"id": "c", "prompt": "third", "context": "ctx", "category": "qa"}\n'
        "[1, 2]\n"
        '{"id": "e", "prompt": "   "}\n'
        '{"question_id": 6, "text": "sixth"}\n',
    )
    entries = list(read_corpus(path))
    assert [r.id for r in records(entries)] == ["a", "c", "6"]
    assert [(r.line, r.prompt) for r in records(entries)] == [(1, "first"), (4, "third"), (7, "sixth")]
    third = records(entries)[1]
    assert (third.context, third.category) == ("ctx", "qa")
    assert [e.line for e in errors(entries)] == [3, 5, 6]
    assert errors(entries)[0].reason.startswith("invalid JSON")
    assert errors(entries)[1].reason == "expected an object, got list"
    assert errors(entries)[2].reason == "field 'prompt' is empty"


def test_jsonl_line_that_is_not_utf8_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "\xff"}\n{"prompt": "c"}\n')
    entries = list(read_corpus(path))
    assert [r.prompt for r in records(entries)] == ["a", "c"]
    assert [e.line for e in errors(entries)] == [2]
    assert "UTF-8" in errors(entries)[0].reason


def test_json_array(tmp_path: Path) -> None:
    path = write(
        tmp_path / "in.json",
        json.dumps([{"instruction": "one", "input": "ctx"}, 5, {"prompt": "three", "idx": 0}]),
    )
    entries = list(read_corpus(path))
    assert [(r.line, r.id, r.prompt, r.context) for r in records(entries)] == [
        (1, "1", "one", "ctx"),
        (3, "0", "three", None),
    ]
    assert errors(entries) == [CorpusError(2, "expected an object, got int")]


def test_json_object_wrapping_one_list(tmp_path: Path) -> None:
    path = write(
        tmp_path / "in.json",
        json.dumps({"meta": {"v": 1}, "items": [{"question": "q1"}, {"turns": ["t1", "t2"]}]}),
    )
    assert [r.prompt for r in records(list(read_corpus(path)))] == ["q1", "t1"]


def test_json_object_with_two_lists_or_a_scalar_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CorpusFormatError, match="exactly one list"):
        list(read_corpus(write(tmp_path / "two.json", json.dumps({"a": [], "b": []}))))
    with pytest.raises(CorpusFormatError, match="expected a JSON array"):
        list(read_corpus(write(tmp_path / "scalar.json", "3")))


def test_invalid_json_document(tmp_path: Path) -> None:
    with pytest.raises(CorpusFormatError, match="line 2"):
        list(read_corpus(write(tmp_path / "bad.json", '[\n{"prompt": }\n]')))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CorpusFormatError, match="no such file"):
        list(read_corpus(tmp_path / "nope.jsonl"))


def test_csv(tmp_path: Path) -> None:
    path = write(
        tmp_path / "in.csv",
        'id,prompt,context\nr1,"Say ""hi"", politely",\nr2,two,ctx,EXTRA,MORE\nr3,"multi\nline",c3\n',
    )
    entries = list(read_corpus(path))
    assert [(r.id, r.prompt, r.context) for r in records(entries)] == [
        ("r1", 'Say "hi", politely', None),
        ("r3", "multi\nline", "c3"),
    ]
    (error,) = errors(entries)
    assert error.line == 3
    assert error.reason == "2 more values than the header's columns"


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffprompt,id\nhello,7\n".encode())
    assert [(r.id, r.prompt) for r in records(list(read_corpus(path)))] == [("7", "hello")]


def test_empty_csv(tmp_path: Path) -> None:
    assert list(read_corpus(write(tmp_path / "empty.csv", ""))) == []


@pytest.mark.parametrize(
    ("name", "count", "first_id", "with_context"),
    [
        ("vicuna", 80, "1", 0),
        ("dolly", 200, "0", 63),
        ("self-instruct", 252, "user_oriented_task_0", 208),
        ("bpo-test", 200, "1", 0),
    ],
)
def test_shipped_datasets_read_without_a_field(name: str, count: int, first_id: str, with_context: int) -> None:
    entries = list(read_corpus(builtin_dataset_path(name)))
    assert errors(entries) == []
    found = records(entries)
    assert len(found) == count
    assert found[0].id == first_id
    assert len({r.id for r in found}) == count
    assert sum(r.context is not None for r in found) == with_context
    assert all(r.prompt.strip() for r in found)


def test_shipped_dataset_fields() -> None:
    vicuna = records(list(read_corpus(builtin_dataset_path("vicuna"))))
    assert vicuna[0].prompt == "How can I improve my time management skills?"
    assert vicuna[0].category == "generic"
    bpo_test = records(list(read_corpus(builtin_dataset_path("bpo-test"))))
    # The prompt field, not the paper's optimized_prompt beside it.
    assert bpo_test[0].prompt == "Complete the lyrics of the following song\nOh stars in the night,"
    assert set(BUILTIN_DATASETS) == {"vicuna", "dolly", "self-instruct", "bpo-test"}


def test_unknown_dataset() -> None:
    with pytest.raises(CorpusFormatError, match="choose one of vicuna"):
        builtin_dataset_path("alpaca")


def test_field_override(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", '{"prompt": "p", "question": "q"}\n{"prompt": "only p"}\n')
    entries = list(read_corpus(path, field="question"))
    assert records(entries)[0].prompt == "q"
    (error,) = errors(entries)
    assert error.line == 2
    assert error.reason == "no prompt field ('question'); fields present: prompt"
    categories = records(list(read_corpus(builtin_dataset_path("vicuna"), field="category")))
    assert categories[0].prompt == "generic"


def test_missing_prompt_field_lists_the_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", '{"zeta": "x", "alpha": "y"}\n{}\n{"prompt": 3}\n')
    first, second, third = list(read_corpus(path))
    assert isinstance(first, CorpusError)
    assert first.reason.startswith("no prompt field (any of prompt, text, instruction")
    assert first.reason.endswith("fields present: alpha, zeta")
    assert isinstance(second, CorpusError) and second.reason.endswith("fields present: none")
    assert isinstance(third, CorpusError) and third.reason == "field 'prompt' is int, expected a string"


def test_count_records(tmp_path: Path) -> None:
    assert count_records(write(tmp_path / "a.jsonl", '{"prompt": "x"}\n\n{"prompt": "y"}\n')) == 2
    assert count_records(write(tmp_path / "a.csv", "prompt\nx\ny\nz\n")) == 3
    assert count_records(write(tmp_path / "a.json", "[]")) is None


def test_completed_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path / "out.jsonl",
        '{"id": "1", "optimized": "a"}\n'
        '{"id": 2, "optimized": "b"}\n'
        '{"id": "3"}\n'
        "not json\n"
        '{"id": "4", "optimized": "d',
    )
    assert completed_ids(path) == {"1", "2"}
    assert completed_ids(tmp_path / "missing.jsonl") == set()


def test_completed_ids_ignores_a_torn_line_that_happens_to_parse(tmp_path: Path) -> None:
    # The writer will drop this unterminated line before appending, so it must be redone.
    path = write(tmp_path / "out.jsonl", '{"id": "1", "optimized": "a"}\n{"id": "2", "optimized": "b"}')
    assert completed_ids(path) == {"1"}
    with ResultWriter(path):
        pass
    assert completed_ids(path) == {"1"}
    assert path.read_text(encoding="utf-8") == '{"id": "1", "optimized": "a"}\n'


def test_completed_ids_survives_a_torn_multibyte_character(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes('{"id": "1", "optimized": "a"}\n{"id": "2", "optimized": "é'.encode()[:-1])
    assert completed_ids(path) == {"1"}


def test_result_writer_drops_a_torn_tail_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "out.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"id": "1", "optimized": "a"}\n{"id": "2", "optim', encoding="utf-8")
    with ResultWriter(path) as writer:
        writer.write({"id": "2", "optimized": "Grüße ✓"})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"id": "1", "optimized": "a"},
        {"id": "2", "optimized": "Grüße ✓"},
    ]
    assert "Grüße ✓" in lines[1]  # written as UTF-8, not \u escapes


def test_result_writer_creates_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "new" / "out.jsonl"
    with ResultWriter(path) as writer:
        writer.write({"id": "1"})
    with ResultWriter(path) as writer:
        writer.write({"id": "2"})
    assert path.read_text(encoding="utf-8") == '{"id": "1"}\n{"id": "2"}\n'


def test_result_writer_on_a_file_with_only_a_torn_line(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", '{"id": "1", "opt')
    with ResultWriter(path) as writer:
        writer.write({"id": "1", "optimized": "x"})
    assert path.read_text(encoding="utf-8") == '{"id": "1", "optimized": "x"}\n'


# -- compressed, detected and streamed ----------------------------------------------------------------------


def gzip_write(path: Path, text: str) -> Path:
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    return path


MIXED_JSONL = '{"id": "a", "prompt": "first"}\n{"id": "b", "prompt": \n{"id": "c", "prompt": "third"}\n'


def test_gzip_compressed_text_formats(tmp_path: Path) -> None:
    jsonl = list(read_corpus(gzip_write(tmp_path / "c.jsonl.gz", MIXED_JSONL)))
    assert [(e.line, type(e)) for e in jsonl] == [(1, CorpusRecord), (2, CorpusError), (3, CorpusRecord)]
    assert jsonl == list(read_corpus(write(tmp_path / "c.jsonl", MIXED_JSONL)))
    document = gzip_write(tmp_path / "c.json.gz", json.dumps({"rows": [{"prompt": "p1"}, 3, {"text": "p3"}]}))
    assert list(read_corpus(document)) == [
        CorpusRecord(1, "1", "p1", None, None),
        CorpusError(2, "expected an object, got int"),
        CorpusRecord(3, "3", "p3", None, None),
    ]
    table = gzip_write(tmp_path / "c.csv.gz", "\ufeffid,prompt\nr1,hello\nr2,two,EXTRA\n")
    assert list(read_corpus(table)) == [
        CorpusRecord(2, "r1", "hello", None, None),
        CorpusError(3, "1 more values than the header's columns"),
    ]
    assert count_records(table) == 2
    assert count_records(tmp_path / "c.jsonl.gz") == 3
    assert count_records(document) is None


def test_gzip_is_told_by_its_content_and_plain_text_by_its_own(tmp_path: Path) -> None:
    # Compressed under a plain name, and plain under a .gz name: the bytes decide.
    assert len(records(list(read_corpus(gzip_write(tmp_path / "c.jsonl", MIXED_JSONL))))) == 2
    assert len(records(list(read_corpus(write(tmp_path / "c.jsonl.gz", MIXED_JSONL))))) == 2


def test_a_truncated_gzip_stream_ends_the_read_loudly(tmp_path: Path) -> None:
    lines = "".join(json.dumps({"prompt": f"prompt number {i} " + "x" * (i % 97)}) + "\n" for i in range(20_000))
    whole = gzip.compress(lines.encode())
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    read: list[CorpusRecord | CorpusError] = []
    with pytest.raises(CorpusFormatError, match="cannot be read past this point"):
        read.extend(read_corpus(path))
    assert 0 < len(read) < 20_000
    assert errors(read) == []


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        # JSON Lines under a .json name: a whole object on the first line, and more after it.
        ("lines.json", '{"prompt": "a"}\n{"prompt": "b"}\n', CorpusFormat.JSONL),
        ("one.json", '{"rows": [{"prompt": "a"}]}\n', CorpusFormat.JSON),
        ("pretty.json", '{\n  "rows": [{"prompt": "a"}]\n}\n', CorpusFormat.JSON),
        ("array.txt", ' \n[{"prompt": "a"}]', CorpusFormat.JSON),
        ("lines.txt", '{"prompt": "a"}', CorpusFormat.JSONL),
        ("noname", "not json at all\n", CorpusFormat.JSONL),
        ("array.jsonl", '[{"prompt": "a"}]\n', CorpusFormat.JSONL),  # an explicit JSON Lines name is kept
        ("table.csv", "[prompt]\nx\n", CorpusFormat.CSV),
    ],
)
def test_format_detection(tmp_path: Path, name: str, text: str, expected: CorpusFormat) -> None:
    assert detect_layout(write(tmp_path / name, text)) == CorpusLayout(expected, gzipped=False)
    assert detect_layout(gzip_write(tmp_path / f"{name}.gz", text)) == CorpusLayout(expected, gzipped=True)


def test_jsonl_under_a_json_name_is_read_line_by_line(tmp_path: Path) -> None:
    entries = list(read_corpus(write(tmp_path / "c.json", MIXED_JSONL)))
    assert [e.line for e in records(entries)] == [1, 3]


def test_a_jsonl_line_over_the_size_limit_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "RECORD_SIZE_LIMIT", 64)
    long_line = json.dumps({"prompt": "y" * 500})
    path = write(tmp_path / "c.jsonl", f'{{"prompt": "a"}}\n{long_line}\n{{"prompt": "c"}}\n{long_line}')
    entries = list(read_corpus(path))
    assert [r.prompt for r in records(entries)] == ["a", "c"]
    assert errors(entries) == [CorpusError(2, "line longer than 64 bytes"), CorpusError(4, "line longer than 64 bytes")]
    assert count_records(path) == 4


def test_json_document_is_streamed_record_by_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks far smaller than records: every record, string and number spans chunk boundaries.
    monkeypatch.setattr(json_stream, "CHUNK_CHARS", 7)
    rows = [{"prompt": f"prompt {i} " + "é" * i, "id": 10**i, "context": None} for i in range(12)]
    path = write(tmp_path / "c.json", json.dumps({"meta": {"n": [1, 2]}, "rows": rows, "tail": 12345678901}, indent=1))
    assert [(r.id, r.prompt) for r in records(list(read_corpus(path)))] == [
        (str(row["id"]), row["prompt"]) for row in rows
    ]


def test_json_records_before_a_syntax_error_are_read(tmp_path: Path) -> None:
    text = "[\n" + ",\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(3)) + ',\n{"prompt": oops}\n]'
    read: list[CorpusRecord | CorpusError] = []
    with pytest.raises(CorpusFormatError, match="invalid JSON at line 5, column 12: Expecting value"):
        read.extend(read_corpus(write(tmp_path / "c.json", text)))
    assert [r.prompt for r in records(read)] == ["p0", "p1", "p2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "line 1, column 1: Expecting value"),
        ('[{"prompt": "a"} {"prompt": "b"}]', "Expecting ',' delimiter"),
        ('[{"prompt": "a"}] extra', "Extra data after the document"),
        ('{"rows": [], 3: []}', "Expecting property name enclosed in double quotes"),
        ('{"rows" []}', "Expecting ':' delimiter"),
        ('[{"prompt": "a"', "Expecting ',' delimiter"),
        ('["unterminated', "Unterminated string"),
        ('"a string"', "expected a JSON array of records"),
        ('{"a": 1}', "exactly one list"),
    ],
)
def test_malformed_json_documents(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(CorpusFormatError, match=message):
        list(read_corpus(write(tmp_path / "c.json", text)))


def test_a_json_record_over_the_size_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_stream, "CHUNK_CHARS", 16)
    monkeypatch.setattr(formats, "RECORD_SIZE_LIMIT", 100)
    path = write(tmp_path / "c.json", json.dumps([{"prompt": "ok"}, {"prompt": "z" * 1000}]))
    read: list[CorpusRecord | CorpusError] = []
    with pytest.raises(CorpusFormatError, match="a record longer than 100 characters"):
        read.extend(read_corpus(path))
    assert [r.prompt for r in records(read)] == ["ok"]


def test_text_that_is_not_utf8_in_a_document_or_table(tmp_path: Path) -> None:
    document = tmp_path / "c.json"
    document.write_bytes(b'[{"prompt": "\xff"}]')
    with pytest.raises(CorpusFormatError, match="not valid UTF-8"):
        list(read_corpus(document))
    table = tmp_path / "c.csv"
    table.write_bytes(b"prompt\nfine\n\xff\n")
    with pytest.raises(CorpusFormatError, match="not valid UTF-8"):
        list(read_corpus(table))


def test_json_nested_too_deeply_fails_its_line_or_ends_its_document(tmp_path: Path) -> None:
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    entries = list(read_corpus(write(tmp_path / "c.jsonl", f'{deep}\n{{"prompt": "fine"}}\n')))
    assert entries == [CorpusError(1, "invalid JSON: nested too deeply"), CorpusRecord(2, "2", "fine", None, None)]
    with pytest.raises(CorpusFormatError, match="nested too deeply"):
        list(read_corpus(write(tmp_path / "c.json", f"[{deep}]")))
