"""The ``bpo`` command line against the real packaged model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bpo.settings import DEFAULT_MODEL

pytestmark = pytest.mark.integration

FAST = ["--max-new-tokens", "96", "--seed", "5"]


def bpo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bpo.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "BPO_ENGINE__THREADS": "2"},
        check=False,
    )


def test_models_list_names_the_catalogue() -> None:
    result = bpo("models", "list", "--json")
    assert result.returncode == 0, result.stderr
    names = {row["name"] for row in json.loads(result.stdout)}
    assert {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"} <= names


def test_optimize_one_prompt_as_json() -> None:
    result = bpo("optimize", "Tell me about black holes.", "--json", *FAST)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    expected = {"original", "optimized", "model", "model_version", "params", "rounds_done", "tokens_in",
                "tokens_out", "latency_s", "fallback_reason"}  # fmt: skip
    assert expected <= payload.keys()
    assert payload["original"] == "Tell me about black holes."
    assert payload["params"]["seed"] == 5


def test_empty_prompt_is_a_clear_error() -> None:
    result = bpo("optimize", "   ")
    assert result.returncode == 2
    assert "INVALID_ARGUMENT" in result.stderr and "empty" in result.stderr


def test_file_run_reports_bad_lines_and_resumes(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "\n".join(
            [
                json.dumps({"id": "a", "prompt": "Explain photosynthesis."}),
                "{not json",
                json.dumps({"id": "b", "question": 42}),
                json.dumps({"id": "c", "prompt": "List 3 uses of vinegar."}),
            ]
        )
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    first = bpo("optimize", "--in", str(corpus), "--out", str(out), "--json", *FAST)
    # Half the lines failed: the good ones are written, and the run says loudly that it did not do it all.
    assert first.returncode == 1, first.stderr
    assert "2 of 4 prompts failed (50.0%, allowed 0.0%)" in first.stderr
    assert "line 2: invalid JSON" in first.stderr
    assert "line 3: field 'question' is int, expected a string" in first.stderr
    report = json.loads(first.stdout)
    assert report["optimized"] == 2 and report["failed"] == 2
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", "c"]
    assert all(line["model"] == DEFAULT_MODEL for line in lines)

    # A re-run repays nothing already done: the two good lines are skipped, only bad ones are retried.
    second = bpo("optimize", "--in", str(corpus), "--out", str(out), "--json", "--max-failure-rate", "0.5", *FAST)
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert report["optimized"] == 0 and report["skipped_already_done"] == 2 and report["failed"] == 2
    assert len(out.read_text().splitlines()) == 2


def test_shipped_test_set_with_field_and_context(tmp_path: Path) -> None:
    out = tmp_path / "dolly.jsonl"
    result = bpo("optimize", "--dataset", "dolly", "--limit", "2", "--out", str(out), *FAST)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0]["context"] and lines[0]["category"]
