"""Startup ordering: nothing queries a table before the migrations created it. A process that only reads the
schema (an optimizer worker) waits for it, bounded and saying so, instead of logging missing relations."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bpo.store.db import SchemaNotReadyError, migrate_database, required_schema_version, schema_version, wait_for_schema
from tests.integration.conftest import MODEL
from tests.integration.services import fresh_database, redis_database
from tests.integration.worker_process import WorkerProcess

pytestmark = pytest.mark.integration


def eventually(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:g}s: {what}"
        time.sleep(0.2)


def test_waiting_for_the_schema_is_bounded_and_says_how_to_fix_it(postgres_admin_url: str) -> None:
    with fresh_database(postgres_admin_url, "bpo_schema") as url:
        assert schema_version(url) == 0
        started = time.monotonic()
        with pytest.raises(SchemaNotReadyError, match=r"at version 0, this code needs \d+.*run `bpo migrate`"):
            wait_for_schema(url, 1.0, interval_s=0.2)
        assert time.monotonic() - started < 10
        migrate_database(url)
        assert wait_for_schema(url, 1.0) == required_schema_version() == schema_version(url)


def worker_env(database_url: str, broker_url: str, wait_s: int) -> dict[str, str]:
    return {
        "BPO_WORKER_BROKER_URL": broker_url,
        "BPO_WORKER_MODELS": MODEL,
        "BPO_WORKER_SCHEMA_WAIT_S": str(wait_s),
        "BPO_PLATFORM__DATABASE_URL": database_url,
        "BPO_ENGINE__NAME": "llamacpp",
        "BPO_ENGINE__THREADS": "1",
    }


def test_a_worker_started_before_the_migrations_waits_for_them(
    postgres_admin_url: str, redis_server_url: str, smollm2_gguf: Path, tmp_path: Path
) -> None:
    with fresh_database(postgres_admin_url, "bpo_order") as url:
        worker = WorkerProcess(tmp_path / "worker.log", worker_env(url, redis_database(redis_server_url, 8), 120))
        try:
            eventually(lambda: "waiting up to 120s for database migrations" in worker.log(), 60, worker.log())
            time.sleep(1.5)
            assert worker.process.poll() is None and "ready." not in worker.log()
            migrate_database(url)
            eventually(lambda: "ready." in worker.log(), 120, "the worker to start after the migrations")
            log = worker.log()
            assert "does not exist" not in log and "UndefinedTable" not in log, log
        finally:
            worker.stop()


def test_a_worker_gives_up_on_a_schema_that_never_comes(
    postgres_admin_url: str, redis_server_url: str, tmp_path: Path
) -> None:
    with fresh_database(postgres_admin_url, "bpo_never") as url:
        worker = WorkerProcess(tmp_path / "worker.log", worker_env(url, redis_database(redis_server_url, 8), 2))
        try:
            assert worker.process.wait(timeout=60) == 1
        finally:
            worker.stop()
        log = worker.log()
        assert "cannot start: the database schema is at version 0" in log and "run `bpo migrate`" in log, log
        assert "does not exist" not in log, log
