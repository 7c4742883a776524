"""Exporting a job's items: JSONL as stored, and the OpenAI Batch output format."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from openai.types.chat import ChatCompletion
from typer.testing import CliRunner

from bpo.cli import jobs_cmd
from bpo.corpus.export import ExportFormat, batch_output_line, export_lines, export_sink

pytestmark = pytest.mark.unit

ITEM_ID = "5b0f2c1e-8f4a-4a57-9d55-0c3b2a1f9e10"


def item(**fields: Any) -> dict[str, Any]:
    """An item as ExportJob streams it (a row of the items table)."""
    row: dict[str, Any] = {
        "item_id": ITEM_ID,
        "job_id": "9a0e4a8e-1111-4c1e-8000-000000000001",
        "source_id": "request-7",
        "line": 7,
        "prompt": "Explain tides.",
        "context": None,
        "status": "done",
        "rewrite": {"optimized": "Explain tides in two paragraphs.", "model": "bpo-7b", "tokens_in": 30},
        "rewrite_at": "2026-11-30T12:00:00+00:00",
        "answers": {
            "original_answer": "Tides are...",
            "optimized_answer": "Tides are caused by the Moon...",
            "target_model": "stub-target",
        },
        "answers_at": "2026-11-30T12:00:05+00:00",
        "verdict": {"winner": "WINNER_OPTIMIZED"},
        "rewrite_tokens_in": 30,
        "rewrite_tokens_out": 12,
        "target_tokens_in": 40,
        "target_tokens_out": 90,
        "failed_stage": None,
        "error": None,
    }
    return row | fields


def test_an_answered_item_is_a_chat_completion_of_the_optimized_prompts_answer() -> None:
    line = batch_output_line(item())
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert line["id"] == f"batch_req_{ITEM_ID}"
    assert line["custom_id"] == "request-7"
    assert line["error"] is None
    response = line["response"]
    assert (response["status_code"], response["request_id"]) == (200, ITEM_ID)
    completion = ChatCompletion.model_validate(response["body"])  # the OpenAI SDK's own model of the body
    assert completion.object == "chat.completion"
    assert completion.model == "stub-target"
    assert completion.created == 1796040005
    assert completion.choices[0].message.content == "Tides are caused by the Moon..."
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (40, 90)
    assert completion.usage.total_tokens == 130


def test_an_answer_stands_when_judging_it_failed() -> None:
    line = batch_output_line(item(status="failed", failed_stage="judge", error="judge unavailable", verdict=None))
    assert line["error"] is None
    assert line["response"]["body"]["choices"][0]["message"]["content"] == "Tides are caused by the Moon..."


def test_a_rewrite_only_job_carries_the_optimized_prompt() -> None:
    line = batch_output_line(item(answers=None, answers_at=None, target_tokens_in=0, target_tokens_out=0))
    body = ChatCompletion.model_validate(line["response"]["body"])
    assert body.choices[0].message.content == "Explain tides in two paragraphs."
    assert body.model == "bpo-7b"
    assert body.usage is not None and (body.usage.prompt_tokens, body.usage.completion_tokens) == (30, 12)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        (
            {"status": "failed", "failed_stage": "generate", "error": "HTTP 400 from target", "answers": None},
            {"code": "item_failed", "message": "generate stage: HTTP 400 from target"},
        ),
        (
            {"status": "failed", "failed_stage": "rewrite", "error": "too long", "rewrite": None, "answers": None},
            {"code": "item_failed", "message": "rewrite stage: too long"},
        ),
        (
            {"status": "cancelled", "answers": None},
            {"code": "item_cancelled", "message": "the job was cancelled before this item was done"},
        ),
        (
            {"status": "rewritten", "answers": None},
            {"code": "item_unfinished", "message": "the item is still rewritten; export again when the job is done"},
        ),
    ],
)
def test_an_item_without_its_output_is_an_error_line(fields: dict[str, Any], error: dict[str, str]) -> None:
    line = batch_output_line(item(**fields))
    assert line == {"id": f"batch_req_{ITEM_ID}", "custom_id": "request-7", "response": None, "error": error}


def test_export_lines_in_each_format() -> None:
    items = [item(), item(source_id="request-8", status="cancelled", answers=None)]
    as_stored = list(export_lines(items, ExportFormat.JSONL))
    assert [json.loads(text) for text in as_stored] == items
    as_batch = list(export_lines(items, ExportFormat.OPENAI_BATCH))
    assert all(text.endswith("\n") and text.count("\n") == 1 for text in as_batch)
    assert [json.loads(text)["custom_id"] for text in as_batch] == ["request-7", "request-8"]


def test_export_sink_compresses_a_gz_name_and_leaves_nothing_behind_a_failure(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl.gz"
    with export_sink(out) as sink:
        sink.write('{"a": "é"}\n')
        assert not out.exists()  # written under another name until complete
    assert gzip.decompress(out.read_bytes()).decode() == '{"a": "é"}\n'
    failed = tmp_path / "failed.jsonl"
    with pytest.raises(RuntimeError), export_sink(failed) as sink:
        sink.write("{}\n")
        raise RuntimeError("the stream broke")
    assert list(tmp_path.iterdir()) == [out]


class FakeJobsClient:
    """Stands in for the Jobs service's client in the ``bpo jobs export`` command."""

    exported: ClassVar[list[str]] = []

    def __init__(self, address: str, settings: object) -> None:
        pass

    def __enter__(self) -> FakeJobsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def export(self, job_id: str) -> Iterator[dict[str, Any]]:
        self.exported.append(job_id)
        yield item()
        yield item(source_id="request-8", status="failed", failed_stage="generate", error="boom", answers=None)


def test_the_export_command_writes_each_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_cmd, "JobsClient", FakeJobsClient)
    monkeypatch.setenv("BPO_STATE_DIR", str(tmp_path / "state"))
    runner = CliRunner()
    to_stdout = runner.invoke(jobs_cmd.app, ["export", "job-1"])
    assert to_stdout.exit_code == 0, to_stdout.output
    assert [json.loads(line)["source_id"] for line in to_stdout.stdout.splitlines()] == ["request-7", "request-8"]
    out = tmp_path / "batch_output.jsonl.gz"
    to_file = runner.invoke(jobs_cmd.app, ["export", "job-1", "--format", "openai-batch", "--out", str(out)])
    assert to_file.exit_code == 0, to_file.output
    assert json.loads(to_file.stdout) == {"output": str(out), "items": 2}
    lines = [json.loads(line) for line in gzip.decompress(out.read_bytes()).decode().splitlines()]
    assert [(line["custom_id"], line["error"]) for line in lines] == [
        ("request-7", None),
        ("request-8", {"code": "item_failed", "message": "generate stage: boom"}),
    ]
    assert FakeJobsClient.exported == ["job-1", "job-1"]
    refused = runner.invoke(jobs_cmd.app, ["export", "job-1", "--format", "csv"])
    assert refused.exit_code != 0
