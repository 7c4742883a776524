from __future__ import annotations

import json
from pathlib import Path

import pytest

from bpo.corpus.formats import (
    BUILTIN_DATASETS,
    CorpusError,
    CorpusRecord,
    ResultWriter,
    builtin_dataset_path,
    completed_ids,
    count_records,
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
