"""A job's items written out: as the platform stores them (JSONL), or as an OpenAI Batch output file.

The Batch output format lets a job stand in for a Batch run: one line per item, matched to its request by
``custom_id`` (the record's id, which is a Batch input line's ``custom_id``). The answer the run was for is the
target's answer to the optimized prompt, so that is the ``chat.completion`` a line carries; a job that stopped
after the rewrite stage carries the optimized prompt instead, from the optimizer's model. An item whose answer
was generated is a success even if judging it failed afterwards (the answer stands; ``bpo jobs report`` and the
JSONL export show the failure); an item without its output (failed, cancelled, or not finished yet) has
``response: null`` and an ``error``. Corpus lines rejected at submission are no items and have no line here:
their ids could not be read (``bpo jobs report`` lists them).

Each ``chat.completion`` body is built from what the platform records: ``usage`` counts the tokens of the stage
whose output it carries, for the target both answers of the item (the original prompt's and the optimized one's;
one when the optimizer kept the prompt), and ``finish_reason`` is always ``"stop"``, as the platform does not
record whether an answer reached its token limit.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Any


class ExportFormat(StrEnum):
    JSONL = "jsonl"
    OPENAI_BATCH = "openai-batch"


BATCH_SUCCESS_STATUS = 200


def batch_output_line(item: dict[str, Any]) -> dict[str, Any]:
    """One exported item (as ``ExportJob`` streams it) as a line of an OpenAI Batch output file."""
    item_id = str(item["item_id"])
    line: dict[str, Any] = {"id": f"batch_req_{item_id}", "custom_id": item["source_id"]}
    completion = _completion(item)
    if completion is None:
        line |= {"response": None, "error": _error(item)}
    else:
        line |= {
            "response": {"status_code": BATCH_SUCCESS_STATUS, "request_id": item_id, "body": completion},
            "error": None,
        }
    return line


def _completion(item: dict[str, Any]) -> dict[str, Any] | None:
    answers, rewrite = item.get("answers"), item.get("rewrite")
    if isinstance(answers, dict):
        text, model = answers.get("optimized_answer", ""), answers.get("target_model", "")
        finished_at, tokens = item.get("answers_at"), "target_tokens"
    elif item["status"] == "done" and isinstance(rewrite, dict):
        text, model = rewrite.get("optimized", ""), rewrite.get("model", "")
        finished_at, tokens = item.get("rewrite_at"), "rewrite_tokens"
    else:
        return None
    tokens_in, tokens_out = int(item.get(f"{tokens}_in") or 0), int(item.get(f"{tokens}_out") or 0)
    return {
        "id": f"chatcmpl-{item['item_id']}",
        "object": "chat.completion",
        "created": _unix_seconds(finished_at),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out},
    }


def _error(item: dict[str, Any]) -> dict[str, str]:
    status = item["status"]
    if status == "failed":
        stage = item.get("failed_stage") or "submit"
        return {"code": "item_failed", "message": f"{stage} stage: {item.get('error') or 'no reason recorded'}"}
    if status == "cancelled":
        return {"code": "item_cancelled", "message": "the job was cancelled before this item was done"}
    return {"code": "item_unfinished", "message": f"the item is still {status}; export again when the job is done"}


def _unix_seconds(stamp: Any) -> int:
    if isinstance(stamp, str):
        return int(datetime.fromisoformat(stamp).timestamp())
    return 0


def export_lines(items: Iterable[dict[str, Any]], export_format: ExportFormat) -> Iterator[str]:
    """Each item as one line of text (with its newline) in ``export_format``."""
    for item in items:
        payload = batch_output_line(item) if export_format is ExportFormat.OPENAI_BATCH else item
        yield json.dumps(payload, ensure_ascii=False) + "\n"


@contextlib.contextmanager
def export_sink(out: Path | None) -> Iterator[IO[str]]:
    """Standard output, or ``out`` (gzip-compressed when its name ends in ``.gz``). A file appears under its name
    only when everything was written: an export that fails part way leaves no file that looks complete."""
    if out is None:
        yield sys.stdout
        return
    partial = out.with_name(out.name + ".partial")
    try:
        with _text_writer(partial, compressed=out.name.endswith(".gz")) as handle:
            yield handle
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)


def _text_writer(path: Path, *, compressed: bool) -> IO[str]:
    return gzip.open(path, "wt", encoding="utf-8") if compressed else path.open("w", encoding="utf-8")
