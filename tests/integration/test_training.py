"""Training for real: SmolLM2-135M-Instruct fine-tuned for 10 steps on 20 pairs stored in a fresh Postgres
database (migration 0002), its exports loaded by the transformers and llamacpp engines, and a running optimizer
worker (a real Celery worker subprocess on Redis database 10) switched to a newly registered version.

The pairs are the first 20 of the packaged BPO test set (``prompt`` -> ``optimized_prompt``); a second, LoRA run
of 2 steps provides the version the worker switches to.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import redis

from bpo.engines.factory import build_engine
from bpo.models.catalogue import ModelCatalogue, PromptStyle
from bpo.models.prepare import ModelPreparer
from bpo.optimizer.optimizer import OptimizeParams, PromptInput, PromptOptimizer, RewriteResult
from bpo.optimizer.prompting import render_bpo_template
from bpo.settings import BpoSettings, EngineSettings
from bpo.store.db import migrate, open_pool
from bpo.store.repository import PipelineStore
from services.optimizer_worker.app import RegistryAliases, make_celery_app
from services.optimizer_worker.client import OptimizerWorkersClient
from services.optimizer_worker.settings import WorkerSettings
from tests.integration.services import fresh_database, redis_database
from tests.integration.worker_process import WorkerProcess
from training.config import TrainConfig
from training.job import run_job
from training.train import TrainResult

pytestmark = pytest.mark.integration

OUT = "bpo-it"
DATASET = "it-pairs"
ALIAS = "latest"
REDIS_DB = 10
GREEDY = OptimizeParams(temperature=0.0, max_new_tokens=64, seed=0)
PROMPTS = [
    PromptInput("Tell me about black holes."),
    PromptInput("How can I improve my time management skills?"),
    PromptInput("Write a short poem about autumn leaves."),
    PromptInput("What are the main causes of inflation?"),
]


def first_bpo_test_pairs(count: int) -> list[tuple[str, str]]:
    text = resources.files("bpo.resources").joinpath("datasets", "bpo_test.json").read_text(encoding="utf-8")
    return [(row["prompt"], row["optimized_prompt"]) for row in json.loads(text)[:count]]


def insert_pairs(url: str, pairs: list[tuple[str, str]]) -> None:
    """Rows as the importer and pair construction store them (migration 0002): one record, one kept pair."""
    namespace = uuid.UUID("00000000-0000-4000-8000-000000000b90")
    with psycopg.connect(url) as conn:
        for index, (x_user, x_opt) in enumerate(pairs):
            record_id = uuid.uuid5(namespace, f"{DATASET}:{index}")
            conn.execute(
                "INSERT INTO preference_records (record_id, dataset, source, licence, external_id, instruction,"
                " chosen, rejected) VALUES (%s, %s, 'bpo', 'Apache-2.0', %s, %s, 'good', 'bad')",
                (record_id, DATASET, str(index), x_user),
            )
            conn.execute(
                "INSERT INTO prompt_pairs (pair_id, record_id, dataset, constructor_model, prompt_version, decision,"
                " x_user, x_opt) VALUES (%s, %s, %s, 'gpt-3.5-turbo', 'bpo-paper', 'kept', %s, %s)",
                (uuid.uuid5(record_id, "pair"), record_id, DATASET, x_user, x_opt),
            )
        # A dropped pair of the same dataset, which training must not read.
        conn.execute(
            "INSERT INTO prompt_pairs (pair_id, record_id, dataset, constructor_model, prompt_version, decision,"
            " x_user, x_opt) VALUES (%s, %s, %s, 'other-model', 'bpo-paper', 'dropped:too_short', 'x', 'y')",
            (uuid.uuid4(), uuid.uuid5(namespace, f"{DATASET}:0"), DATASET),
        )


@pytest.fixture(scope="module")
def database(postgres_admin_url: str) -> Iterator[str]:
    with fresh_database(postgres_admin_url, "bpo_train") as url:
        pool = open_pool(url, min_size=1, max_size=1)
        migrate(pool)
        pool.close()
        insert_pairs(url, first_bpo_test_pairs(20))
        yield url


def train_config(url: str, out_dir: Path, **values: Any) -> TrainConfig:
    defaults: dict[str, Any] = {
        "pairs": [DATASET],
        "out": OUT,
        "base": "smollm2-135m-instruct",
        "max_steps": 10,
        "learning_rate": 1e-4,
        "batch_size": 4,
        "eval_fraction": 0.25,
        "threads": 2,
        "output_dir": out_dir,
        "database_url": url,
    }
    return TrainConfig.model_validate(defaults | values)


@pytest.fixture(scope="module")
def trained(database: str, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """Full fine-tuning, 10 steps, registered and aliased as ``latest``."""
    return run_job(train_config(database, tmp_path_factory.mktemp("runs"), alias=ALIAS), BpoSettings())


@pytest.fixture(scope="module")
def second(database: str, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """A LoRA run of 2 steps, written but not registered: the worker test registers it."""
    config = train_config(database, tmp_path_factory.mktemp("runs"), method="lora", max_steps=2, register_version=False)
    return run_job(config, BpoSettings())


def test_ten_steps_on_twenty_pairs_lower_the_loss_and_register_the_version(trained: TrainResult, database: str) -> None:
    metrics = trained.metrics
    assert metrics.steps == 10
    assert metrics.train_examples + metrics.eval_examples == 20
    assert metrics.eval_examples > 0
    assert metrics.eval_loss_before is not None and metrics.eval_loss_after is not None
    assert metrics.eval_loss_after < metrics.eval_loss_before
    assert np.mean(metrics.step_losses[-3:]) < np.mean(metrics.step_losses[:3])
    data = json.loads((trained.run_dir / "data_manifest.json").read_text())
    assert len(data["train"]) + len(data["eval"]) == 20
    with psycopg.connect(database) as conn:
        row = conn.execute(
            "SELECT base_model, source, manifest_hash, metrics FROM model_registry WHERE name = %s AND version = %s",
            (OUT, trained.version),
        ).fetchone()
    assert row is not None
    assert row[:3] == ("smollm2-135m-instruct", str(trained.run_dir), data["hash"])
    assert row[3]["eval_loss_after"] == pytest.approx(metrics.eval_loss_after)
    aliases = RegistryAliases(database)
    try:
        resolved = aliases.resolve(ALIAS)
        assert resolved is not None and (resolved.name, resolved.version) == (OUT, trained.version)
        assert resolved.location == str(trained.run_dir)
        assert aliases.resolve("no-such-alias") is None
        # The optimizer's own name serves its newest version, as an alias would.
        by_name = aliases.resolve(OUT)
        assert by_name is not None and (by_name.name, by_name.version) == (OUT, trained.version)
    finally:
        aliases.close()


def optimize_with(engine_name: str, model_path: Path, version: str) -> RewriteResult:
    spec = ModelCatalogue().resolve(str(model_path))
    assert spec.prompt_style == PromptStyle.BPO_TEMPLATE
    settings = EngineSettings.model_validate({"name": engine_name, "model": str(model_path), "threads": 2})
    engine = build_engine(settings, spec, ModelPreparer(BpoSettings().models_dir))
    try:
        result = asyncio.run(PromptOptimizer(engine, spec.prompt_style, GREEDY).optimize("Tell me about black holes."))
    finally:
        asyncio.run(engine.aclose())
    assert (result.model, result.model_version, result.engine) == (OUT, version, engine_name)
    assert result.tokens_out > 0
    assert result.round_outputs and result.round_outputs[0].strip()
    return result


def test_the_merged_folder_rewrites_in_the_transformers_engine(trained: TrainResult) -> None:
    optimize_with("transformers", trained.hf_folder, trained.version)


def test_the_gguf_rewrites_in_llamacpp_and_agrees_with_the_hf_folder(trained: TrainResult) -> None:
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert trained.gguf is not None and trained.manifest["gguf"]["status"] == "exported"
    optimize_with("llamacpp", trained.gguf, trained.version)

    text = render_bpo_template("Tell me about black holes.") + " Explain what black holes are and how they form."
    tokenizer = AutoTokenizer.from_pretrained(trained.hf_folder)
    ids = tokenizer(text).input_ids
    model = AutoModelForCausalLM.from_pretrained(trained.hf_folder, dtype=torch.float32)
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits[0].numpy()
    llm = Llama(model_path=str(trained.gguf), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        gguf_logits = np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()
    # Same weights in f16: the next-token choice agrees at (nearly) every position. A wrong tensor layout (say,
    # unpermuted attention) would agree almost nowhere.
    agreement = float((hf_logits.argmax(-1) == gguf_logits.argmax(-1)).mean())
    assert agreement >= 0.9, agreement


def worker_process(log_path: Path, database: str, broker_url: str) -> WorkerProcess:
    return WorkerProcess(
        log_path,
        {
            "BPO_WORKER_BROKER_URL": broker_url,
            "BPO_WORKER_MODELS": ALIAS,
            "BPO_WORKER_VISIBILITY_TIMEOUT_S": "55",
            "BPO_WORKER_TASK_TIME_LIMIT_S": "25",
            "BPO_WORKER_RETRY_BACKOFF_MAX_S": "2",
            "BPO_WORKER_ALIAS_CHECK_INTERVAL_S": "1",
            "BPO_PLATFORM__DATABASE_URL": database,
            "BPO_ENGINE__NAME": "llamacpp",
            "BPO_ENGINE__THREADS": "1",
        },
    )


@pytest.fixture
def broker_url(redis_server_url: str) -> str:
    return redis_database(redis_server_url, REDIS_DB)


@pytest.fixture
def broker(broker_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(broker_url, socket_connect_timeout=1)
    yield client
    client.flushdb()
    client.close()


async def wait_for_state(app: Any, task_id: str, state: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        meta = await asyncio.to_thread(app.backend.get_task_meta, task_id)
        if meta["status"] == state:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} did not reach {state} within {timeout_s}s")


def versions(outcomes: list[Any]) -> set[tuple[str, str]]:
    assert all(isinstance(outcome, RewriteResult) for outcome in outcomes), outcomes
    return {(outcome.model, outcome.model_version) for outcome in outcomes}


async def test_registering_a_version_switches_a_running_worker(
    trained: TrainResult, second: TrainResult, database: str, broker: redis.Redis, broker_url: str, tmp_path: Path
) -> None:
    assert second.version != trained.version
    settings = WorkerSettings.model_validate({"broker_url": broker_url, "models": [ALIAS]})
    app = make_celery_app(settings)
    client = OptimizerWorkersClient(app, timeout_s=120)
    worker = worker_process(tmp_path / "worker.log", database, broker_url)
    pool = open_pool(database, min_size=1, max_size=1)
    try:
        first = await client.optimize_batch(ALIAS, GREEDY, PROMPTS[:1])
        assert versions(first) == {(OUT, trained.version)}

        # A batch in flight when the new version is registered finishes on the version it started with.
        long_params = OptimizeParams(temperature=0.0, max_new_tokens=128, seed=0)
        task_id = f"in-flight-{uuid.uuid4()}"
        in_flight = asyncio.create_task(client.optimize_batch(ALIAS, long_params, PROMPTS, task_id=task_id))
        await wait_for_state(app, task_id, "STARTED", timeout_s=60)
        store = PipelineStore(pool)
        store.register_model(OUT, second.version, base_model="smollm2-135m-instruct", source=str(second.run_dir))
        store.set_alias(ALIAS, OUT, second.version)
        meta = await asyncio.to_thread(app.backend.get_task_meta, task_id)
        assert meta["status"] == "STARTED", "the batch finished before the new version was registered"
        assert versions(await in_flight) == {(OUT, trained.version)}

        await asyncio.sleep(1.5)
        after = await client.optimize_batch(ALIAS, GREEDY, PROMPTS[:2])
        assert versions(after) == {(OUT, second.version)}
        assert worker.process.poll() is None
        assert f"{ALIAS} now served by {OUT} version {second.version}" in worker.log()
    finally:
        pool.close()
        client.close()
        code = worker.stop()
        print(worker.log()[-3000:])
    assert code == 0
