"""Fault injection against a running platform: every item accounted for exactly once, whatever breaks.

One platform for the module, all embedded (Postgres, the Kafka-compatible broker, Redis, started by ``bpo up``),
with the optimizer, targets and judges on a real OpenAI-compatible HTTP endpoint (the stub in ``bpo.testing``,
instant unless a test slows a route down) so that faults, not models, decide the timing. Each test submits its
own job, breaks something while the job runs, and ends with every item either done or failed with a reason,
none missing and none twice (``account``). The tally of faults, items, losses and duplicates is written to
``$BPO_FAULT_TALLY`` when set.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer  # type: ignore[import-untyped]

from bpo.stack.isolated import isolated_platform_env
from bpo.testing.openai_stub import OpenAIStub
from bpo.v1 import bpo_pb2 as pb
from tests.integration.platform import bpo, jobs_stub, platform_logs, running_platform, shared_models_dir, state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

OPTIMIZER = "stub-optimizer"
FINISHED = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_PARTIALLY_FAILED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


@dataclass
class Tally:
    faults: list[str] = field(default_factory=list)
    items: int = 0
    lost: int = 0
    duplicated: int = 0
    failed: int = 0


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    counts = Tally()
    yield counts
    summary = {
        "faults_injected": len(counts.faults),
        "faults": counts.faults,
        "items_submitted": counts.items,
        "items_lost": counts.lost,
        "items_duplicated": counts.duplicated,
        "items_failed": counts.failed,
    }
    print("\nfault-injection tally:", json.dumps(summary))
    if target := os.environ.get("BPO_FAULT_TALLY"):
        Path(target).write_text(json.dumps(summary, indent=2))


# The stub's routes that jobs use as endpoints, with their role.
STUB_ROUTES = {"target": "target", "judge": "judge", "flaky": "target", "strict": "target", "stuck": "target"}


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as server:
        yield server


@pytest.fixture(scope="module")
def platform(stub: OpenAIStub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    env = isolated_platform_env(
        tmp_path_factory.mktemp("faults"),
        shared_models_dir(),
        model=OPTIMIZER,
        extra={
            "BPO_ENGINE__NAME": "openai",
            "BPO_ENGINE__OPENAI_BASE_URL": stub.url("optimizer"),
            # Fast failure detection, generous recovery: short timeouts and attempts per call, many item retries.
            "BPO_ENGINE__MAX_ATTEMPTS": "2",
            "BPO_ENGINE__RETRY_BASE_DELAY_S": "0.2",
            "BPO_ENGINE__RETRY_MAX_DELAY_S": "0.5",
            "BPO_ENGINE__REQUEST_TIMEOUT_S": "5",
            "BPO_PLATFORM__STAGE_BATCH_SIZE": "4",
            "BPO_PLATFORM__STAGE_BATCH_DEADLINE_S": "8",
            "BPO_PLATFORM__WORKER_TIMEOUT_S": "30",
            "BPO_PLATFORM__ITEM_RETRY_BASE_S": "1",
            "BPO_PLATFORM__ITEM_RETRY_MAX_S": "4",
            "BPO_PLATFORM__ITEM_MAX_ATTEMPTS": "60",
            "BPO_PLATFORM__SWEEP_INTERVAL_S": "2",
            "BPO_PLATFORM__SWEEP_IDLE_S": "20",
            "BPO_PLATFORM__SUBMISSION_TIMEOUT_S": "10",
            "BPO_WORKER_VISIBILITY_TIMEOUT_S": "40",
            "BPO_WORKER_TASK_TIME_LIMIT_S": "15",
            "BPO_WORKER_RETRY_BACKOFF_MAX_S": "2",
            "BPO_WORKER_UNACKED_RESTORE_INTERVAL_S": "5",
            "BPO_WORKER_SOFT_SHUTDOWN_S": "5",
            # Each stub route is an endpoint the operator declared; jobs name them.
            "BPO_ENDPOINTS": json.dumps({
                route: {"engine": "openai", "url": stub.url(route), "model": f"stub-{role}", "roles": [role]}
                for route, role in STUB_ROUTES.items()
            }),
            "BPO_PLATFORM__TARGET_MODEL": "target",
            "BPO_PLATFORM__JUDGE_MODEL": "judge",
        },
    )  # fmt: skip
    with running_platform(env) as running:
        yield running


# -- helpers ------------------------------------------------------------------------------------------------


def corpus(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def prompts_for(name: str, count: int) -> list[str]:
    return [f"[{name}] Explain topic number {i} to a curious student, with one example." for i in range(count)]


def submit(
    env: dict[str, str], stub: OpenAIStub, path: Path, *, target: str = "target", judge: str = "judge", **_: Any
) -> str:
    result = bpo(
        env, "submit", str(path), "--seed", "1",
        "--target", target, "--judge", judge,
        "--max-failure-rate", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr + platform_logs(env)
    return result.stdout.strip().splitlines()[0]


def job(env: dict[str, str], job_id: str) -> pb.Job:
    return jobs_stub(env).GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).job


def eventually(condition: Callable[[], bool], timeout_s: float, what: str, env: dict[str, str]) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except Exception:  # a service restarting answers nothing for a moment
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g}s: {what}\n{platform_logs(env)}")
        time.sleep(0.5)


def wait_finished(env: dict[str, str], job_id: str, timeout_s: float = 180) -> pb.Job:
    eventually(lambda: job(env, job_id).state in FINISHED, timeout_s, f"job {job_id} to finish", env)
    return job(env, job_id)


def stage_done(env: dict[str, str], job_id: str, stage: pb.Stage.ValueType) -> int:
    return next((s.done for s in job(env, job_id).progress.stages if s.stage == stage), 0)


def account(env: dict[str, str], job_id: str, submitted: int, tally: Tally, *, may_fail: bool = False) -> None:
    """Every submitted item once: done (with a verdict) or failed with a reason; none missing, none twice."""
    export = bpo(env, "jobs", "export", job_id)
    assert export.returncode == 0, export.stderr
    rows = [json.loads(line) for line in export.stdout.splitlines() if line.strip()]
    ids = [row["item_id"] for row in rows]
    tally.items += submitted
    tally.lost += max(0, submitted - len(set(ids)))
    tally.duplicated += len(ids) - len(set(ids))
    assert len(rows) == submitted and len(set(ids)) == submitted, (len(rows), submitted)
    for row in rows:
        if row["status"] == "failed":
            tally.failed += 1
            assert may_fail, f"item {row['source_id']} failed: {row['error']}"
            assert row["error"], row
        else:
            assert row["status"] == "done" and row["verdict"] and row["winner"], row


def kill_group(env: dict[str, str], name: str) -> None:
    os.killpg(state(env)["pids"][name], signal.SIGKILL)


def restarted(env: dict[str, str], name: str, before: int) -> bool:
    current = state(env)
    return int(current["restarts"].get(name, 0)) > before and current["components"][name]["status"] == "running"


def restarts(env: dict[str, str], name: str) -> int:
    return int(state(env)["restarts"].get(name, 0))


# -- processes killed mid-batch -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("process", "slow_route", "stage"),
    [
        ("rewriter", "optimizer", pb.STAGE_REWRITE),
        ("generator", "target", pb.STAGE_GENERATE),
        ("judge", "judge", pb.STAGE_JUDGE),
        ("jobs", "target", pb.STAGE_GENERATE),
        ("worker-0", "optimizer", pb.STAGE_REWRITE),
    ],
)
def test_a_process_killed_mid_batch_loses_and_duplicates_nothing(
    platform: dict[str, str], stub: OpenAIStub, tally: Tally, tmp_path: Path, process: str, slow_route: str,
    stage: pb.Stage.ValueType,
) -> None:  # fmt: skip
    stub.route(slow_route).latency_s = 0.4
    try:
        count = 16
        job_id = submit(platform, stub, corpus(tmp_path / "c.jsonl", prompts_for(process, count)))
        eventually(lambda: stage_done(platform, job_id, stage) >= 2, 120, f"{process}'s stage under way", platform)
        for _ in range(2 if process in ("generator", "judge") else 1):
            # Killed twice where it is cheap: every death is restarted, not only the first.
            before = restarts(platform, process)
            kill_group(platform, process)
            tally.faults.append(f"SIGKILL {process} mid-batch")
            eventually(functools.partial(restarted, platform, process, before), 90, f"{process} restarted", platform)
    finally:
        stub.route(slow_route).latency_s = 0.0
    assert wait_finished(platform, job_id, 240).state == pb.JOB_STATE_SUCCEEDED
    account(platform, job_id, count, tally)


# -- dependencies restarting --------------------------------------------------------------------------------


@pytest.mark.parametrize("dependency", ["kafka", "postgres", "redis"])
def test_a_dependency_restarted_mid_job_loses_nothing(
    platform: dict[str, str], stub: OpenAIStub, tally: Tally, tmp_path: Path, dependency: str
) -> None:
    stub.route("target").latency_s = 0.3
    try:
        count = 16
        job_id = submit(platform, stub, corpus(tmp_path / "c.jsonl", prompts_for(dependency, count)))
        eventually(lambda: stage_done(platform, job_id, pb.STAGE_GENERATE) >= 2, 120, "generation under way", platform)
        before = restarts(platform, dependency)
        kill_group(platform, dependency)
        tally.faults.append(f"restart of {dependency} mid-job (SIGKILL, restarted by the supervisor)")
        eventually(lambda: restarted(platform, dependency, before), 90, f"{dependency} restarted", platform)
    finally:
        stub.route("target").latency_s = 0.0
    # The embedded broker comes back empty: the sweep re-publishes what it lost once it is idle long enough.
    assert wait_finished(platform, job_id, 300).state == pb.JOB_STATE_SUCCEEDED
    account(platform, job_id, count, tally)

    def all_serving() -> bool:
        status = bpo(platform, "status", "--json")
        return status.returncode == 0 and all(json.loads(status.stdout)["services"].values())

    # Health follows dependencies on a 5 s check: a service whose check ran while the dependency was still
    # coming back says NOT_SERVING until its next check.
    eventually(all_serving, 30, "every service SERVING again", platform)


# -- endpoints that fail or hang ----------------------------------------------------------------------------


def test_an_endpoint_failing_for_twenty_seconds_fails_no_item(
    platform: dict[str, str], stub: OpenAIStub, tally: Tally, tmp_path: Path
) -> None:
    stub.route("flaky").fail_for(20, 503)
    tally.faults.append("target endpoint answering 503 for 20 s")
    count = 12
    started = time.monotonic()
    job_id = submit(platform, stub, corpus(tmp_path / "c.jsonl", prompts_for("flaky", count)), target="flaky")
    assert wait_finished(platform, job_id, 240).state == pb.JOB_STATE_SUCCEEDED
    assert time.monotonic() - started >= 15  # it did wait the outage out
    assert stub.calls("flaky").failed > 0
    account(platform, job_id, count, tally)


def test_a_request_the_endpoint_refuses_fails_its_item_alone(
    platform: dict[str, str], stub: OpenAIStub, tally: Tally, tmp_path: Path
) -> None:
    """One HTTP 400 in a batch fails that item with the endpoint's reason; the others' answers stand, and no
    paid call is made twice."""
    stub.route("strict").refuse_containing = "REFUSE-ME"
    tally.faults.append("target endpoint refusing one request (HTTP 400)")
    prompts = [*prompts_for("strict", 7), "[strict] REFUSE-ME: explain something"]
    job_id = submit(platform, stub, corpus(tmp_path / "c.jsonl", prompts), target="strict")
    assert wait_finished(platform, job_id, 120).state == pb.JOB_STATE_PARTIALLY_FAILED
    account(platform, job_id, 8, tally, may_fail=True)
    report = json.loads(bpo(platform, "jobs", "report", job_id, "--json").stdout)
    (failure,) = report["failures"]
    assert failure["stage"] == "STAGE_GENERATE" and "endpoint rejected the request" in failure["reason"]
    # Seven items answered twice each (original and rewrite), and the refused one tried once per attempt.
    assert stub.calls("strict").requests - stub.calls("strict").failed == 14


def test_a_hanging_endpoint_stalls_only_its_own_job(
    platform: dict[str, str], stub: OpenAIStub, tally: Tally, tmp_path: Path
) -> None:
    stub.hang("stuck")
    tally.faults.append("target endpoint hanging")
    try:
        stuck = submit(platform, stub, corpus(tmp_path / "a.jsonl", prompts_for("stuck", 8)), target="stuck")
        healthy = submit(platform, stub, corpus(tmp_path / "b.jsonl", prompts_for("healthy", 8)))
        # The other job goes through while the hung endpoint's items wait, parked at each batch deadline.
        assert wait_finished(platform, healthy, 120).state == pb.JOB_STATE_SUCCEEDED
        assert job(platform, stuck).state == pb.JOB_STATE_RUNNING
    finally:
        stub.release_hangs()
    assert wait_finished(platform, stuck, 240).state == pb.JOB_STATE_SUCCEEDED
    account(platform, healthy, 8, tally)
    account(platform, stuck, 8, tally)


# -- poison and adversarial input ---------------------------------------------------------------------------


def test_poison_on_every_topic_is_dead_lettered_and_the_stages_go_on(
    platform: dict[str, str], stub: OpenAIStub, tally: Tally, tmp_path: Path
) -> None:
    prefix, bootstrap = platform["BPO_PLATFORM__TOPIC_PREFIX"], state(platform)["kafka_bootstrap"]
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    stray_job = "0b9e6a55-5a1c-4a6c-9a77-3a0f3f0c1e11"
    not_uuids = pb.PromptItem(item_id="x", job_id="y", prompt="p")
    unknown_job = pb.PromptItem(item_id=stray_job, job_id=stray_job)
    poison = {
        "prompts": [b"\xff\xfe not a protobuf", not_uuids.SerializeToString()],
        "rewrites": [b"", pb.Rewrite(item=unknown_job).SerializeToString()],
        "answers": [b"\x0a\x05garbage", pb.AnswerPair(rewrite=pb.Rewrite(item=not_uuids)).SerializeToString()],
    }
    for topic, values in poison.items():
        for value in values:
            producer.send(f"{prefix}.{topic}", value=value, key=b"poison").get(timeout=30)
    producer.close()
    tally.faults.append("poison messages on the prompts, rewrites and answers topics")
    count = 8
    job_id = submit(platform, stub, corpus(tmp_path / "c.jsonl", prompts_for("after-poison", count)))
    assert wait_finished(platform, job_id, 120).state == pb.JOB_STATE_SUCCEEDED
    account(platform, job_id, count, tally)
    consumer = KafkaConsumer(f"{prefix}.deadletter", bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000, group_id=None)  # fmt: skip
    letters = [record for record in consumer if record.key == b"poison"]
    consumer.close()
    assert len(letters) >= 6, [dict(r.headers) for r in letters]
    assert all(dict(r.headers).get("error") for r in letters)


def test_adversarial_prompts_are_accounted_for_in_bounded_time(
    platform: dict[str, str], stub: OpenAIStub, tally: Tally, tmp_path: Path
) -> None:
    unmatched_quote = 'My 27" monitor flickers. I tried:\n' + "\n".join(f"- step {i}" for i in range(8))
    lines = [
        json.dumps({"id": "quote", "prompt": unmatched_quote}),
        json.dumps({"id": "fence", "prompt": "Explain this:\n```python\n" + "x = 1\n" * 10_000}),
        json.dumps({"id": "quotes", "prompt": '"' * 100_000 + " what is this?"}),
        json.dumps({"id": "huge", "prompt": "Summarize: " + "word " * 300_000}),  # over 1 MiB
        '{"id": "surrogate", "prompt": "broken \\ud800 text"}',
        json.dumps({"id": "ok", "prompt": "What is a prime number?"}),
    ]  # fmt: skip
    path = tmp_path / "adversarial.jsonl"
    path.write_text("\n".join(lines) + "\n")
    tally.faults.append("adversarial prompts (unterminated quotes and fences, 1 MB of quotes, over-size, surrogate)")
    started = time.monotonic()
    job_id = submit(platform, stub, path)
    finished = wait_finished(platform, job_id, 120)
    assert time.monotonic() - started < 120
    assert finished.state == pb.JOB_STATE_PARTIALLY_FAILED
    report = json.loads(bpo(platform, "jobs", "report", job_id, "--json").stdout)
    reasons = " | ".join(f["reason"] for f in report["failures"])
    assert "at most 262144 are accepted" in reasons and "not valid Unicode" in reasons, reasons
    account(platform, job_id, int(report["items"]), tally, may_fail=True)


def test_an_optimizer_model_no_worker_serves_is_refused_up_front(
    platform: dict[str, str], stub: OpenAIStub, tmp_path: Path
) -> None:
    path = corpus(tmp_path / "c.jsonl", prompts_for("unserved", 2))
    result = bpo(platform, "submit", str(path), "--optimizer-model", "no-such-optimizer")
    assert result.returncode != 0
    assert "INVALID_ARGUMENT" in result.stderr and "spec.optimizer_model: 'no-such-optimizer'" in result.stderr


def test_logs_hold_no_prompt_and_the_state_directory_is_private(platform: dict[str, str]) -> None:
    """After everything above: no prompt text in any log (Celery's success lines included), no password in
    state.json, and the state directory readable by its owner only."""
    stack = Path(platform["BPO_STATE_DIR"]) / "stack"
    logs = sorted((stack / "logs").glob("*.log"))
    assert logs
    text = "\n".join(path.read_text(errors="replace") for path in logs)
    for marker in ("Explain topic number", "monitor flickers", "What is a prime number"):
        assert marker not in text, f"prompt text ({marker!r}) found in the logs"
    for path in (stack, stack / "logs"):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    for path in (stack / "state.json", stack / "connections.json", *logs):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
