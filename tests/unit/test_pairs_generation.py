"""Generic batch generation: the shared runner, its wire format, the Celery task run eagerly, and its client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bpo.engines.base import ChatMessage, Completion, GenerationRequest, SamplingParams
from bpo.errors import BpoError, EngineUnavailableError, InvalidPromptError
from bpo.models.catalogue import PromptStyle
from bpo.pairs.generation import (
    EngineGenerator,
    GenerationFailure,
    Outcome,
    outcome_from_wire,
    outcome_to_wire,
    request_from_wire,
    request_to_wire,
    run_generation,
)
from services.optimizer_worker.app import EngineHolder, LoadedModel, make_celery_app, route_task
from services.optimizer_worker.generation_tasks import (
    GENERATE_BATCH_TASK,
    GenerationWorkersClient,
    WorkersGenerator,
    decode_batch,
)
from services.optimizer_worker.metrics import WorkerMetrics
from services.optimizer_worker.settings import WorkerSettings
from tests.unit.scripted_engine import ScriptedEngine, last_user_turn

pytestmark = pytest.mark.unit

MODEL = "fake-constructor"


def chat(text: str, **params: Any) -> GenerationRequest:
    return GenerationRequest(messages=(ChatMessage("user", text),), params=SamplingParams(**params))


def echo_engine(context_length: int = 4096) -> ScriptedEngine:
    return ScriptedEngine(lambda request: f"echo: {last_user_turn(request)}", context_length=context_length)


class BrokenEngine(ScriptedEngine):
    def __init__(self, error: BpoError) -> None:
        super().__init__(lambda request: "")
        self.error = error
        self.attempts = 0

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        self.attempts += 1
        raise self.error


# -- run_generation ---------------------------------------------------------------------------------------------


async def test_completions_keep_the_input_order() -> None:
    engine = echo_engine()
    outcomes = await run_generation(engine, [chat("one"), chat("two"), chat("three")])
    assert [o.text for o in outcomes if isinstance(o, Completion)] == ["echo: one", "echo: two", "echo: three"]
    assert len(engine.batches) == 1


async def test_max_tokens_is_limited_to_the_room_left() -> None:
    engine = echo_engine(context_length=300)
    prompt = "x" * 800  # about 201 tokens for the scripted engine
    await run_generation(engine, [chat(prompt, max_tokens=1024), chat("short", max_tokens=50)])
    first, second = engine.requests
    assert first.params.max_tokens == 300 - engine.count_prompt_tokens(first)
    assert second.params.max_tokens == 50


async def test_a_prompt_too_long_fails_alone() -> None:
    engine = echo_engine(context_length=300)
    outcomes = await run_generation(engine, [chat("y" * 1200), chat("fits")])
    too_long, fits = outcomes
    assert isinstance(too_long, GenerationFailure)
    assert too_long.prompt_too_long and too_long.status_code == "INVALID_ARGUMENT" and not too_long.transient
    assert isinstance(fits, Completion) and fits.text == "echo: fits"
    assert len(engine.requests) == 1


async def test_an_engine_error_fails_the_batch_with_its_status() -> None:
    outcomes = await run_generation(BrokenEngine(EngineUnavailableError("gone")), [chat("a"), chat("b")])
    assert outcomes == [GenerationFailure("gone", "UNAVAILABLE")] * 2
    assert all(isinstance(o, GenerationFailure) and o.transient for o in outcomes)


async def test_engine_generator_names_its_model() -> None:
    engine = echo_engine()
    assert EngineGenerator(engine).name == "scripted"
    generator = EngineGenerator(engine, "smollm2")
    assert (generator.name, generator.max_in_flight) == ("smollm2", 1)
    (outcome,) = await generator.generate([chat("hi")])
    assert isinstance(outcome, Completion)


# -- wire format ------------------------------------------------------------------------------------------------


def test_requests_round_trip() -> None:
    requests = [
        GenerationRequest(
            messages=(ChatMessage("system", "s"), ChatMessage("user", "{braces} stay")),
            params=SamplingParams(temperature=0.9, top_p=1.0, max_tokens=77, seed=3, stop=("[END]",)),
        ),
        GenerationRequest(prompt="raw prompt", params=SamplingParams()),
    ]
    assert [request_from_wire(request_to_wire(r)) for r in requests] == requests


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("text", "must be an object"),
        ({"prompt": "p", "extra": 1}, "unknown request fields"),
        ({"prompt": "p", "messages": [{"role": "user", "content": "c"}]}, "exactly one"),
        ({}, "exactly one"),
        ({"messages": []}, "non-empty"),
        ({"messages": [{"role": "tool", "content": "c"}]}, "role"),
        ({"messages": [{"role": "user", "content": 3}]}, "string content"),
        ({"prompt": "p", "params": {"temperature": -1}}, "out of range"),
        ({"prompt": "p", "params": {"max_tokens": 1.5}}, "max_tokens must be a int"),
        ({"prompt": "p", "params": {"seed": "7"}}, "seed"),
        ({"prompt": "p", "params": {"stop": "x"}}, "stop"),
        ({"prompt": "p", "params": {"top_k": 3}}, "unknown params"),
    ],
)
def test_malformed_requests_say_what_is_wrong(raw: object, message: str) -> None:
    with pytest.raises(InvalidPromptError, match=message):
        request_from_wire(raw)


def test_outcomes_round_trip() -> None:
    outcomes: list[Outcome] = [
        Completion("text", 10, 5, "length", 0.5),
        GenerationFailure("too long", "INVALID_ARGUMENT", prompt_too_long=True),
        GenerationFailure("down", "UNAVAILABLE"),
    ]
    assert [outcome_from_wire(outcome_to_wire(o)) for o in outcomes] == outcomes
    with pytest.raises(BpoError, match="malformed completion"):
        outcome_from_wire({"ok": True, "text": "t", "finish_reason": "exploded"})


def test_decode_batch_checks_the_count() -> None:
    value = {"engine": "llamacpp", "model_version": "v", "entries": [outcome_to_wire(Completion("t", 1, 1, "stop", 0))]}
    assert decode_batch(value, 1).engine == "llamacpp"
    with pytest.raises(BpoError, match="1 entries for 2 requests"):
        decode_batch(value, 2)
    with pytest.raises(BpoError, match="malformed"):
        decode_batch([1], 1)


# -- the Celery task, run eagerly -------------------------------------------------------------------------------


class Loader:
    def __init__(self, engine: ScriptedEngine) -> None:
        self.engine = engine

    def prepare(self, model: str) -> None:
        return None

    def load(self, model: str) -> LoadedModel:
        return LoadedModel(self.engine, PromptStyle.CHAT_INSTRUCTION)


class Worker:
    def __init__(self, engine: ScriptedEngine) -> None:
        settings = WorkerSettings.model_validate(
            {"broker_url": "redis://127.0.0.1:1/0", "models": [MODEL], "max_retries": 1, "retry_backoff_s": 0}
        )
        self.registry = CollectorRegistry()
        metrics = WorkerMetrics(self.registry)
        self.engines = EngineHolder(settings.models, Loader(engine), metrics)
        self.app = make_celery_app(settings, self.engines, metrics)
        self.task = self.app.tasks[GENERATE_BATCH_TASK]

    def run(self, requests: list[Any], model: str = MODEL) -> Any:
        return self.task.apply(kwargs={"model": model, "requests": requests}).get()


@pytest.fixture
def worker() -> Iterator[Worker]:
    built = Worker(echo_engine())
    yield built
    built.engines.close()


def test_task_runs_requests_on_the_workers_engine(worker: Worker) -> None:
    result = worker.run([request_to_wire(chat("hello")), {"prompt": 3}, request_to_wire(chat("again"))])
    assert result["engine"] == "scripted" and result["model_version"] == "scripted-v1"
    first, bad, last = (outcome_from_wire(entry) for entry in result["entries"])
    assert isinstance(first, Completion) and first.text == "echo: hello"
    assert isinstance(bad, GenerationFailure) and bad.status_code == "INVALID_ARGUMENT"
    assert isinstance(last, Completion) and last.text == "echo: again"
    assert worker.registry.get_sample_value("bpo_worker_tasks_total", {"model": MODEL, "outcome": "success"}) == 1


def test_task_for_a_model_the_worker_does_not_serve(worker: Worker) -> None:
    result = worker.run([request_to_wire(chat("hello"))], model="other")
    (entry,) = result["entries"]
    assert entry["ok"] is False and entry["status_code"] == "NOT_FOUND"


def test_task_retries_an_unavailable_engine_then_returns_the_failures() -> None:
    engine = BrokenEngine(EngineUnavailableError("engine restarting"))
    worker = Worker(engine)
    result = worker.run([request_to_wire(chat("x"))])
    worker.engines.close()
    assert engine.attempts == 2  # the first try and max_retries=1 retry
    (outcome,) = (outcome_from_wire(entry) for entry in result["entries"])
    # The caller leaves such a record undecided for its next run.
    assert isinstance(outcome, GenerationFailure) and outcome.transient


def test_generation_tasks_route_to_the_models_queue() -> None:
    assert route_task(GENERATE_BATCH_TASK, (), {"model": "m1"}, {}) == {"queue": "optimizer.m1"}


# -- the client, against a stand-in for Celery's client API ------------------------------------------------------


class FakeResult:
    def __init__(self, value: Any, state: str = "SUCCESS") -> None:
        self.id = "task-1"
        self.value, self.state = value, state

    def get(self, timeout: float, propagate: bool) -> Any:
        return self.value


class FakeControl:
    def __init__(self, queues: dict[str, list[dict[str, str]]] | None) -> None:
        self.queues = queues

    def inspect(self, timeout: float) -> Any:
        queues = self.queues

        class Inspect:
            def active_queues(self) -> Any:
                return queues

        return Inspect()


class FakeApp:
    def __init__(self, reply: Any, queues: dict[str, list[dict[str, str]]] | None = None) -> None:
        self.reply = reply
        self.sent: list[tuple[str, dict[str, Any], str]] = []
        self.control = FakeControl(queues)

    def send_task(self, name: str, kwargs: dict[str, Any], queue: str, task_id: str | None) -> FakeResult:
        self.sent.append((name, kwargs, queue))
        return FakeResult(self.reply(kwargs))


async def test_client_sends_to_the_models_queue_and_decodes() -> None:
    def reply(kwargs: dict[str, Any]) -> Any:
        entries = [outcome_to_wire(Completion(f"done {i}", 1, 2, "stop", 0.1)) for i in range(len(kwargs["requests"]))]
        return {"engine": "vllm", "model_version": "v9", "entries": entries}

    app = FakeApp(reply)
    client = GenerationWorkersClient(app, timeout_s=5)
    generator = WorkersGenerator(client, MODEL, max_in_flight=3)
    outcomes = await generator.generate([chat("a"), chat("b")])
    client.close()
    assert [o.text for o in outcomes if isinstance(o, Completion)] == ["done 0", "done 1"]
    ((name, kwargs, queue),) = app.sent
    assert (name, queue, kwargs["model"]) == (GENERATE_BATCH_TASK, f"optimizer.{MODEL}", MODEL)
    assert [request_from_wire(r) for r in kwargs["requests"]] == [chat("a"), chat("b")]
    assert generator.engines_seen == {("vllm", "v9")}
    assert (generator.name, generator.max_in_flight) == (MODEL, 3)


async def test_client_lists_the_workers_serving_a_model() -> None:
    queues = {
        "w1@host": [{"name": f"optimizer.{MODEL}"}],
        "w2@host": [{"name": "optimizer.other"}],
        "w3@host": [{"name": "optimizer.other"}, {"name": f"optimizer.{MODEL}"}],
    }
    client = GenerationWorkersClient(FakeApp(lambda kwargs: None, queues), timeout_s=5)
    assert await client.serving_workers(MODEL) == ["w1@host", "w3@host"]
    assert await GenerationWorkersClient(FakeApp(lambda kwargs: None, None), timeout_s=5).serving_workers(MODEL) == []
    client.close()


async def test_client_gives_up_after_its_timeout() -> None:
    class Pending(FakeResult):
        def get(self, timeout: float, propagate: bool) -> Any:
            from celery.exceptions import TimeoutError as CeleryTimeoutError  # type: ignore[import-untyped]

            raise CeleryTimeoutError()

    class Backend:
        def remove_pending_result(self, result: Any) -> None:
            return None

    class SlowApp(FakeApp):
        backend = Backend()

        def send_task(self, name: str, kwargs: dict[str, Any], queue: str, task_id: str | None) -> FakeResult:
            return Pending(None, state="PENDING")

    client = GenerationWorkersClient(SlowApp(lambda kwargs: None), timeout_s=0.3, wait_slice_s=0.05)
    with pytest.raises(EngineUnavailableError, match=r"no worker for 'fake-constructor' finished .* \(state PENDING"):
        await asyncio.wait_for(client.generate(MODEL, [chat("a")]), timeout=10)
    client.close()
