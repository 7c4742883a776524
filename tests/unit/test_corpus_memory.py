"""A corpus of a million lines submits with the client's memory flat.

Each corpus is generated and then read by a separate process, which consumes the whole ``SubmitJob`` request
stream (``read_corpus`` and ``submit_requests``, no server) and reports its resident memory before reading and
its peak at half-way and at the end: a reader that held the corpus, or the requests, would grow by hundreds of
MiB, or go on growing; a streaming one grows by its buffers, once. A million lines of gzip-compressed JSON Lines;
100,000 for each other format, OpenAI Batch input among them, whose readers are exercised the same way in less
time (a million Batch lines take 15 s of CPU to read, twice the flat ones: ``CORPORA``). Two processes run side
by side, one per core: the million lines in one, the other formats one after another in the other, so that the
test takes about 12 s on an idle 2-core machine.
Run as a module, it is that helper: ``python -m tests.unit.test_corpus_memory FOLDER KIND [KIND ...]``.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpo.corpus.formats import CorpusError, CorpusRecord, read_corpus
from bpo.pipeline.client import submit_requests
from bpo.v1 import bpo_pb2 as pb

pytestmark = [pytest.mark.unit, pytest.mark.timeout(240)]

REPO_ROOT = Path(__file__).resolve().parents[2]
# kind -> (file name, records)
CORPORA = {
    "jsonl-gz": ("corpus.jsonl.gz", 1_000_000),
    "batch-jsonl-gz": ("batch_input.jsonl.gz", 100_000),
    "chat-jsonl": ("chat.jsonl", 100_000),
    "json-gz": ("corpus.json.gz", 100_000),
    "csv-gz": ("corpus.csv.gz", 100_000),
    "parquet": ("corpus.parquet", 100_000),
    "parquet-gz": ("corpus.parquet.gz", 100_000),
}
# One helper process per group, the groups side by side: about the same time each (8 s of reading a million
# lines against six smaller corpora).
GROUPS = (("jsonl-gz",), ("batch-jsonl-gz", "chat-jsonl", "json-gz", "csv-gz", "parquet", "parquet-gz"))
# One line in this many is malformed: rejected lines travel in the stream too.
MALFORMED_EVERY = 1000
PARQUET_ROW_GROUP = 10_000
BLOCK_LINES = 10_000
# Growth of the reading process's peak RSS allowed over its RSS before reading: buffers, a batch of records and
# the allocator's arenas (under 4 MiB measured for the text formats; pyarrow's page buffers add about 21 MiB
# for Parquet). A corpus held in memory would take about 85 MiB (100,000 records) to 850 MiB (a million), half
# of it in the second half of the read, which the second bound catches at any size.
MAX_GROWTH_KIB = {"parquet": 48 * 1024, "parquet-gz": 48 * 1024}
DEFAULT_MAX_GROWTH_KIB = 16 * 1024
MAX_SECOND_HALF_GROWTH_KIB = 8 * 1024
# Right after the peak mark is reset, the peak is the current RSS: a kernel that ignored the reset would leave
# the imports' peak there, under which a reader's growth could hide.
RESET_SLACK_KIB = 1024


def _prompt(number: int) -> str:
    return f"Explain topic number {number} to a curious student, with one example."


def _line(kind: str, number: int) -> str:
    """One JSON Lines record (written from a template: json.dumps would take longer than reading it)."""
    if number % MALFORMED_EVERY == MALFORMED_EVERY - 1:
        return '{"id": "broken", "prompt": \n'
    prompt = _prompt(number)
    if kind == "batch-jsonl-gz":
        return (
            f'{{"custom_id": "request-{number}", "method": "POST", "url": "/v1/chat/completions", "body": '
            f'{{"model": "gpt-4o-mini", "messages": [{{"role": "system", "content": "You are concise."}}, '
            f'{{"role": "user", "content": "{prompt}"}}]}}}}\n'
        )
    if kind == "chat-jsonl":
        return (
            f'{{"id": "c{number}", "messages": [{{"role": "user", "content": "Name topic {number}."}}, '
            f'{{"role": "assistant", "content": "Topic {number}."}}, {{"role": "user", "content": "{prompt}"}}]}}\n'
        )
    return f'{{"id": "q{number}", "prompt": "{prompt}", "category": "c{number % 7}"}}\n'


def _write_blocks(handle: TextIO, count: int, text_of: Callable[[int], str]) -> None:
    for start in range(0, count, BLOCK_LINES):
        handle.write("".join(text_of(number) for number in range(start, min(count, start + BLOCK_LINES))))


def generate(kind: str, count: int, path: Path) -> None:
    if kind in ("jsonl-gz", "batch-jsonl-gz"):
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as handle:
            _write_blocks(handle, count, lambda number: _line(kind, number))
    elif kind == "chat-jsonl":
        with path.open("w", encoding="utf-8") as handle:
            _write_blocks(handle, count, lambda number: _line(kind, number))
    elif kind == "json-gz":
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as handle:
            handle.write("[\n")
            _write_blocks(handle, count, lambda n: (",\n" if n else "") + f'{{"id": "q{n}", "prompt": "{_prompt(n)}"}}')
            handle.write("\n]\n")
    elif kind == "csv-gz":
        with gzip.open(path, "wt", encoding="utf-8", newline="", compresslevel=1) as handle:
            handle.write("id,prompt,context\r\n")
            _write_blocks(handle, count, lambda number: f'q{number},"{_prompt(number)}",\r\n')
    elif kind == "parquet":
        schema = pa.schema([("id", pa.string()), ("prompt", pa.string())])
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, count, PARQUET_ROW_GROUP):
                numbers = range(start, min(count, start + PARQUET_ROW_GROUP))
                writer.write_table(
                    pa.table({"id": [f"q{n}" for n in numbers], "prompt": [_prompt(n) for n in numbers]}, schema)
                )
        # Arrow's pool keeps what writing took; released, reading's own buffers are measured, not hidden in it.
        pa.default_memory_pool().release_unused()
    elif kind == "parquet-gz":
        plain = path.with_suffix("")
        generate("parquet", count, plain)
        with plain.open("rb") as source, gzip.open(path, "wb", compresslevel=1) as compressed:
            shutil.copyfileobj(source, compressed)
        plain.unlink()
    else:
        raise ValueError(f"unknown corpus kind {kind!r}")


def _status_kib(name: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: the peak), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {name}")


def _reset_peak() -> int:
    """Resets this process's peak RSS mark to its current RSS (Linux: "5" to clear_refs), so that the peak
    measured after it is what follows alone; returns the RSS then, in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    before_kib = _status_kib("VmRSS")
    if _status_kib("VmHWM") - before_kib > RESET_SLACK_KIB:
        raise RuntimeError("the kernel did not reset the peak RSS mark: the peak measured would not be reading's")
    return before_kib


def read(path: Path, lines: int) -> dict[str, Any]:
    before_kib = _reset_peak()
    started, cpu_started = time.perf_counter(), time.process_time()
    items = rejected = 0
    halfway_kib = 0
    for number, request in enumerate(submit_requests(pb.JobSpec(name="memory"), read_corpus(path))):
        kind = request.WhichOneof("payload")
        items += kind == "item"
        rejected += kind == "rejected"
        if number == lines // 2:
            halfway_kib = _status_kib("VmHWM")
    return {
        "items": items,
        "rejected": rejected,
        "seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "rss_before_kib": before_kib,
        "peak_halfway_kib": halfway_kib,
        "peak_kib": _status_kib("VmHWM"),
    }


def measure(folder: Path, kinds: list[str]) -> list[dict[str, Any]]:
    """Each kind's corpus generated, read and deleted in turn, with its figures."""
    results = []
    for kind in kinds:
        name, count = CORPORA[kind]
        path = folder / name
        generate(kind, count, path)
        results.append(read(path, count) | {"kind": kind, "lines": count})
        path.unlink()
    return results


def _measure_in_helper(folder: Path, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.unit.test_corpus_memory", str(folder), *kinds],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=220, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures: list[dict[str, Any]] = json.loads(done.stdout)
    return figures


def test_a_million_line_corpus_submits_in_flat_memory(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=len(GROUPS)) as pool:
        results = [
            figures for group in pool.map(lambda g: _measure_in_helper(tmp_path, g), GROUPS) for figures in group
        ]
    print("\ncorpus memory:", json.dumps(results, indent=1))
    assert sorted(figures["kind"] for figures in results) == sorted(CORPORA)
    for figures in results:
        malformed = figures["lines"] // MALFORMED_EVERY if "jsonl" in figures["kind"] else 0
        assert (figures["items"], figures["rejected"]) == (figures["lines"] - malformed, malformed), figures
        # Nothing held up front (the corpus, loaded, would take tens to hundreds of MiB) ...
        growth_kib = figures["peak_kib"] - figures["rss_before_kib"]
        assert growth_kib < MAX_GROWTH_KIB.get(figures["kind"], DEFAULT_MAX_GROWTH_KIB), figures
        # ... nor gathered as it goes: the second half of the corpus adds nothing to the peak of the first.
        assert figures["peak_kib"] - figures["peak_halfway_kib"] < MAX_SECOND_HALF_GROWTH_KIB, figures


def test_the_measure_catches_a_reader_that_holds_its_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same figures of a reader that keeps every request: the bounds above must fail it.
    held: list[pb.SubmitJobRequest] = []
    streaming = submit_requests

    def holding(spec: pb.JobSpec, entries: Iterable[CorpusRecord | CorpusError]) -> Iterator[pb.SubmitJobRequest]:
        for request in streaming(spec, entries):
            held.append(request)
            yield request

    monkeypatch.setattr(sys.modules[__name__], "submit_requests", holding)
    # 100,000 lines, as the smaller corpora: the bounds that hold at that size fail a reader that keeps them.
    monkeypatch.setitem(CORPORA, "jsonl-gz", ("corpus.jsonl.gz", 100_000))
    (figures,) = measure(tmp_path, ["jsonl-gz"])
    # About 86 MiB in all and 44 MiB in the second half, measured: both bounds fail it.
    assert figures["peak_kib"] - figures["rss_before_kib"] >= DEFAULT_MAX_GROWTH_KIB, figures
    assert figures["peak_kib"] - figures["peak_halfway_kib"] >= MAX_SECOND_HALF_GROWTH_KIB, figures
    assert len(held) == figures["lines"] + 1


def main(argv: list[str]) -> None:
    if not argv or any(kind not in CORPORA for kind in argv[1:]):
        raise SystemExit(f"usage: {__doc__}")
    print(json.dumps(measure(Path(argv[0]), argv[1:])))


if __name__ == "__main__":
    main(sys.argv[1:])
