"""The rows of a Parquet file, a record batch at a time.

Only the columns a corpus record can use are read, batch by batch within each row group, with buffered reads of
each column chunk: memory holds one batch of those columns (and pyarrow's buffers for one row group's pages),
never the table.

A gzip-compressed Parquet file is decompressed first, a block at a time, into an anonymous temporary file that
is read the same way and vanishes when closed: Parquet's footer is at its end and its row groups are reached by
seeking, which a gzip stream can only do by decompressing again from its start, once per seek.
"""

from __future__ import annotations

import contextlib
import gzip
import shutil
import tempfile
import zlib
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from bpo.errors import CorpusFormatError

PARQUET_MAGIC = b"PAR1"
BATCH_ROWS = 1024
READ_BUFFER_BYTES = 1 << 20
# Decompressing a gzip-compressed file: the block copied at a time.
COPY_BLOCK_BYTES = 1 << 20


@contextlib.contextmanager
def _parquet_source(path: Path, gzipped: bool) -> Iterator[Path | IO[bytes]]:
    """``path`` itself, or its decompressed bytes in a temporary file (deleted on leaving)."""
    if not gzipped:
        yield path
        return
    with tempfile.TemporaryFile(prefix="bpo-parquet-") as plain:
        try:
            with gzip.open(path, "rb") as compressed:
                shutil.copyfileobj(compressed, plain, COPY_BLOCK_BYTES)
        except (EOFError, OSError, zlib.error) as exc:
            raise CorpusFormatError(f"{path}: cannot be decompressed: {exc}") from None
        plain.seek(0)
        yield plain


def parquet_rows(
    path: Path, usable: Collection[str], required: Collection[str], *, gzipped: bool = False
) -> Iterator[dict[str, Any]]:
    """Each row as a dict of the columns named in ``usable``; a file with none of ``required`` is refused whole
    (every row would fail for the same reason)."""
    with _parquet_source(path, gzipped) as source:
        yield from _rows(path, source, usable, required)


def _rows(
    path: Path, source: Path | IO[bytes], usable: Collection[str], required: Collection[str]
) -> Iterator[dict[str, Any]]:
    try:
        reader = pq.ParquetFile(source, buffer_size=READ_BUFFER_BYTES)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusFormatError(f"{path}: not a readable Parquet file: {exc}") from None
    with reader:
        names = reader.schema_arrow.names
        if not any(name in required for name in names):
            raise CorpusFormatError(
                f"{path}: no column holds a prompt (wanted any of {', '.join(required)}); "
                f"columns: {', '.join(names) or 'none'}"
            )
        columns = [name for name in names if name in usable]
        try:
            for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise CorpusFormatError(f"{path}: cannot be read on: {exc}") from None


def parquet_row_count(path: Path) -> int:
    """From the file's footer, without reading its data."""
    try:
        with pq.ParquetFile(path) as reader:
            return reader.metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise CorpusFormatError(f"{path}: not a readable Parquet file: {exc}") from None
