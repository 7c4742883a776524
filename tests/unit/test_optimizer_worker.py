"""The optimizer workers without a broker: their Celery settings, the task run eagerly on a fake engine, and the
client against a scripted stand-in for Celery's client API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError  # type: ignore[import-untyped]
from celery.signals import worker_process_init, worker_process_shutdown  # type: ignore[import-untyped]
from kombu.exceptions import OperationalError
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from bpo.errors import (
    BpoError,
    EngineUnavailableError,
    InvalidPromptError,
    ModelIntegrityError,
    ModelNotFoundError,
)
from bpo.models.catalogue import PromptStyle
from bpo.optimizer.optimizer import OptimizeParams, PromptInput, RewriteFailure, RewriteResult
from bpo.settings import BpoSettings
from services.optimizer_worker.app import EngineHolder, LoadedModel, make_celery_app, queue_for_model, route_task
from services.optimizer_worker.client import OptimizerWorkersClient, batch_task_id, decode_entries
from services.optimizer_worker.metrics import WorkerMetrics
from services.optimizer_worker.settings import WorkerSettings
from services.optimizer_worker.tasks import OPTIMIZE_BATCH_TASK, parse_params, retry_delay_s
from services.optimizer_worker.worker import worker_argv
from tests.unit.fakes import FakeEngine

pytestmark = pytest.mark.unit

MODEL = "fake-optimizer"
PARIS = "Tell me about Paris."
PARIS_1 = "Tell me about Paris: its history, main landmarks, neighbourhoods and food, for a first-time visitor."
COPPER = "List uses of copper."
COPPER_1 = "List the main industrial and household uses of copper, with a short explanation of each."
SCRIPT = {PARIS: PARIS_1, COPPER: COPPER_1}
PARAMS = {"temperature": 0.0, "top_p": 0.9, "max_new_tokens": 256, "seed": 7, "rounds": 1}


class FakeLoader:
    def __init__(self, engine: FakeEngine | None = None, error: Exception | None = None) -> None:
        self.engine = engine or FakeEngine(SCRIPT)
        self.error = error
        self.prepared: list[str] = []
        self.loads: list[str] = []

    def prepare(self, model: str) -> None:
        self.prepared.append(model)

    def load(self, model: str) -> LoadedModel:
        self.loads.append(model)
        if self.error is not None:
            raise self.error
        return LoadedModel(self.engine, PromptStyle.CHAT_INSTRUCTION)


class FlakyEngine(FakeEngine):
    """Unavailable for its first ``failures`` batches, then answers from the script."""

    def __init__(self, failures: int) -> None:
        super().__init__(SCRIPT)
        self.failures = failures

    async def generate(self, requests: Any) -> Any:
        if len(self.batches) < self.failures:
            self.batches.append(list(requests))
            raise EngineUnavailableError("engine restarting")
        return await super().generate(requests)


def worker_settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "broker_url": "redis://127.0.0.1:1/0",
        "models": [MODEL],
        "max_retries": 2,
        "retry_backoff_s": 0,
    }
    return WorkerSettings.model_validate(values | overrides)


class Worker:
    """An app with its holder and metrics, for running the task eagerly."""

    def __init__(self, loader: FakeLoader, **overrides: Any) -> None:
        self.settings = worker_settings(**overrides)
        self.registry = CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.loader = loader
        self.engines = EngineHolder(self.settings.models, loader, self.metrics)
        self.app = make_celery_app(self.settings, self.engines, self.metrics)
        self.task = self.app.tasks[OPTIMIZE_BATCH_TASK]

    def run(self, items: Any, params: Any = None, model: str = MODEL) -> Any:
        kwargs = {"model": model, "params": PARAMS if params is None else params, "items": items}
        return self.task.apply(kwargs=kwargs).get()

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture
def worker() -> Iterator[Worker]:
    built = Worker(FakeLoader())
    yield built
    built.engines.close()


# -- settings -------------------------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    settings = WorkerSettings()
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.resolved_result_backend == settings.broker_url
    assert settings.models == ["qwen2.5-coder-0.5b-instruct"]
    assert settings.visibility_timeout_s == 3600
    assert settings.concurrency == 1
    assert settings.metrics_port == 0


@pytest.mark.parametrize("raw", ['["a", "b"]', "a,b", " a , b "])
def test_settings_models_from_environment(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("BPO_WORKER_MODELS", raw)
    monkeypatch.setenv("BPO_WORKER_VISIBILITY_TIMEOUT_S", "20")
    monkeypatch.setenv("BPO_WORKER_TASK_TIME_LIMIT_S", "8")
    monkeypatch.setenv("BPO_WORKER_RETRY_BACKOFF_MAX_S", "2")
    monkeypatch.setenv("BPO_WORKER_UNACKED_RESTORE_INTERVAL_S", "1")
    monkeypatch.setenv("BPO_ENGINE__NAME", "transformers")
    settings = WorkerSettings()
    assert settings.models == ["a", "b"]
    assert settings.visibility_timeout_s == 20
    assert settings.platform.engine.name == "transformers"


def test_settings_refuse_a_visibility_timeout_a_task_can_outlast() -> None:
    with pytest.raises(ValidationError, match="must exceed 2 \\* task_time_limit_s"):
        worker_settings(visibility_timeout_s=100, task_time_limit_s=45, retry_backoff_max_s=10)
    assert (
        worker_settings(visibility_timeout_s=101, task_time_limit_s=45, retry_backoff_max_s=10).longest_unacked_s == 100
    )


@pytest.mark.parametrize("models", [["a,b"], ["a b"], ["a", "a"], []])
def test_settings_refuse_models_that_cannot_name_a_queue(models: list[str]) -> None:
    with pytest.raises(ValidationError):
        worker_settings(models=models)


def test_platform_workers_use_the_platforms_redis_and_model(monkeypatch: pytest.MonkeyPatch) -> None:
    platform = BpoSettings.model_validate(
        {"platform": {"redis_url": "redis://10.0.0.5:6379/3", "optimizer_model": "m"}}
    )
    settings = WorkerSettings.for_platform(platform)
    assert settings.broker_url == settings.resolved_result_backend == "redis://10.0.0.5:6379/3"
    assert settings.models == ["m"]
    assert settings.platform is platform
    monkeypatch.setenv("BPO_WORKER_MODELS", "other")
    assert WorkerSettings.for_platform(platform).models == ["other"]


def test_each_process_gets_its_share_of_the_cores() -> None:
    settings = worker_settings(concurrency=2, platform={"engine": {"threads": 0}})
    engine = settings.engine_settings_for("smollm2-135m-instruct")
    assert engine.model == "smollm2-135m-instruct"
    assert engine.threads == max(1, settings.platform.engine.resolved_threads() // 2)
    pinned = worker_settings(platform={"engine": {"threads": 3}}).engine_settings_for("x")
    assert pinned.threads == 3


# -- app configuration ----------------------------------------------------------------------------------------


def test_delivery_settings(worker: Worker) -> None:
    conf = worker.app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_track_started is True
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is True
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.result_expires == worker.settings.result_expires_s
    assert conf.worker_proc_alive_timeout == worker.settings.engine_load_timeout_s
    transport = conf.broker_transport_options
    assert transport["visibility_timeout"] == 3600
    assert transport["visibility_timeout"] > 2 * conf.task_time_limit + worker.settings.retry_backoff_max_s
    assert transport["unacked_restore_interval"] == worker.settings.unacked_restore_interval_s
    assert transport["unacked_restore_throttle"] == 1
    task = worker.task
    assert task.acks_late is True
    assert task.reject_on_worker_lost is True
    assert task.retry_on_worker_lost is True
    assert task.default_retry_delay == worker.settings.retry_backoff_s
    assert task.max_retries == worker.settings.max_retries


def test_a_task_is_routed_to_its_models_queue(worker: Worker) -> None:
    assert queue_for_model("smollm2-135m-instruct") == "optimizer.smollm2-135m-instruct"
    assert route_task(OPTIMIZE_BATCH_TASK, (), {"model": "m"}, {}) == {"queue": "optimizer.m"}
    assert route_task(OPTIMIZE_BATCH_TASK, ("m", {}, []), {}, {}) == {"queue": "optimizer.m"}
    assert route_task("other.task", (), {"model": "m"}, {}) is None
    routed = worker.app.amqp.router.route({}, OPTIMIZE_BATCH_TASK, args=(), kwargs={"model": "m"})
    assert routed["queue"].name == "optimizer.m"


def test_worker_command_line_serves_every_models_queue() -> None:
    settings = worker_settings(models=["a", "b"], concurrency=3)
    argv = worker_argv(settings, "node", ["--loglevel=DEBUG"])
    assert argv[0] == "worker"
    assert "--pool=prefork" in argv
    assert "--concurrency=3" in argv
    assert "--queues=optimizer.a,optimizer.b" in argv
    assert argv[-1] == "--loglevel=DEBUG"  # passed last, so it overrides the default


def test_pool_processes_load_their_engines_once_through_the_signals(worker: Worker) -> None:
    worker.app.set_current()
    worker_process_init.send(sender="node")
    worker_process_init.send(sender="node")
    assert worker.loader.loads == [MODEL]
    assert worker.sample("bpo_worker_engine_replicas", model=MODEL) == 1
    worker_process_shutdown.send(sender="node", pid=None, exitcode=0)
    assert worker.sample("bpo_worker_engine_replicas", model=MODEL) == 0


def test_other_apps_do_not_load_engines_on_this_apps_signal() -> None:
    mine, other = Worker(FakeLoader()), Worker(FakeLoader())
    mine.app.set_current()
    worker_process_init.send(sender="node")
    assert mine.loader.loads == [MODEL]
    assert other.loader.loads == []


# -- the task -------------------------------------------------------------------------------------------------


def test_a_batch_is_optimized_in_one_engine_batch(worker: Worker) -> None:
    entries = worker.run([{"prompt": PARIS}, {"prompt": COPPER, "context": None}])
    assert [entry["ok"] for entry in entries] == [True, True]
    assert [entry["result"]["optimized"] for entry in entries] == [PARIS_1, COPPER_1]
    assert entries[0]["result"]["params"]["seed"] == 7
    assert len(worker.loader.engine.batches) == 1
    assert worker.sample("bpo_worker_tasks_total", model=MODEL, outcome="success") == 1
    assert worker.sample("bpo_worker_items_total", model=MODEL, status="OK") == 2
    assert worker.sample("bpo_worker_batch_size_count", model=MODEL) == 1
    assert worker.sample("bpo_worker_batch_size_sum", model=MODEL) == 2
    assert worker.sample("bpo_worker_tokens_total", model=MODEL, direction="out") > 0
    assert worker.sample("bpo_worker_task_seconds_count", model=MODEL) == 1


def test_bad_items_fail_alone_and_are_not_retried(worker: Worker) -> None:
    entries = worker.run([{"prompt": PARIS}, {"prompt": "   "}, {"text": "x"}, "not an object", {"prompt": 3}])
    assert entries[0]["ok"] is True
    for entry in entries[1:]:
        assert entry["ok"] is False
        assert entry["status_code"] == "INVALID_ARGUMENT"
    assert "unknown item fields: text" in entries[2]["error"]
    assert len(worker.loader.engine.batches) == 1
    assert worker.sample("bpo_worker_tasks_total", model=MODEL, outcome="retry") == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"rounds": 0}, "rounds"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"beam_width": 4}, "unknown optimize params: beam_width"),
        ("fast", "params must be an object"),
    ],
)
def test_bad_params_fail_every_item_without_touching_the_engine(worker: Worker, params: Any, message: str) -> None:
    entries = worker.run([{"prompt": PARIS}, {"prompt": COPPER}], params=params)
    assert all(entry["status_code"] == "INVALID_ARGUMENT" for entry in entries)
    assert message in entries[0]["error"]
    assert worker.loader.engine.batches == []


def test_items_that_are_not_a_list_fail_the_task(worker: Worker) -> None:
    with pytest.raises(InvalidPromptError, match="items must be a list"):
        worker.run({"prompt": PARIS})
    assert worker.sample("bpo_worker_tasks_total", model=MODEL, outcome="failure") == 1


def test_params_round_trip() -> None:
    params = OptimizeParams(temperature=0.2, top_p=0.8, max_new_tokens=64, seed=3, rounds=2)
    assert parse_params(params.as_dict()) == params
    assert parse_params({}) == OptimizeParams()


def test_a_model_this_worker_does_not_serve_fails_without_retry(worker: Worker) -> None:
    entries = worker.run([{"prompt": PARIS}], model="some-other-model")
    assert entries == [
        {"ok": False, "error": f"this worker serves {MODEL}, not 'some-other-model'", "status_code": "NOT_FOUND"}
    ]
    assert worker.sample("bpo_worker_tasks_total", model="unserved", outcome="success") == 1


def test_an_unavailable_engine_is_retried_then_reported() -> None:
    worker = Worker(FakeLoader(FakeEngine(SCRIPT, error=EngineUnavailableError("engine down"))), max_retries=2)
    entries = worker.run([{"prompt": PARIS}, {"prompt": COPPER}])
    assert len(worker.loader.engine.batches) == 3  # the first attempt and two retries
    assert [entry["status_code"] for entry in entries] == ["UNAVAILABLE", "UNAVAILABLE"]
    assert worker.sample("bpo_worker_tasks_total", model=MODEL, outcome="retry") == 2
    assert worker.sample("bpo_worker_tasks_total", model=MODEL, outcome="failure") == 1


def test_a_retry_that_finds_the_engine_back_succeeds() -> None:
    engine = FlakyEngine(failures=1)
    worker = Worker(FakeLoader(engine))
    entries = worker.run([{"prompt": PARIS}, {"prompt": COPPER}])
    assert [entry["ok"] for entry in entries] == [True, True]
    assert len(engine.batches) == 2
    assert worker.sample("bpo_worker_tasks_total", model=MODEL, outcome="success") == 1


def test_an_engine_that_failed_to_load_is_unavailable_and_not_reloaded_per_task() -> None:
    worker = Worker(FakeLoader(error=ModelIntegrityError("bad weights")), max_retries=1)
    entries = worker.run([{"prompt": PARIS}])
    assert entries[0]["status_code"] == "UNAVAILABLE"
    assert "failed to load in this worker process: ModelIntegrityError: bad weights" in entries[0]["error"]
    assert worker.loader.loads == [MODEL]


def test_a_stored_success_is_returned_without_running_again(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = [{"ok": False, "error": "stored", "status_code": "INVALID_ARGUMENT"}]
    monkeypatch.setattr(worker.app.backend, "get_task_meta", lambda task_id: {"status": "SUCCESS", "result": stored})
    worker.task.push_request(id="task-1", is_eager=False, retries=0)
    try:
        assert worker.task.run(MODEL, PARAMS, [{"prompt": PARIS}]) == stored
    finally:
        worker.task.pop_request()
    assert worker.loader.engine.batches == []
    assert worker.sample("bpo_worker_tasks_total", model=MODEL, outcome="duplicate") == 1


def test_retry_delays_grow_with_full_jitter_up_to_the_cap() -> None:
    for retries, ceiling in [(0, 2), (1, 4), (2, 8), (5, 30), (9, 30)]:
        delays = {retry_delay_s(retries, 2, 30) for _ in range(200)}
        assert min(delays) >= 0
        assert max(delays) <= ceiling
    assert retry_delay_s(3, 0, 30) == 0


# -- the client -----------------------------------------------------------------------------------------------


def result_entry(original: str, optimized: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "ok": True,
        "result": RewriteResult(
            original=original,
            context=None,
            optimized=optimized,
            model=MODEL,
            model_version="v1",
            engine="fake",
            params=OptimizeParams().as_dict(),
            rounds_done=1,
            tokens_in=10,
            tokens_out=20,
            latency_s=0.5,
            round_outputs=[optimized],
        ).to_dict()
        | {"added_by_a_newer_worker": 1},
    }
    return entry


INPUTS = [PromptInput(PARIS), PromptInput("", None)]
ENTRIES = [result_entry(PARIS, PARIS_1), {"ok": False, "error": "prompt is empty", "status_code": "INVALID_ARGUMENT"}]


def test_entries_rebuild_results_and_failures() -> None:
    first, second = decode_entries(ENTRIES, INPUTS)
    assert isinstance(first, RewriteResult)
    assert first.optimized == PARIS_1
    assert first.round_outputs == [PARIS_1]
    assert first.params == OptimizeParams().as_dict()
    assert isinstance(second, RewriteFailure)
    assert second.original == ""
    assert second.status_code == "INVALID_ARGUMENT"
    assert isinstance(second.exception, InvalidPromptError)


@pytest.mark.parametrize("value", [ENTRIES[:1], None, [None, None], [{"ok": True, "result": {"original": "x"}}] * 2])
def test_malformed_entries_are_an_error(value: Any) -> None:
    with pytest.raises(BpoError):
        decode_entries(value, INPUTS)


class ScriptedResult:
    """Stands in for ``AsyncResult``: each ``get`` plays the next step (a timeout, or a final state)."""

    def __init__(self, task_id: str, steps: list[tuple[str, Any] | None]) -> None:
        self.id = task_id
        self.steps = steps
        self.state = "PENDING"

    def get(self, timeout: float, propagate: bool) -> Any:
        assert propagate is False
        step = self.steps.pop(0) if self.steps else None
        if step is None:
            raise CeleryTimeoutError("The operation timed out.")
        self.state, value = step
        return value


class ScriptedBackend:
    def __init__(self, stored: dict[str, Any]) -> None:
        self.stored = stored
        self.released: list[str] = []

    def get_task_meta(self, task_id: str) -> dict[str, Any]:
        meta: dict[str, Any] = self.stored.get(task_id, {"status": "PENDING", "result": None})
        return meta

    def remove_pending_result(self, result: ScriptedResult) -> None:
        self.released.append(result.id)


class ScriptedApp:
    def __init__(self, steps: list[tuple[str, Any] | None], stored: dict[str, Any] | None = None) -> None:
        self.backend = ScriptedBackend(stored or {})
        self.steps = steps
        self.sent: list[dict[str, Any]] = []
        self.results: dict[str, ScriptedResult] = {}
        self.broker_down = False

    def AsyncResult(self, task_id: str) -> ScriptedResult:  # noqa: N802 - Celery's name
        return self.results[task_id]

    def send_task(self, name: str, kwargs: dict[str, Any], queue: str, task_id: str | None) -> ScriptedResult:
        if self.broker_down:
            raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        self.sent.append({"name": name, "kwargs": kwargs, "queue": queue, "task_id": task_id})
        return ScriptedResult(task_id or "generated-id", self.steps)


async def test_client_sends_one_task_to_the_models_queue_and_rebuilds_its_results() -> None:
    app = ScriptedApp([None, ("SUCCESS", ENTRIES)])
    client = OptimizerWorkersClient(app, timeout_s=5, wait_slice_s=0.01)
    outcomes = await client.optimize_batch(MODEL, OptimizeParams(seed=1), INPUTS, task_id="job-1-batch-0")
    client.close()
    assert [type(outcome) for outcome in outcomes] == [RewriteResult, RewriteFailure]
    (sent,) = app.sent
    assert sent["name"] == OPTIMIZE_BATCH_TASK
    assert sent["queue"] == f"optimizer.{MODEL}"
    assert sent["task_id"] == "job-1-batch-0"
    assert sent["kwargs"] == {
        "model": MODEL,
        "params": OptimizeParams(seed=1).as_dict(),
        "items": [{"prompt": PARIS, "context": None}, {"prompt": "", "context": None}],
    }


async def test_client_returns_a_stored_result_for_a_task_id_without_sending() -> None:
    app = ScriptedApp([], stored={"job-1-batch-0": {"status": "SUCCESS", "result": ENTRIES}})
    client = OptimizerWorkersClient(app, timeout_s=5)
    outcomes = await client.optimize_batch(MODEL, OptimizeParams(), INPUTS, task_id="job-1-batch-0")
    client.close()
    assert isinstance(outcomes[0], RewriteResult)
    assert app.sent == []


async def test_client_raises_unavailable_when_no_worker_answers_in_time() -> None:
    app = ScriptedApp([])
    client = OptimizerWorkersClient(app, timeout_s=0.2, wait_slice_s=0.02)
    started = asyncio.get_running_loop().time()
    with pytest.raises(EngineUnavailableError, match=r"within 0.2s \(state PENDING, queue optimizer.fake-optimizer\)"):
        await client.optimize_batch(MODEL, OptimizeParams(), INPUTS)
    client.close()
    assert asyncio.get_running_loop().time() - started < 2
    # The task id is derived from the batch: the same batch sent again gets the same id.
    (sent,) = app.sent
    assert app.backend.released == [sent["task_id"]]
    assert sent["task_id"] == batch_task_id(sent["kwargs"])


def test_a_batch_task_id_is_the_batch_itself() -> None:
    kwargs = {"model": MODEL, "params": OptimizeParams(seed=1).as_dict(), "items": [{"prompt": PARIS, "context": None}]}
    assert batch_task_id(kwargs) == batch_task_id(dict(kwargs))
    other = kwargs | {"items": [{"prompt": PARIS, "context": "x"}]}
    assert batch_task_id(other) != batch_task_id(kwargs)


async def test_a_batch_still_running_is_awaited_not_sent_again() -> None:
    kwargs = {"model": MODEL, "params": OptimizeParams().as_dict(),
              "items": [{"prompt": i.prompt, "context": i.context} for i in INPUTS]}  # fmt: skip
    running = batch_task_id(kwargs)
    app = ScriptedApp([("SUCCESS", ENTRIES)], stored={running: {"status": "STARTED", "result": None}})
    app.results = {running: ScriptedResult(running, [("SUCCESS", ENTRIES)])}
    client = OptimizerWorkersClient(app, timeout_s=5, wait_slice_s=0.01)
    outcomes = await client.optimize_batch(MODEL, OptimizeParams(), INPUTS)
    client.close()
    assert isinstance(outcomes[0], RewriteResult)
    assert app.sent == []


async def test_client_raises_unavailable_when_the_broker_is_down() -> None:
    app = ScriptedApp([])
    app.broker_down = True
    client = OptimizerWorkersClient(app, timeout_s=1)
    with pytest.raises(EngineUnavailableError, match="broker is unreachable"):
        await client.optimize_batch(MODEL, OptimizeParams(), INPUTS)
    client.close()


async def test_client_reraises_a_failed_task() -> None:
    app = ScriptedApp([("FAILURE", InvalidPromptError("items must be a list")), ("FAILURE", RuntimeError("boom"))])
    client = OptimizerWorkersClient(app, timeout_s=1)
    with pytest.raises(InvalidPromptError, match="items must be a list"):
        await client.optimize_batch(MODEL, OptimizeParams(), INPUTS)
    with pytest.raises(BpoError, match="ended FAILURE: RuntimeError"):
        await client.optimize_batch(MODEL, OptimizeParams(), INPUTS)
    client.close()


async def test_client_sends_nothing_for_an_empty_batch() -> None:
    app = ScriptedApp([])
    client = OptimizerWorkersClient(app, timeout_s=1)
    assert await client.optimize_batch(MODEL, OptimizeParams(), []) == []
    assert app.sent == []
    client.close()


def test_not_found_entries_rebuild_as_model_not_found() -> None:
    (failure,) = decode_entries([{"ok": False, "error": "nope", "status_code": "NOT_FOUND"}], [PromptInput(PARIS)])
    assert isinstance(failure, RewriteFailure)
    assert isinstance(failure.exception, ModelNotFoundError)
