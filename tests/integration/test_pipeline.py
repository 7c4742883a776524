"""The whole platform with every part real: Postgres, the Kafka-compatible broker, Redis and Celery workers,
gRPC on loopback, and packaged model weights generating real text (SmolLM2 everywhere, to keep it fast).

One platform (``bpo up``) serves every test here; each test submits its own job.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bpo.stack.isolated import isolated_platform_env
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc
from tests.integration.platform import (
    bpo,
    channel_to,
    jobs_stub,
    platform_logs,
    running_platform,
    shared_models_dir,
    state,
)
from tests.integration.services import fresh_database, redis_database

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "How can I improve my time management skills?",
    "What are the most effective ways to deal with stress?",
    "Explain the water cycle.",
    "Write a haiku about autumn.",
    "What is the capital of France?",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Describe a healthy breakfast.",
    "How do vaccines work?",
    "Name two benefits of regular exercise.",
    "What is photosynthesis?",
    "Suggest a name for a pet cat.",
    "How do I boil an egg?",
    "What causes earthquakes?",
    "Summarize the plot of Romeo and Juliet.",
    "What is 12 times 12?",
    "List three renewable energy sources.",
    "How do airplanes stay in the air?",
    "What does a CPU do?",
    "Tell me a fun fact about octopuses.",
]


@pytest.fixture(scope="module")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh database on the session's Postgres: the platform is pointed at it (the configured-URL path)."""
    with fresh_database(postgres_admin_url, "bpo_test") as url:
        yield url


@pytest.fixture(scope="module")
def stack_env(database_url: str, redis_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    state_dir = tmp_path_factory.mktemp("stack")
    models = shared_models_dir()
    env = isolated_platform_env(
        state_dir,
        models,
        model=MODEL,
        database_url=database_url,
        extra={
            "BPO_PLATFORM__STAGE_BATCH_SIZE": "4",
            "BPO_OPTIMIZER__MAX_NEW_TOKENS": "96",
            "BPO_OPTIMIZER__BATCH_SIZE": "4",
            "BPO_ENGINE__THREADS": "1",
            # Short enough that a killed worker's task comes back within the test; longer than any task here.
            "BPO_WORKER_VISIBILITY_TIMEOUT_S": "60",
            "BPO_WORKER_TASK_TIME_LIMIT_S": "25",
            "BPO_WORKER_RETRY_BACKOFF_MAX_S": "5",
            "BPO_WORKER_UNACKED_RESTORE_INTERVAL_S": "5",
        },
    )
    env["BPO_PLATFORM__REDIS_URL"] = redis_database(redis_server_url, 13)
    return env


@pytest.fixture(scope="module")
def stack(stack_env: dict[str, str]) -> Iterator[dict[str, str]]:
    with running_platform(stack_env) as env:
        yield env


def jobs(env: dict[str, str]) -> pb_grpc.JobsServiceStub:
    return jobs_stub(env)


def write_corpus(path: Path, prompts: list[str], *, bad_lines: bool = False) -> Path:
    lines = [json.dumps({"id": f"p{i}", "prompt": p, "category": "even" if i % 2 == 0 else "odd"})
             for i, p in enumerate(prompts)]  # fmt: skip
    if bad_lines:
        lines.insert(3, "{this is not json")
        lines.insert(7, json.dumps({"id": "empty", "prompt": "   "}))
        # Valid JSON and a real prompt, but longer than the optimizer's context: it fails in the rewrite stage.
        lines.insert(
            11, json.dumps({"id": "huge", "prompt": "Please rewrite this sentence formally. " * 900, "category": "odd"})
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def submit(env: dict[str, str], corpus: Path, *extra: str) -> str:
    result = bpo(env, "submit", str(corpus), "--target-max-tokens", "40", "--judge-max-tokens", "48", "--seed", "3",
                 *extra)  # fmt: skip
    assert result.returncode == 0, result.stderr + platform_logs(env)
    return result.stdout.strip().splitlines()[-1]


def wait_done(env: dict[str, str], job_id: str, timeout_s: float = 900) -> pb.Job:
    deadline = time.monotonic() + timeout_s
    stub = jobs(env)
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id)).job
        if job.state != pb.JOB_STATE_RUNNING:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} not done in {timeout_s}s\n{platform_logs(env)}")


def verdict_rows(env: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    export = bpo(env, "jobs", "export", job_id)
    assert export.returncode == 0, export.stderr
    return [json.loads(line) for line in export.stdout.splitlines() if line.strip()]


def assert_exactly_once(env: dict[str, str], job_id: str, expected: int) -> list[dict[str, Any]]:
    rows = verdict_rows(env, job_id)
    assert len(rows) == expected
    assert len({r["item_id"] for r in rows}) == expected
    done = [r for r in rows if r["status"] == "done"]
    assert len(done) == expected, [r.get("error") for r in rows if r["status"] != "done"]
    assert all(r["verdict"] and r["winner"] in ("optimized", "original", "tie") for r in done)
    assert all(r["answers"]["original_answer"] for r in done)
    return rows


def test_servers_have_health_and_reflection(stack: dict[str, str]) -> None:
    for name, address in state(stack)["addresses"].items():
        with grpc.insecure_channel(address) as channel:
            health_stub: Any = health_pb2_grpc.HealthStub(channel)
            health = health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING, name
            reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            services = {s.name for reply in replies for s in reply.list_services_response.service}
            assert "grpc.health.v1.Health" in services


def test_optimize_over_grpc_and_error_codes(stack: dict[str, str]) -> None:
    with channel_to(stack, "rewriter") as channel:
        stub = pb_grpc.OptimizerServiceStub(channel)
        reply = stub.Optimize(pb.OptimizeRequest(prompt="Tell me about the moon."), timeout=300)
        assert reply.rewrite.optimized and reply.rewrite.model == MODEL
        again = stub.Optimize(pb.OptimizeRequest(prompt="Tell me about the moon."), timeout=60)
        assert again.rewrite.cache_hit and again.rewrite.optimized == reply.rewrite.optimized
        with pytest.raises(grpc.RpcError) as empty:
            stub.Optimize(pb.OptimizeRequest(prompt="  "), timeout=30)
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "empty" in (empty.value.details() or "")
        batch = list(stub.OptimizeBatch(iter([pb.OptimizeBatchRequest(request_id=str(i), prompt=p)
                                              for i, p in enumerate([*PROMPTS[:3], "  "])]), timeout=300))  # fmt: skip
        assert sorted(r.request_id for r in batch) == ["0", "1", "2", "3"]
        assert [r.error_code for r in batch if r.request_id == "3"] == ["INVALID_ARGUMENT"]
    with channel_to(stack, "jobs") as channel:
        with pytest.raises(grpc.RpcError) as missing:
            pb_grpc.JobsServiceStub(channel).GetJob(pb.GetJobRequest(job_id=str(uuid.uuid4())), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_twenty_prompts_through_every_stage(stack: dict[str, str], tmp_path: Path) -> None:
    job_id = submit(stack, write_corpus(tmp_path / "c.jsonl", PROMPTS, bad_lines=True))
    job = wait_done(stack, job_id)
    # Bad corpus lines and an over-long prompt failed with their reasons; every other item finished.
    assert job.state == pb.JOB_STATE_PARTIALLY_FAILED
    rows = verdict_rows(stack, job_id)
    good = [r for r in rows if r["status"] == "done"]
    assert len(good) == 20 and len({r["item_id"] for r in good}) == 20
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["source_id"] for r in failed] == ["huge"]
    assert failed[0]["failed_stage"] == "rewrite" and "context holds" in failed[0]["error"]
    report_run = bpo(stack, "jobs", "report", job_id, "--json")
    assert report_run.returncode == 0, report_run.stderr
    report = json.loads(report_run.stdout)
    assert int(report["judged"]) == 20
    assert int(report["wins"]) + int(report["ties"]) + int(report["losses"]) == 20
    assert {c["category"] for c in report["categories"]} == {"even", "odd"}
    reasons = {f["reason"] for f in report["failures"]}
    assert any("invalid JSON" in r for r in reasons)
    assert any("empty" in r for r in reasons)
    assert any("context holds" in r for r in reasons)
    assert {t["role"] for t in report["tokens"]} == {"rewrite", "target", "judge"}
    text = bpo(stack, "jobs", "report", job_id)
    assert "ΔWR" in text.stdout


EVAL_PROMPTS = [
    ("Explain the water cycle.", "science"),
    ("Write a haiku about autumn.", "writing"),
    ("Give me three tips for learning a new language.", "advice"),
    ("Why is the sky blue?", "science"),
    ("Describe a healthy breakfast.", "advice"),
    ("Suggest a name for a pet cat.", "writing"),
]


def test_eval_through_the_platform_writes_a_complete_report(stack: dict[str, str], tmp_path: Path) -> None:
    corpus = tmp_path / "six.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": f"e{i}", "prompt": p, "category": c}) + "\n" for i, (p, c) in enumerate(EVAL_PROMPTS))
    )
    out = tmp_path / "report"
    args = ["eval", "--set", str(corpus), "--rounds", "2", "--ablation", "no-feedback", "--ablation-model", MODEL,
            "--optimizer", MODEL, "--target", MODEL, "--judge", MODEL, "--target-max-tokens", "40",
            "--judge-max-tokens", "48", "--bootstrap", "200", "--out", str(out)]  # fmt: skip
    result = bpo(stack, *args)
    assert result.returncode == 0, result.stderr + platform_logs(stack)
    assert "| six |" in result.stdout  # the summary table is printed

    report = json.loads((out / "report.json").read_text())
    comparisons = report["comparisons"]
    assert [(c["variant"], c["rounds"]) for c in comparisons] == [
        ("bpo", 1), ("bpo", 2), ("no-feedback", 1), ("no-feedback", 2)
    ]  # fmt: skip
    for comparison in comparisons:
        summary = comparison["summary"]
        assert summary["n"] == 6 and comparison["failed"] == 0
        assert summary["wins"] + summary["ties"] + summary["losses"] == 6
        low, high = summary["delta_wr_ci"]
        assert -1.0 <= low <= summary["delta_wr"] <= high <= 1.0
        assert {c["category"] for c in comparison["categories"]} == {"science", "writing", "advice"}
        assert len(comparison["items"]) == 6
        assert all(item["optimized_prompt"] for item in comparison["items"])
    assert report["rounds"]  # ΔWR per round for each variant
    for name in ("report.md", "win_tie_lose.png", "delta_wr_by_round.png", "length_strata.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "win_tie_lose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Every judged pair is stored with the judge's reasoning, in both orders unless the answers were identical.
    plan = json.loads((out / "plan.json").read_text())
    for row in verdict_rows(stack, plan["jobs"][0]["job"]["job_id"]):
        verdict = row["verdict"]
        assert verdict["judge_template"] == "pair-v2"
        if verdict.get("identical_answers"):
            assert not verdict.get("judgements")
        else:
            assert [j.get("optimized_first", False) for j in verdict["judgements"]] == [True, False]
            assert all(j["reasoning"] for j in verdict["judgements"])

    # Running it again with the same folder reuses the finished jobs instead of submitting new ones.
    again = bpo(stack, *args)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "plan.json").read_text()) == plan


def test_augment_writes_alpaca_records(stack: dict[str, str], tmp_path: Path) -> None:
    dataset = tmp_path / "alpaca.json"
    dataset.write_text(json.dumps([
        {"instruction": "Summarize the text in one sentence.", "input": "Cats sleep a lot. They nap in the sun.",
         "output": "old"},
        {"instruction": "Name a primary colour.", "input": "", "output": "old"},
        {"instruction": "", "input": "", "output": "no instruction: rejected with its reason"},
    ]))  # fmt: skip
    out = tmp_path / "augmented.jsonl"
    args = ["augment", str(dataset), "--model", MODEL, "--max-tokens", "32", "--out", str(out)]
    # One record of three has no instruction: that fails it, so the job is only partly done.
    strict = bpo(stack, *args)
    assert strict.returncode == 1, strict.stderr + platform_logs(stack)
    assert "partially failed: 1 of 3 items failed (33.3%, allowed 0.0%)" in strict.stderr
    result = bpo(stack, *args, "--max-failure-rate", "0.34")
    assert result.returncode == 0, result.stderr + platform_logs(stack)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"output": str(out), "written": 2, "failed": 1}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in records] == ["Summarize the text in one sentence.", "Name a primary colour."]
    assert records[0]["input"] == "Cats sleep a lot. They nap in the sun."
    assert all(r["output"] and r["optimized_instruction"] and r["original_output"] for r in records)


def _kill_when_busy(env: dict[str, str], process_name: str, job_id: str, stage_column: str, at_least: int) -> None:
    """SIGKILL one platform process (its whole group) once the job is under way in the stage before it."""
    deadline = time.monotonic() + 600
    stub = jobs(env)
    while time.monotonic() < deadline:
        progress = stub.GetJob(pb.GetJobRequest(job_id=job_id)).job.progress
        done = {pb.Stage.Name(s.stage): s.done for s in progress.stages}
        if done.get(stage_column, 0) >= at_least:
            break
        time.sleep(0.3)
    pid = state(env)["pids"][process_name]
    os.killpg(pid, signal.SIGKILL)


def test_killed_celery_worker_loses_and_duplicates_nothing(stack: dict[str, str], tmp_path: Path) -> None:
    prompts = [f"{p} (variant {i})" for i, p in enumerate(PROMPTS)]
    job_id = submit(stack, write_corpus(tmp_path / "c.jsonl", prompts))
    _kill_when_busy(stack, "worker-0", job_id, "STAGE_REWRITE", 2)
    assert wait_done(stack, job_id).state == pb.JOB_STATE_SUCCEEDED
    assert_exactly_once(stack, job_id, 20)
    assert state(stack)["restarts"].get("worker-0", 0) >= 1


def test_killed_stage_consumer_loses_and_duplicates_nothing(stack: dict[str, str], tmp_path: Path) -> None:
    prompts = [f"{p} Please answer briefly ({i})." for i, p in enumerate(PROMPTS)]
    job_id = submit(stack, write_corpus(tmp_path / "c.jsonl", prompts))
    _kill_when_busy(stack, "generator", job_id, "STAGE_GENERATE", 3)
    assert wait_done(stack, job_id).state == pb.JOB_STATE_SUCCEEDED
    assert_exactly_once(stack, job_id, 20)
    assert state(stack)["restarts"].get("generator", 0) >= 1


def test_job_survives_down_and_up(stack: dict[str, str], tmp_path: Path) -> None:
    prompts = [f"In one sentence: {p}" for p in PROMPTS[:8]]
    job_id = submit(stack, write_corpus(tmp_path / "c.jsonl", prompts), "--stages", "rewrite,generate")
    down = bpo(stack, "down")
    assert down.returncode == 0, down.stderr
    up = bpo(stack, "up")
    assert up.returncode == 0, up.stderr + platform_logs(stack)
    job = wait_done(stack, job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED
    rows = verdict_rows(stack, job_id)
    assert len(rows) == 8 and all(r["status"] == "done" and r["answers"] and not r["verdict"] for r in rows)
