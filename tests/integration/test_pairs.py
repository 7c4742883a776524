"""Pair construction for real: the machine's Postgres (a throwaway database), the packaged SmolLM2 model through
llama.cpp, in this process and on a real Celery worker, and the BPO authors' published construction records.

Answers are capped at a few dozen tokens: SmolLM2-135M rarely writes the paper's format at any length, and these
tests are about every record getting a stored decision, once, not about the pairs' quality.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bpo.cli.main import app as cli
from bpo.engines.base import EngineClient
from bpo.pairs.build import BuildConfig, build_pairs
from bpo.pairs.construct import BPO_AUTHORS_MODEL, prompt_version
from bpo.pairs.filters import KEPT, PREFILTER_DECISIONS
from bpo.pairs.generation import EngineGenerator
from bpo.pairs.importers import read_records
from bpo.pairs.records import PreferenceRecord
from bpo.store.db import migrate, open_pool
from bpo.store.pairs import PairsStore
from bpo.store.repository import Pool
from tests.integration.conftest import MODEL
from tests.integration.services import fresh_database, redis_database

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
# The licence-clean part of the BPO authors' records, and HH-RLHF's own format (see each folder's README).
BPO_VAL = REPO_ROOT / "tests" / "data" / "bpo" / "val_oasst1_hh_rlhf.json"
HH_TEST = REPO_ROOT / "tests" / "data" / "hh_rlhf" / "harmless_base_test_single_turn.jsonl"
# Short answers keep five CPU generations within seconds; the length filter then judges what came out.
MAX_NEW_TOKENS = 24
KNOWN_DECISIONS = {KEPT, *PREFILTER_DECISIONS} | {
    "dropped:no_marker",
    "dropped:length_ratio",
    "dropped:protected",
    "dropped:prompt_too_long",
}


@pytest.fixture(scope="module")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    with fresh_database(postgres_admin_url, "bpo_pairs") as url:
        yield url


@pytest.fixture(scope="module")
def pool(database_url: str) -> Iterator[Pool]:
    opened = open_pool(database_url, max_size=4)
    migrate(opened)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def store(pool: Pool) -> PairsStore:
    return PairsStore(pool)


def run_cli(database_url: str, *args: str, **env: str) -> Any:
    result = CliRunner().invoke(cli, list(args), env={"BPO_PLATFORM__DATABASE_URL": database_url, **env})
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def hh_subset(path: Path, count: int) -> Path:
    """The first ``count`` single-turn records of the HH-RLHF harmless-base test split, in its own format."""
    lines = []
    with HH_TEST.open(encoding="utf-8") as source:
        for line in source:
            if json.loads(line)["chosen"].count("\n\nAssistant:") == 1:
                lines.append(line)
                if len(lines) == count:
                    break
    path.write_text("".join(lines), encoding="utf-8")
    return path


def decisions(store: PairsStore, dataset: str, model: str) -> dict[str, str | None]:
    rows = store.records_with_decisions(dataset, model, prompt_version())
    return {record.record_id: decision for record, decision in rows}


def test_import_bpo_val_and_its_published_pairs(database_url: str, store: PairsStore) -> None:
    run_cli(database_url, "pairs", "import", str(BPO_VAL), "--format", "bpo", "--dataset", "bpo-val")
    again = run_cli(database_url, "pairs", "import", str(BPO_VAL), "--format", "bpo", "--dataset", "bpo-val")
    assert "103 records (0 new, 103 already there)" in again.output
    assert "decided now 0" in again.output

    stats = json.loads(run_cli(database_url, "pairs", "stats", "--dataset", "bpo-val", "--json").stdout)
    by_source = {row["source"]: row["records"] for row in stats["records"]}
    assert by_source == {"bpo/oasst1": 63, "bpo/hh-rlhf": 40}
    licences = {row["source"]: row["licence"] for row in stats["records"]}
    assert licences == {"bpo/oasst1": "Apache-2.0", "bpo/hh-rlhf": "MIT"}, licences
    (construction,) = stats["constructions"]
    assert construction["constructor_model"] == BPO_AUTHORS_MODEL
    assert construction["decided"] == 103
    assert sum(construction["decisions"].values()) == 103
    # The published pairs mostly pass the paper's own filters; those that do not are counted, not hidden.
    assert 80 < construction["kept"] < 103
    assert construction["decisions"]["dropped:length_ratio"] > 0
    for side in ("x_user", "x_opt"):
        assert (
            0
            < construction["distinct_of_kept"][side]["distinct_1"]
            < construction["distinct_of_kept"][side]["distinct_2"]
            <= 1
        )

    kept = store.kept_pairs(["bpo-val"])
    assert len(kept) == construction["kept"]
    assert kept == store.kept_pairs(["bpo-val"], constructor_model=BPO_AUTHORS_MODEL)
    assert [p.pair_id for p in kept] == sorted(p.pair_id for p in kept)
    records = {r.record_id: r for r, _ in store.records_with_decisions("bpo-val", BPO_AUTHORS_MODEL, prompt_version())}
    # (Only the Alpaca-GPT4 records carry a context; the context layouts are tested in tests/unit/test_pairs_*.)
    for pair in kept:
        # Kept published pairs are the authors' own text, context joins included.
        extra = records[pair.record_id].extra
        assert (pair.x_user, pair.x_opt) == (extra["final_input"], extra["final_output"])
    text = run_cli(database_url, "pairs", "stats").output
    assert "constructed by gpt-3.5-turbo (BPO authors)" in text and "distinct-1 / distinct-2" in text


async def test_construct_pairs_with_smollm2_in_process(
    store: PairsStore, llamacpp_engine: EngineClient, tmp_path: Path
) -> None:
    path = hh_subset(tmp_path / "hh5.jsonl", 5)
    records = [item for item in read_records(path, "hh-rlhf", "hh5") if isinstance(item, PreferenceRecord)]
    assert len(records) == 5
    assert store.add_records(records) == 5
    generator = EngineGenerator(llamacpp_engine, MODEL)
    config = BuildConfig(max_new_tokens=MAX_NEW_TOKENS, seed=0)
    calls = llamacpp_engine.usage.calls
    report = await build_pairs(store, "hh5", generator, config)
    assert report.decided == 5 and report.failed == 0
    stored = decisions(store, "hh5", MODEL)
    assert len(stored) == 5 and all(decision in KNOWN_DECISIONS for decision in stored.values())
    # The model was asked about every record the pre-filters let through, and its answers are kept verbatim.
    asked = sum(1 for decision in stored.values() if decision not in PREFILTER_DECISIONS)
    assert llamacpp_engine.usage.calls - calls == asked
    for record in records:
        pair = store.pair(record.record_id, MODEL, prompt_version())
        assert pair is not None and pair.constructor_model == MODEL
        if pair.decision not in PREFILTER_DECISIONS:
            assert pair.raw_output
    # A re-run decides nothing and asks the model nothing.
    calls = llamacpp_engine.usage.calls
    again = await build_pairs(store, "hh5", generator, config)
    assert again.decided == 0 and again.already_decided == 5
    assert llamacpp_engine.usage.calls == calls
    assert decisions(store, "hh5", MODEL) == stored


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def redis_url(redis_server_url: str) -> str:
    return redis_database(redis_server_url, 9)


def test_build_without_a_worker_points_to_local(database_url: str, redis_url: str, tmp_path: Path) -> None:
    run_cli(database_url, "pairs", "import", str(hh_subset(tmp_path / "hh1.jsonl", 1)), "--format", "hh-rlhf",
            "--dataset", "hh-none")  # fmt: skip
    result = CliRunner().invoke(
        cli,
        ["pairs", "build", "--dataset", "hh-none", "--model", MODEL],
        env={"BPO_PLATFORM__DATABASE_URL": database_url, "BPO_PLATFORM__REDIS_URL": redis_url},
    )
    assert result.exit_code != 0
    assert "no worker consumes optimizer.smollm2-135m-instruct" in str(result.exception)
    assert "--local" in str(result.exception)


@pytest.fixture(scope="module")
def worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    env = os.environ.copy() | {
        "BPO_WORKER_BROKER_URL": redis_url,
        "BPO_WORKER_MODELS": MODEL,
        "BPO_ENGINE__NAME": "llamacpp",
        "BPO_ENGINE__THREADS": "1",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.optimizer_worker.worker"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while b"ready." not in log_path.read_bytes():
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the worker did not start within 120 s"
            time.sleep(0.5)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        print(log_path.read_text(errors="replace")[-3000:])


def test_build_on_a_celery_worker(
    database_url: str, store: PairsStore, redis_url: str, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    path = hh_subset(tmp_path / "hh3.jsonl", 3)
    run_cli(database_url, "pairs", "import", str(path), "--format", "hh-rlhf", "--dataset", "hh-workers")
    env = {"BPO_PLATFORM__REDIS_URL": redis_url}
    args = ["pairs", "build", "--dataset", "hh-workers", "--model", MODEL, "--engine", "llamacpp",
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "2", "--seed", "0", "--json"]  # fmt: skip
    report = json.loads(run_cli(database_url, *args, **env).stdout)
    assert report["decided_now"] == 3 and report["failed"] == 0
    stored = decisions(store, "hh-workers", MODEL)
    assert len(stored) == 3 and all(decision in KNOWN_DECISIONS for decision in stored.values())
    again = json.loads(run_cli(database_url, *args, **env).stdout)
    assert again["decided_now"] == 0 and again["already_decided"] == 3
    assert decisions(store, "hh-workers", MODEL) == stored
