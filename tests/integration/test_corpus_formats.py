"""An OpenAI Batch input file through a running platform, and its results back in the Batch output format.

One platform for the module, all embedded (Postgres, the Kafka-compatible broker, Redis, started by ``bpo up``),
with the optimizer, the target and the judge on the OpenAI-compatible stub of ``bpo.testing``, so that no model
weights are needed. The corpus is submitted and exported with the ``bpo`` command, as a user would.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bpo.corpus.chat import CONVERSATION_HEADER
from bpo.generation.answers import with_context
from bpo.stack.isolated import isolated_platform_env
from bpo.testing.openai_stub import OpenAIStub
from bpo.v1 import bpo_pb2 as pb
from tests.integration.platform import bpo, jobs_stub, platform_logs, running_platform, shared_models_dir

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

OPTIMIZER = "stub-optimizer"
ROLES = ("target", "judge")
FINISHED = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_PARTIALLY_FAILED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
# Six prompts through instant endpoints take seconds; the rest is room for a slow, shared machine.
JOB_DEADLINE_S = 240


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as server:
        yield server


@pytest.fixture(scope="module")
def platform(stub: OpenAIStub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    env = isolated_platform_env(
        tmp_path_factory.mktemp("corpus-formats"),
        shared_models_dir(),
        model=OPTIMIZER,
        extra={
            "BPO_ENGINE__NAME": "openai",
            "BPO_ENGINE__OPENAI_BASE_URL": stub.url("optimizer"),
            "BPO_ENDPOINTS": json.dumps(
                {role: {"engine": "openai", "url": stub.url(role), "model": f"stub-{role}", "roles": [role]}
                 for role in ROLES}
            ),
            "BPO_PLATFORM__TARGET_MODEL": "target",
            "BPO_PLATFORM__JUDGE_MODEL": "judge",
            # A small corpus: stages take what they have at once instead of waiting for fuller batches.
            "BPO_PLATFORM__STAGE_BATCH_SIZE": "4",
            "BPO_PLATFORM__STAGE_BATCH_DEADLINE_S": "30",
        },
    )  # fmt: skip
    with running_platform(env) as running:
        yield running


def wait_for(env: dict[str, str], job_id: str) -> int:
    """The job's final state; fails with the platform's logs if it has not finished in ``JOB_DEADLINE_S``."""
    deadline = time.monotonic() + JOB_DEADLINE_S
    while time.monotonic() < deadline:
        state: int = jobs_stub(env).GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).job.state
        if state in FINISHED:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} not finished after {JOB_DEADLINE_S} s\n{platform_logs(env)}")


def batch_request(custom_id: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": messages, "max_tokens": 200},
    }


def test_a_batch_input_file_submits_and_exports_as_batch_output(
    platform: dict[str, str], stub: OpenAIStub, tmp_path: Path
) -> None:
    requests = [
        batch_request(f"request-{n}", [{"role": "user", "content": f"Explain topic number {n} with one example."}])
        for n in range(5)
    ]
    requests.append(
        batch_request(
            "with-history",
            [
                {"role": "system", "content": "You are a patient teacher."},
                {"role": "user", "content": "What is a prime number?"},
                {"role": "assistant", "content": "A number with exactly two divisors."},
                {"role": "user", "content": "Give three examples and say why each one qualifies."},
            ],
        )
    )
    lines = [json.dumps(request) for request in requests]
    lines.insert(3, '{"custom_id": "broken", "body": ')  # a malformed line fails alone
    corpus = tmp_path / "batch_input.jsonl.gz"
    corpus.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))

    submitted = bpo(platform, "submit", str(corpus))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr + platform_logs(platform)
    job_id = submitted.stdout.strip()
    assert "accepted 6, rejected 1" in submitted.stderr
    assert "line 4: invalid JSON" in submitted.stderr
    assert wait_for(platform, job_id) == pb.JOB_STATE_PARTIALLY_FAILED  # the rejected line is the job's failure

    batch_out = tmp_path / "batch_output.jsonl.gz"
    exported = bpo(platform, "jobs", "export", job_id, "--format", "openai-batch", "--out", str(batch_out))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert json.loads(exported.stdout) == {"output": str(batch_out), "items": 6}
    batch_lines = [json.loads(line) for line in gzip.decompress(batch_out.read_bytes()).decode().splitlines()]

    as_stored = bpo(platform, "jobs", "export", job_id)
    assert as_stored.returncode == 0, as_stored.stderr
    items = {item["source_id"]: item for item in map(json.loads, as_stored.stdout.splitlines())}

    assert sorted(line["custom_id"] for line in batch_lines) == sorted(r["custom_id"] for r in requests)
    for line in batch_lines:
        item = items[line["custom_id"]]
        assert line["error"] is None, line
        assert line["id"] == f"batch_req_{item['item_id']}"
        response = line["response"]
        assert (response["status_code"], response["request_id"]) == (200, item["item_id"])
        body = response["body"]
        assert (body["object"], body["model"]) == ("chat.completion", "stub-target")
        # The target's answer to the optimized prompt (the stub quotes what it was asked), not to the original.
        optimized = item["rewrite"]["optimized"]
        assert optimized != item["prompt"]
        asked = with_context(optimized, item["context"])
        assert body["choices"][0]["message"] == {
            "role": "assistant",
            "content": f"Here is a short answer to: {asked[:80]}",
            "refusal": None,
        }
        assert body["usage"]["total_tokens"] > 0

    history = items["with-history"]
    assert history["prompt"] == "Give three examples and say why each one qualifies."
    assert history["context"] == (
        f"{CONVERSATION_HEADER}\n[system]\nYou are a patient teacher.\n[user]\nWhat is a prime number?\n"
        "[assistant]\nA number with exactly two divisors."
    )
    assert stub.calls("target").requests >= 6
