"""Parquet corpora: records streamed a batch at a time, never the whole table."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpo.corpus.formats import (
    CorpusError,
    CorpusFormat,
    CorpusLayout,
    CorpusRecord,
    count_records,
    detect_layout,
    read_corpus,
)
from bpo.corpus.parquet import BATCH_ROWS
from bpo.errors import CorpusFormatError

pytestmark = pytest.mark.unit


def write_parquet(path: Path, columns: dict[str, list[Any]], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_flat_columns(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "c.parquet",
        {
            "id": [10, 11, 12],
            "prompt": ["one", None, "three"],
            "context": [None, None, "ctx"],
            "category": ["a", "b", None],
            "embedding": [[0.1], [0.2], [0.3]],  # a column no record uses: not even read
        },
    )
    assert list(read_corpus(path)) == [
        CorpusRecord(1, "10", "one", None, "a"),
        CorpusError(2, "field 'prompt' is NoneType, expected a string"),
        CorpusRecord(3, "12", "three", "ctx", None),
    ]
    assert count_records(path) == 3


def test_nested_chat_and_batch_columns(tmp_path: Path) -> None:
    messages = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
        [{"role": "user", "content": "How?"}],
    ]
    path = write_parquet(tmp_path / "chat.parquet", {"id": ["c1", "c2"], "messages": messages})
    first, second = list(read_corpus(path))
    assert isinstance(first, CorpusRecord) and (first.prompt, first.context) == (
        "Why?",
        "Earlier turns of this conversation, oldest first:\n[system]\nBe brief.",
    )
    assert second == CorpusRecord(2, "c2", "How?", None, None)

    bodies = [{"model": "m", "messages": [{"role": "user", "content": "Batch q"}]}]
    batch = write_parquet(
        tmp_path / "batch.parquet",
        {"custom_id": ["req-1"], "method": ["POST"], "url": ["/v1/chat/completions"], "body": bodies},
    )
    assert list(read_corpus(batch)) == [CorpusRecord(1, "req-1", "Batch q", None, None)]


def test_a_file_without_a_prompt_column_is_refused_whole(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "c.parquet", {"title": ["x"], "body_text": ["y"]})
    with pytest.raises(CorpusFormatError, match=r"no column holds a prompt .*columns: title, body_text"):
        list(read_corpus(path))
    with pytest.raises(CorpusFormatError, match="wanted any of title"):
        list(read_corpus(write_parquet(tmp_path / "d.parquet", {"prompt": ["p"]}), field="title"))


def test_a_named_field_is_read(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "c.parquet", {"prompt": ["p"], "rewritten": ["r"]})
    assert list(read_corpus(path, field="rewritten")) == [CorpusRecord(1, "1", "r", None, None)]


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1 and then nothing a Parquet footer needs")
    with pytest.raises(CorpusFormatError, match="not a readable Parquet file"):
        list(read_corpus(path))


def test_parquet_is_told_by_its_content_whatever_its_name(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "export.dat", {"prompt": ["p"]})
    assert list(read_corpus(path)) == [CorpusRecord(1, "1", "p", None, None)]


def test_rows_stream_a_batch_at_a_time(tmp_path: Path) -> None:
    rows = 40 * BATCH_ROWS
    prompt = "x" * 500
    path = write_parquet(tmp_path / "big.parquet", {"prompt": [f"{i} {prompt}" for i in range(rows)]}, BATCH_ROWS)
    table_bytes = pq.read_table(path).nbytes
    baseline = pa.total_allocated_bytes()
    records = read_corpus(path)
    first = next(records)
    held = pa.total_allocated_bytes() - baseline
    assert isinstance(first, CorpusRecord) and first.prompt.startswith("0 ")
    # A batch or two of one row group are decoded (about 0.5 MiB each), not the table (about 20 MiB).
    assert held < table_bytes / 4, (held, table_bytes)
    assert sum(1 for _ in records) == rows - 1


def test_a_damaged_row_group_ends_the_read_after_the_rows_before_it(tmp_path: Path) -> None:
    rows = 4 * BATCH_ROWS
    path = write_parquet(tmp_path / "c.parquet", {"prompt": [f"prompt {i} " * 20 for i in range(rows)]}, BATCH_ROWS)
    last_group = pq.ParquetFile(path).metadata.row_group(3).column(0)
    dictionary_page = last_group.dictionary_page_offset
    start = dictionary_page if dictionary_page is not None else last_group.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + 64] = b"\xff" * 64  # the first page's header
    path.write_bytes(bytes(data))
    read: list[CorpusRecord | CorpusError] = []
    with pytest.raises(CorpusFormatError, match="cannot be read on"):
        read.extend(read_corpus(path))
    assert len(read) == 3 * BATCH_ROWS
    assert all(isinstance(entry, CorpusRecord) for entry in read)


@pytest.mark.parametrize("name", ["c.parquet.gz", "export.gz", "noname"])
def test_gzip_compressed_parquet_is_decompressed_and_read(tmp_path: Path, name: str) -> None:
    rows = 3 * BATCH_ROWS
    source = write_parquet(tmp_path / "source.parquet", {"id": [f"r{i}" for i in range(rows)], "prompt": ["p"] * rows})
    path = tmp_path / name
    path.write_bytes(gzip.compress(source.read_bytes()))
    assert detect_layout(path) == CorpusLayout(CorpusFormat.PARQUET, gzipped=True)
    entries = list(read_corpus(path))
    assert [entry.id for entry in entries if isinstance(entry, CorpusRecord)] == [f"r{i}" for i in range(rows)]
    assert count_records(path) is None  # it would be decompressed twice


def test_gzip_compressed_files_that_are_not_parquet_inside_are_refused(tmp_path: Path) -> None:
    named = tmp_path / "c.parquet.gz"
    named.write_bytes(gzip.compress(b'{"prompt": "not parquet"}\n'))
    with pytest.raises(CorpusFormatError, match="not a readable Parquet file"):
        list(read_corpus(named))
    truncated = tmp_path / "t.parquet.gz"
    source = write_parquet(tmp_path / "s.parquet", {"prompt": [f"prompt {i}" for i in range(5000)]})
    compressed = gzip.compress(source.read_bytes())
    truncated.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(CorpusFormatError, match="cannot be decompressed"):
        list(read_corpus(truncated))
