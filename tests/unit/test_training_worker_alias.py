"""Optimizer workers serving a registry alias (``latest``): they switch to a newly registered version between
batches without a restart, batches finish on the version they started with, and every result names its version.
Fakes stand in for the registry, the loader and the engines; the task runs eagerly through the real Celery app."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bpo.engines.base import Completion, GenerationRequest, ModelIdentity
from bpo.errors import EngineUnavailableError, InvalidConfigurationError, ModelNotFoundError
from bpo.models.catalogue import PromptStyle
from services.optimizer_worker.app import (
    AliasWatch,
    CatalogueEngineLoader,
    EngineHolder,
    LoadedModel,
    RegisteredVersion,
    RegistryAliases,
    alias_watch_for,
    make_celery_app,
)
from services.optimizer_worker.metrics import WorkerMetrics
from services.optimizer_worker.settings import WorkerSettings
from services.optimizer_worker.tasks import OPTIMIZE_BATCH_TASK
from tests.unit.fakes import FakeEngine

pytestmark = pytest.mark.unit

ALIAS = "latest"
PROMPT = "Tell me about Paris."
V1 = RegisteredVersion("bpo-smollm2", "v1", "/runs/bpo-smollm2/v1")
V2 = RegisteredVersion("bpo-smollm2", "v2", "/runs/bpo-smollm2/v2")
V3 = RegisteredVersion("bpo-smollm2", "v3", "/runs/bpo-smollm2/v3")
PARAMS = {"temperature": 0.0, "top_p": 0.9, "max_new_tokens": 256, "seed": 7, "rounds": 1}


class VersionEngine(FakeEngine):
    """Rewrites every prompt the same way and says which version it is; runs a hook on each batch."""

    def __init__(self, version: RegisteredVersion) -> None:
        rewrite = f"Tell me about Paris: history, landmarks and food ({version.version})."
        # A second round (iterative rewriting) sees the first rewrite and keeps it.
        super().__init__({PROMPT: rewrite, rewrite: rewrite})
        self.identity = ModelIdentity(version.name, version.version)
        self.closed = False
        self.on_batch: list[Any] = []

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        for hook in self.on_batch:
            hook()
        return await super().generate(requests)

    async def aclose(self) -> None:
        self.closed = True


class FakeRegistry:
    def __init__(self, aliases: dict[str, RegisteredVersion] | None = None) -> None:
        self.aliases = dict(aliases or {})
        self.lookups = 0
        self.down = False
        self.closed = 0

    def resolve(self, alias: str) -> RegisteredVersion | None:
        self.lookups += 1
        if self.down:
            raise ConnectionError("registry unreachable")
        return self.aliases.get(alias)

    def close(self) -> None:
        self.closed += 1


class FakeLoader:
    def __init__(self, failing: set[str] | None = None) -> None:
        self.engines: dict[str, VersionEngine] = {}
        self.version_loads: list[str] = []
        self.catalogue_loads: list[str] = []
        self.prepared: list[str] = []
        self.failing = failing or set()

    def prepare(self, model: str) -> None:
        self.prepared.append(model)

    def load(self, model: str) -> LoadedModel:
        self.catalogue_loads.append(model)
        raise ModelNotFoundError(f"unknown model {model!r}")

    def load_version(self, version: RegisteredVersion) -> LoadedModel:
        self.version_loads.append(version.version)
        if version.version in self.failing:
            raise ModelNotFoundError(f"{version.version} has no weights")
        engine = VersionEngine(version)
        self.engines[version.version] = engine
        return LoadedModel(engine, PromptStyle.BPO_TEMPLATE)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Setup:
    def __init__(self, aliases: dict[str, RegisteredVersion], failing: set[str] | None = None) -> None:
        self.registry = FakeRegistry(aliases)
        self.loader = FakeLoader(failing)
        self.clock = Clock()
        self.metrics = WorkerMetrics(CollectorRegistry())
        watch = AliasWatch(self.registry, self.loader, check_interval_s=5.0, clock=self.clock)
        self.holder = EngineHolder([ALIAS], self.loader, self.metrics, watch)
        settings = WorkerSettings.model_validate(
            {"broker_url": "redis://127.0.0.1:1/0", "models": [ALIAS], "max_retries": 0, "retry_backoff_s": 0}
        )
        self.app = make_celery_app(settings, self.holder, self.metrics)

    def batch(self, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        task = self.app.tasks[OPTIMIZE_BATCH_TASK]
        entries: list[dict[str, Any]] = task.apply(
            kwargs={"model": ALIAS, "params": params or PARAMS, "items": [{"prompt": PROMPT}]}
        ).get()
        return entries

    def point(self, version: RegisteredVersion) -> None:
        self.registry.aliases[ALIAS] = version

    def tick(self, seconds: float = 5.0) -> None:
        self.clock.now += seconds


@pytest.fixture
def setup() -> Iterator[Setup]:
    built = Setup({ALIAS: V1})
    yield built
    built.holder.close()


def versions_of(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(entry["result"]["model"], entry["result"]["model_version"]) for entry in entries]


def test_an_alias_is_served_by_the_version_it_points_at(setup: Setup) -> None:
    setup.holder.load_all()
    assert setup.loader.version_loads == ["v1"]
    assert setup.loader.catalogue_loads == []
    assert setup.holder.serving_version(ALIAS) == V1
    assert versions_of(setup.batch()) == [("bpo-smollm2", "v1")]
    assert setup.loader.version_loads == ["v1"]


def test_the_registry_is_asked_at_most_once_per_interval(setup: Setup) -> None:
    setup.holder.load_all()
    for _ in range(5):
        setup.holder.get(ALIAS)
    assert setup.registry.lookups == 1
    setup.tick(4.9)
    setup.holder.get(ALIAS)
    assert setup.registry.lookups == 1
    setup.tick(0.2)
    setup.holder.get(ALIAS)
    assert setup.registry.lookups == 2


def test_a_newly_registered_version_is_served_from_the_next_batch_on(setup: Setup) -> None:
    assert versions_of(setup.batch()) == [("bpo-smollm2", "v1")]
    setup.point(V2)
    # Within the interval the worker has not looked yet: still the old version, nothing reloaded.
    assert versions_of(setup.batch()) == [("bpo-smollm2", "v1")]
    setup.tick()
    entries = setup.batch()
    assert versions_of(entries) == [("bpo-smollm2", "v2")]
    assert "(v2)" in entries[0]["result"]["optimized"]
    assert setup.loader.version_loads == ["v1", "v2"]
    assert setup.loader.engines["v1"].closed and not setup.loader.engines["v2"].closed
    assert setup.metrics.engine_replicas.labels(ALIAS)._value.get() == 1


def test_a_batch_in_flight_finishes_on_the_version_it_started_with(setup: Setup) -> None:
    setup.holder.load_all()
    v1 = setup.loader.engines["v1"]

    def training_job_registers_v2() -> None:
        setup.point(V2)
        setup.tick(60)

    v1.on_batch.append(training_job_registers_v2)
    # Two rounds: the engine is called twice within the one batch, after the alias has moved.
    entries = setup.batch(PARAMS | {"rounds": 2})
    assert versions_of(entries) == [("bpo-smollm2", "v1")]
    assert len(v1.batches) == 2
    assert setup.loader.version_loads == ["v1"]
    v1.on_batch.clear()
    assert versions_of(setup.batch()) == [("bpo-smollm2", "v2")]
    assert v1.closed


def test_a_version_that_fails_to_load_is_skipped_and_the_loaded_one_keeps_serving() -> None:
    setup = Setup({ALIAS: V1}, failing={"v2"})
    setup.holder.load_all()
    setup.point(V2)
    for _ in range(3):
        setup.tick()
        assert versions_of(setup.batch()) == [("bpo-smollm2", "v1")]
    # Tried once, not on every check: a failing load would stall every batch for its duration.
    assert setup.loader.version_loads == ["v1", "v2"]
    assert not setup.loader.engines["v1"].closed
    setup.point(V3)
    setup.tick()
    assert versions_of(setup.batch()) == [("bpo-smollm2", "v3")]


def test_the_registry_being_unreachable_keeps_the_loaded_version(setup: Setup) -> None:
    setup.holder.load_all()
    setup.registry.down = True
    setup.tick()
    assert versions_of(setup.batch()) == [("bpo-smollm2", "v1")]
    setup.registry.down = False
    setup.point(V2)
    setup.tick()
    assert versions_of(setup.batch()) == [("bpo-smollm2", "v2")]


def test_an_alias_registered_after_start_replaces_a_failed_load() -> None:
    setup = Setup({})
    setup.holder.load_all()
    assert setup.loader.catalogue_loads == [ALIAS]
    with pytest.raises(EngineUnavailableError, match="unknown model"):
        setup.holder.get(ALIAS)
    setup.point(V1)
    setup.tick()
    assert setup.holder.get(ALIAS).engine.identity == ModelIdentity("bpo-smollm2", "v1")


def test_a_catalogue_model_is_served_as_before_when_no_alias_has_its_name() -> None:
    registry = FakeRegistry({})
    engine = FakeEngine({PROMPT: "x"})

    class CatalogueLoader(FakeLoader):
        def load(self, model: str) -> LoadedModel:
            self.catalogue_loads.append(model)
            return LoadedModel(engine, PromptStyle.CHAT_INSTRUCTION)

    loader = CatalogueLoader()
    holder = EngineHolder(["qwen"], loader, None, AliasWatch(registry, loader, clock=Clock()))
    holder.prepare()
    holder.load_all()
    assert loader.prepared == ["qwen"] and loader.catalogue_loads == ["qwen"]
    assert holder.get("qwen").engine is engine
    assert holder.serving_version("qwen") is None


def test_prepare_skips_aliases_and_drops_the_registry_connection_before_the_fork() -> None:
    setup = Setup({ALIAS: V1})
    setup.holder.prepare()
    assert setup.loader.prepared == []
    assert setup.registry.closed == 1


def test_workers_follow_aliases_only_when_the_platform_has_a_database(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = FakeLoader()
    without = WorkerSettings.model_validate({"models": [ALIAS]})
    assert alias_watch_for(without, loader) is None
    monkeypatch.setenv("BPO_PLATFORM__DATABASE_URL", "postgresql://127.0.0.1:1/none")
    monkeypatch.setenv("BPO_WORKER_ALIAS_CHECK_INTERVAL_S", "2.5")
    watch = alias_watch_for(WorkerSettings(), loader)
    assert watch is not None
    assert isinstance(watch.source, RegistryAliases)
    assert watch.check_interval_s == 2.5


@pytest.mark.parametrize(("engine", "expected"), [("llamacpp", "bpo-smollm2.gguf"), ("transformers", "bpo-smollm2")])
def test_a_version_is_loaded_from_its_runs_file_for_the_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, engine: str, expected: str
) -> None:
    monkeypatch.setenv("BPO_ENGINE__NAME", engine)
    loader = CatalogueEngineLoader(WorkerSettings.model_validate({"models": [ALIAS]}))
    with pytest.raises(ModelNotFoundError, match=f"has no {expected} in {tmp_path}"):
        loader.load_version(RegisteredVersion("bpo-smollm2", "v1", str(tmp_path)))


def test_an_openai_engine_cannot_serve_a_registered_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BPO_ENGINE__NAME", "openai")
    monkeypatch.setenv("BPO_ENGINE__OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    loader = CatalogueEngineLoader(WorkerSettings.model_validate({"models": [ALIAS]}))
    with pytest.raises(InvalidConfigurationError, match="in-process engines"):
        loader.load_version(V1)
