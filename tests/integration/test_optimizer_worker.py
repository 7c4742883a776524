"""Real optimizer workers (``python -m services.optimizer_worker.worker``) on the machine's Redis, serving the
packaged SmolLM2 model: a batch of rewrites, a pool process killed mid-task, and the whole worker killed mid-task.

The tests use Redis database 15, flushed before and after. The visibility timeout is under a minute here so that
the whole-worker crash is recovered within the test; production keeps an hour, because a task redelivered while
it still runs would run twice, and real batches (a large model, long prompts, several rounds) take many minutes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bpo.optimizer.optimizer import OptimizeParams, PromptInput, RewriteResult
from services.optimizer_worker.app import make_celery_app, queue_for_model
from services.optimizer_worker.client import OptimizerWorkersClient
from services.optimizer_worker.settings import WorkerSettings
from services.optimizer_worker.tasks import OPTIMIZE_BATCH_TASK
from tests.integration.services import redis_database
from tests.integration.worker_process import WorkerProcess

pytestmark = pytest.mark.integration

REDIS_DB = 15
MODEL = "smollm2-135m-instruct"
QUEUE = queue_for_model(MODEL)
# The settings insist on a visibility timeout above twice the time limit plus the longest retry delay.
VISIBILITY_TIMEOUT_S = 85
# A long batch on one thread takes about 15 s here; seeded requests re-evaluate their whole prompt (the
# llama.cpp engine clears its cache for them), so the limit leaves room for a slower machine.
TASK_TIME_LIMIT_S = 40
WORKER_ENV = {
    "BPO_WORKER_MODELS": MODEL,
    "BPO_WORKER_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
    "BPO_WORKER_TASK_TIME_LIMIT_S": str(TASK_TIME_LIMIT_S),
    "BPO_WORKER_RETRY_BACKOFF_S": "1",
    "BPO_WORKER_RETRY_BACKOFF_MAX_S": "2",
    "BPO_WORKER_UNACKED_RESTORE_INTERVAL_S": "1",
    "BPO_ENGINE__NAME": "llamacpp",
    # One core for the engine, one for Redis and the test on a two-core machine.
    "BPO_ENGINE__THREADS": "1",
}
PROMPTS = [
    PromptInput("Tell me about black holes."),
    PromptInput("How can I improve my time management skills?"),
    PromptInput("Write a short poem about autumn leaves."),
    PromptInput("What are the main causes of inflation?"),
]
# Long enough to take several seconds, so that a worker can be killed while it runs the batch.
LONG_PROMPTS = [
    PromptInput(
        "I am planning a two-week trip to Japan in the spring with my partner, who is vegetarian. We like hiking, "
        "old temples and quiet places, but we also want to see Tokyo. Suggest an itinerary with cities, rough "
        "travel times between them, and food tips."
    ),
    PromptInput(
        "Our small team of five developers keeps missing sprint deadlines because work arrives mid-sprint from "
        "sales, and reviews take days. Explain what process changes we could try, how to measure whether they "
        "help, and how to convince management."
    ),
    PromptInput(
        "Write a short story for children aged six to eight about a lighthouse keeper and a lost seagull, with a "
        "gentle lesson about asking for help, in under four hundred words and with a happy ending."
    ),
    PromptInput(
        "Compare renting and buying a home for a thirty-year-old with stable income in a mid-sized city, covering "
        "monthly costs, flexibility, risks, taxes and long-term wealth, and say which factors matter most."
    ),
]
# Greedy and seeded: a redelivered batch redoes exactly the same work.
PARAMS = OptimizeParams(temperature=0.0, max_new_tokens=128, seed=0)
LONG_PARAMS = OptimizeParams(temperature=0.0, max_new_tokens=160, seed=0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def worker_process(log_path: Path, broker_url: str, metrics_port: int = 0) -> WorkerProcess:
    return WorkerProcess(
        log_path, WORKER_ENV | {"BPO_WORKER_BROKER_URL": broker_url, "BPO_WORKER_METRICS_PORT": str(metrics_port)}
    )


@pytest.fixture(scope="module")
def broker_url(redis_server_url: str) -> str:
    return redis_database(redis_server_url, REDIS_DB)


@pytest.fixture(scope="module")
def broker(broker_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(broker_url, socket_connect_timeout=1)
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def settings(broker: redis.Redis, broker_url: str) -> WorkerSettings:
    return WorkerSettings.model_validate(
        {
            "broker_url": broker_url,
            "models": [MODEL],
            "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
            "task_time_limit_s": TASK_TIME_LIMIT_S,
            "retry_backoff_max_s": 2,
            "unacked_restore_interval_s": 1,
        }
    )


@pytest.fixture(scope="module")
def app(settings: WorkerSettings) -> Any:
    return make_celery_app(settings)


@pytest.fixture(scope="module")
async def client(app: Any) -> AsyncIterator[OptimizerWorkersClient]:
    workers_client = OptimizerWorkersClient(app, timeout_s=150)
    yield workers_client
    workers_client.close()


@pytest.fixture(scope="class")
def worker(
    broker: redis.Redis, broker_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, int]]:
    """A worker shared by one class's tests, and gone before the next class: it would serve their queue too."""
    port = free_port()
    process = worker_process(tmp_path_factory.mktemp("worker") / "worker.log", broker_url, metrics_port=port)
    yield process, port
    code = process.stop()
    print(process.log()[-3000:])
    assert code == 0


async def wait_for_state(app: Any, task_id: str, state: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        meta: dict[str, Any] = await asyncio.to_thread(app.backend.get_task_meta, task_id)
        if meta["status"] == state:
            return meta
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} did not reach {state} within {timeout_s}s")


def assert_real_rewrites(outcomes: list[Any], prompts: list[PromptInput]) -> None:
    assert len(outcomes) == len(prompts)
    for outcome, item in zip(outcomes, prompts, strict=True):
        assert isinstance(outcome, RewriteResult), outcome
        assert outcome.original == item.prompt
        assert outcome.model == MODEL
        assert outcome.engine == "llamacpp"
        assert outcome.tokens_out > 0
        assert outcome.optimized.strip()


def succeeded_lines(log: str, task_id: str) -> int:
    return log.count(f"Task {OPTIMIZE_BATCH_TASK}[{task_id}] succeeded")


async def logged_success(worker: WorkerProcess, task_id: str, timeout_s: float = 30.0) -> int:
    """The pool process stores the result before it logs the success line; on a loaded machine the caller can
    read the result first, so wait for the line rather than read the log once."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = succeeded_lines(worker.log(), task_id)
        if count or time.monotonic() >= deadline:
            return count
        await asyncio.sleep(0.2)


class TestOneWorker:
    async def test_a_worker_rewrites_a_batch_and_reports_metrics(
        self, client: OptimizerWorkersClient, worker: tuple[WorkerProcess, int]
    ) -> None:
        _, port = worker
        outcomes = await client.optimize_batch(MODEL, PARAMS, PROMPTS)
        assert_real_rewrites(outcomes, PROMPTS)
        assert any(outcome.changed for outcome in outcomes if isinstance(outcome, RewriteResult))
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
        # Recorded in the pool process, served by the parent: multiprocess mode works under prefork.
        assert f'bpo_worker_tasks_total{{model="{MODEL}",outcome="success"}} 1.0' in metrics
        assert f'bpo_worker_batch_size_sum{{model="{MODEL}"}} 4.0' in metrics
        assert f'bpo_worker_items_total{{model="{MODEL}",status="OK"}} 4.0' in metrics
        assert f'bpo_worker_engine_replicas{{model="{MODEL}"}} 1.0' in metrics
        assert f'bpo_worker_tokens_total{{direction="out",model="{MODEL}"}}' in metrics

    async def test_a_task_whose_pool_process_dies_is_retried_at_once(
        self, app: Any, client: OptimizerWorkersClient, worker: tuple[WorkerProcess, int]
    ) -> None:
        process, _ = worker
        task_id = f"pool-process-killed-{uuid.uuid4()}"
        started = time.monotonic()
        pending = asyncio.create_task(client.optimize_batch(MODEL, LONG_PARAMS, LONG_PROMPTS, task_id=task_id))
        meta = await wait_for_state(app, task_id, "STARTED", timeout_s=60)
        os.kill(int(meta["result"]["pid"]), signal.SIGKILL)
        outcomes = await pending
        assert_real_rewrites(outcomes, LONG_PROMPTS)
        # Back through the parent's retry (reject_on_worker_lost's counted form), not the visibility timeout.
        assert time.monotonic() - started < VISIBILITY_TIMEOUT_S
        assert await logged_success(process, task_id) == 1
        assert "WorkerLostError" in process.log()


async def test_a_task_survives_its_whole_worker_being_killed(
    app: Any, client: OptimizerWorkersClient, broker: redis.Redis, broker_url: str, tmp_path: Path
) -> None:
    first = worker_process(tmp_path / "first.log", broker_url)
    second: WorkerProcess | None = None
    try:
        task_id = f"worker-killed-{uuid.uuid4()}"
        pending = asyncio.create_task(client.optimize_batch(MODEL, LONG_PARAMS, LONG_PROMPTS, task_id=task_id))
        started = await wait_for_state(app, task_id, "STARTED", timeout_s=90)
        assert started["result"]["hostname"].startswith(f"bpo-optimizer-{first.process.pid}@")
        first.kill_group()
        meta = await asyncio.to_thread(app.backend.get_task_meta, task_id)
        assert meta["status"] == "STARTED", "the batch finished before its worker could be killed"
        # Nobody is left to put the task back: it waits, unacknowledged, for the visibility timeout.
        assert broker.hlen("unacked") == 1
        assert broker.llen(QUEUE) == 0
        second = worker_process(tmp_path / "second.log", broker_url)
        outcomes = await pending
        assert_real_rewrites(outcomes, LONG_PROMPTS)
        assert await logged_success(second, task_id) == 1
        assert succeeded_lines(first.log(), task_id) == 0
        # Done exactly once: after a few restore sweeps there is no copy left to run again.
        await asyncio.sleep(3)
        assert broker.hlen("unacked") == 0
        assert broker.llen(QUEUE) == 0
        assert succeeded_lines(second.log(), task_id) == 1
        # The same task id again is answered from the stored result, without new work.
        again = await client.optimize_batch(MODEL, LONG_PARAMS, LONG_PROMPTS, task_id=task_id)
        assert [r.optimized for r in again if isinstance(r, RewriteResult)] == [
            r.optimized for r in outcomes if isinstance(r, RewriteResult)
        ]
        assert succeeded_lines(second.log(), task_id) == 1
    finally:
        if first.process.poll() is None:
            first.kill_group()
        if second is not None:
            assert second.stop() == 0
