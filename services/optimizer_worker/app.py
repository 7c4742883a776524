"""The Celery app of the optimizer workers, and the per-process holder of their engines.

Delivery guarantees, and why each setting is there:

* ``task_acks_late``: a task is acknowledged after it ran, so a worker that dies mid-batch does not lose it.
* ``task_reject_on_worker_lost``: when a pool process dies (OOM, segfault in the engine) the parent puts its task
  back at once instead of marking it failed; with ``task_retry_on_worker_lost`` it goes back as a counted retry,
  so a batch that kills every process it runs in fails after ``max_retries`` instead of looping.
* ``worker_prefetch_multiplier=1``: a process reserves one batch at a time; a batch waiting behind a long one in
  a busy worker would wait for nothing while other workers idle.
* ``visibility_timeout`` (Redis transport): when the whole worker dies, nobody is left to put its task back;
  Redis hands it out again after this timeout, which therefore outlasts the longest a task can stay
  unacknowledged (``WorkerSettings.longest_unacked_s``).
  ``unacked_restore_interval`` with a throttle of 1 makes every worker sweep for such tasks at that interval.
* ``worker_cancel_long_running_tasks_on_connection_loss``: after a broker reconnect the running task's ack can
  no longer reach the broker and the task will be redelivered, so finishing the first copy is wasted work.
* ``task_track_started``: clients can tell "queued, no worker yet" from "running" when they time out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
from celery import Celery, current_app  # type: ignore[import-untyped]
from celery.signals import worker_process_init, worker_process_shutdown  # type: ignore[import-untyped]

from bpo.engines.base import EngineClient
from bpo.engines.factory import build_engine, resolve_spec
from bpo.engines.observer import EndpointObserver
from bpo.errors import EngineUnavailableError, InvalidConfigurationError, ModelNotFoundError
from bpo.models.catalogue import ModelCatalogue, ModelSpec, PromptStyle, SourceKind
from bpo.models.prepare import ModelPreparer
from services.optimizer_worker.generation_tasks import GENERATE_BATCH_TASK, register_generation_tasks
from services.optimizer_worker.metrics import WorkerMetrics, mark_process_dead
from services.optimizer_worker.settings import WorkerSettings
from services.optimizer_worker.tasks import OPTIMIZE_BATCH_TASK, register_tasks

log = logging.getLogger(__name__)

T = TypeVar("T")

QUEUE_PREFIX = "optimizer."


def queue_for_model(model: str) -> str:
    return f"{QUEUE_PREFIX}{model}"


def route_task(name: str, args: Sequence[Any], kwargs: dict[str, Any], options: dict[str, Any], **_: Any) -> Any:
    """Celery router: an optimize or generate task goes to its model's queue, whoever sends it and however."""
    if name not in (OPTIMIZE_BATCH_TASK, GENERATE_BATCH_TASK):
        return None
    model = kwargs.get("model", args[0] if args else None)
    if not isinstance(model, str):
        return None
    return {"queue": queue_for_model(model)}


@dataclass(frozen=True, slots=True)
class LoadedModel:
    engine: EngineClient
    prompt_style: PromptStyle


class EngineLoader(Protocol):
    def prepare(self, model: str) -> None:
        """Make the weights ready on disk (assemble, verify, convert); run once before processes start."""

    def load(self, model: str) -> LoadedModel:
        """Load one engine replica into the calling process."""


@dataclass(frozen=True, slots=True)
class RegisteredVersion:
    """A registered optimizer version an alias points at; ``location`` is its training run's folder."""

    name: str
    version: str
    location: str


class AliasSource(Protocol):
    def resolve(self, alias: str) -> RegisteredVersion | None:
        """The version ``alias`` points at now, or None when there is no such alias."""

    def close(self) -> None:
        """Drop any connection (called in the worker's parent before it forks its pool processes)."""


class VersionLoader(Protocol):
    def load_version(self, version: RegisteredVersion) -> LoadedModel:
        """Load one engine replica of a registered version into the calling process."""


@dataclass(frozen=True, slots=True)
class AliasWatch:
    """How a holder follows aliases: where it looks them up, how it loads a version, and how often it looks."""

    source: AliasSource
    loader: VersionLoader
    check_interval_s: float = 5.0
    clock: Callable[[], float] = field(default=time.monotonic)


class RegistryAliases:
    """Aliases from the platform's model registry (``model_aliases`` joined to ``model_registry``), and the names
    of registered optimizers, each of which follows its newest version as an alias would.

    One connection per process, opened on first use: a libpq connection must not cross a fork, and a pool
    process that inherited one would share its socket with every sibling."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._pid = 0

    def resolve(self, alias: str) -> RegisteredVersion | None:
        if self._conn is None or self._conn.closed or self._pid != os.getpid():
            self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
            self._pid = os.getpid()
        try:
            # An alias first; else a registered optimizer's own name, which stands for its newest version.
            row = self._conn.execute(
                "SELECT name, version, source FROM ("
                " SELECT 0 AS rank, a.name, a.version, r.source, r.created_at FROM model_aliases a"
                " JOIN model_registry r ON r.name = a.name AND r.version = a.version WHERE a.alias = %s"
                " UNION ALL SELECT 1, name, version, source, created_at FROM model_registry WHERE name = %s"
                ") AS found ORDER BY rank, created_at DESC LIMIT 1",
                (alias, alias),
            ).fetchone()
        except psycopg.Error:
            # A broken connection is replaced on the next check instead of failing every later one.
            self.close()
            raise
        return RegisteredVersion(*row) if row is not None else None

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


class CatalogueEngineLoader:
    """Loads the platform's engine (``BPO_ENGINE__*``) for a catalogue model, a local path or a hub id."""

    def __init__(
        self,
        settings: WorkerSettings,
        catalogue: ModelCatalogue | None = None,
        preparer: ModelPreparer | None = None,
        observe: Callable[[str], EndpointObserver] | None = None,
    ) -> None:
        self._settings = settings
        self._catalogue = catalogue or ModelCatalogue()
        self._preparer = preparer or ModelPreparer(settings.platform.models_dir)
        # The observer of a remote endpoint's requests, by the served model's name (metrics).
        self._observe = observe

    def _observer(self, model: str) -> EndpointObserver | None:
        return self._observe(model) if self._observe is not None else None

    def prepare(self, model: str) -> None:
        engine_settings = self._settings.engine_settings_for(model)
        spec = resolve_spec(engine_settings, self._catalogue)
        if engine_settings.name == "llamacpp":
            self._preparer.gguf_path(spec)
        elif engine_settings.name in ("vllm", "transformers"):
            self._preparer.hf_folder(spec)

    def load(self, model: str) -> LoadedModel:
        engine_settings = self._settings.engine_settings_for(model)
        spec = resolve_spec(engine_settings, self._catalogue)
        engine = build_engine(engine_settings, spec, self._preparer, self._observer(model))
        return LoadedModel(engine, spec.prompt_style)

    def load_version(self, version: RegisteredVersion) -> LoadedModel:
        """A training run's own files: its GGUF for llamacpp, its merged Hugging Face folder for the others."""
        engine_settings = self._settings.engine_settings_for(version.name)
        if engine_settings.name == "openai":
            raise InvalidConfigurationError("registered versions are served by in-process engines, not 'openai'")
        run = Path(version.location)
        path = run / f"{version.name}.gguf" if engine_settings.name == "llamacpp" else run / version.name
        if not path.exists():
            raise ModelNotFoundError(
                f"{version.name} version {version.version} has no {path.name} in {run} for the "
                f"{engine_settings.name} engine"
            )
        spec = ModelSpec(
            name=version.name,
            description=f"{version.name} version {version.version}",
            source=SourceKind.LOCAL_PATH,
            prompt_style=PromptStyle.BPO_TEMPLATE,
            licence="as its base model's",
            local_path=path,
        )
        engine = build_engine(engine_settings, spec, self._preparer, self._observer(version.name))
        if engine.identity.version != version.version:
            raise ModelNotFoundError(
                f"{path} holds version {engine.identity.version}, but the registry says {version.version}"
            )
        return LoadedModel(engine, spec.prompt_style)


def alias_watch_for(settings: WorkerSettings, loader: VersionLoader) -> AliasWatch | None:
    """Workers follow registry aliases when the platform has a database; without one there is nothing to follow."""
    url = settings.platform.platform.database_url
    if not url:
        return None
    return AliasWatch(RegistryAliases(url), loader, settings.alias_check_interval_s)


class EngineHolder:
    """The engines of one worker process, one replica per served model, and the event loop they run on.

    Loaded once when a pool process starts (``worker_process_init``), or on first use under a pool that sends no
    such signal. One loop lives as long as the process because engines may bind resources to the loop they first
    ran on (the OpenAI client's connection pool): a fresh loop per task would strand them. Used from the pool
    process's single task thread only.

    A served name that is a registry alias (``latest``) is followed: before a batch, at most once per
    ``check_interval_s``, the holder looks the alias up and, when it points at another version, loads that one
    and closes the old engine. A batch holds the engine it got from ``get`` until it ends, and the switch only
    happens in ``get`` at the start of the next one, so a batch always finishes on the version it started with;
    each result names the version that wrote it (the engine's identity). A version that fails to load is logged
    and skipped until the alias moves again, and the previous version keeps serving.
    """

    def __init__(
        self,
        models: Sequence[str],
        loader: EngineLoader,
        metrics: WorkerMetrics | None = None,
        aliases: AliasWatch | None = None,
    ) -> None:
        self.models = tuple(models)
        self._loader = loader
        self._metrics = metrics
        self._aliases = aliases
        self._loaded: dict[str, LoadedModel] = {}
        self._load_errors: dict[str, str] = {}
        self._versions: dict[str, RegisteredVersion] = {}
        self._failed_versions: dict[str, RegisteredVersion] = {}
        self._checked_at: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def prepare(self) -> None:
        try:
            for model in self.models:
                # A registered version is a training run's finished files: nothing to assemble or convert.
                if self._aliases is None or self._lookup(model) is None:
                    self._loader.prepare(model)
        finally:
            if self._aliases is not None:
                self._aliases.source.close()

    def load_all(self) -> None:
        for model in self.models:
            self._follow_alias(model)
            self._load(model)

    def serving_version(self, model: str) -> RegisteredVersion | None:
        """The registered version an alias is served by in this process now (None for a catalogue model)."""
        return self._versions.get(model)

    def get(self, model: str) -> LoadedModel:
        if model not in self.models:
            raise ModelNotFoundError(f"this worker serves {', '.join(self.models)}, not {model!r}")
        self._follow_alias(model)
        loaded = self._loaded.get(model) or self._load(model)
        if loaded is None:
            raise EngineUnavailableError(
                f"the engine for {model} failed to load in this worker process: {self._load_errors[model]}"
            )
        return loaded

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coroutine)

    def close(self) -> None:
        loaded, self._loaded = self._loaded, {}
        for model, item in loaded.items():
            try:
                self.run(item.engine.aclose())
            except Exception:
                log.exception("closing the engine of %s failed", model)
            if self._metrics is not None:
                self._metrics.engine_replicas.labels(model).dec()
                self._metrics.model_version.labels(model, item.engine.identity.version).dec()
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def _lookup(self, model: str) -> RegisteredVersion | None:
        assert self._aliases is not None
        try:
            return self._aliases.source.resolve(model)
        except Exception:
            # The registry being away must not stop serving: the loaded version goes on until it is back.
            log.warning("looking up alias %s failed; keeping the loaded version", model, exc_info=True)
            return None

    def _follow_alias(self, model: str) -> None:
        watch = self._aliases
        if watch is None:
            return
        now = watch.clock()
        last = self._checked_at.get(model)
        if last is not None and now - last < watch.check_interval_s:
            return
        self._checked_at[model] = now
        target = self._lookup(model)
        if target is None or target == self._versions.get(model) or target == self._failed_versions.get(model):
            return
        self._switch(model, target, watch.loader)

    def _switch(self, model: str, target: RegisteredVersion, loader: VersionLoader) -> None:
        with self._lock:
            started = time.perf_counter()
            try:
                loaded = loader.load_version(target)
            except Exception as exc:
                log.exception("loading %s version %s for %s failed", target.name, target.version, model)
                self._failed_versions[model] = target
                if model not in self._loaded:
                    self._load_errors[model] = f"{type(exc).__name__}: {exc}"
                return
            elapsed = time.perf_counter() - started
            previous = self._loaded.get(model)
            was = self._versions.get(model)
            self._loaded[model] = loaded
            self._versions[model] = target
            self._load_errors.pop(model, None)
            self._failed_versions.pop(model, None)
        log.info(
            "%s now served by %s version %s (was %s), loaded in %.1fs",
            model, target.name, target.version, f"{was.name}@{was.version}" if was else "none", elapsed,
        )  # fmt: skip
        if self._metrics is not None:
            self._metrics.engine_load_seconds.labels(model).observe(elapsed)
            self._metrics.model_version.labels(model, loaded.engine.identity.version).inc()
            if previous is None:
                self._metrics.engine_replicas.labels(model).inc()
            else:
                self._metrics.model_version.labels(model, previous.engine.identity.version).dec()
        if previous is not None:
            try:
                self.run(previous.engine.aclose())
            except Exception:
                log.exception("closing the previous engine of %s failed", model)

    def _load(self, model: str) -> LoadedModel | None:
        with self._lock:
            if model in self._loaded:
                return self._loaded[model]
            if model in self._load_errors:
                # A load that failed once fails again for the same reason; retrying it per task would stall
                # every task for the load's duration.
                return None
            started = time.perf_counter()
            try:
                loaded = self._loader.load(model)
            except Exception as exc:
                log.exception("loading the engine for %s failed", model)
                self._load_errors[model] = f"{type(exc).__name__}: {exc}"
                return None
            elapsed = time.perf_counter() - started
            self._loaded[model] = loaded
            log.info("engine for %s loaded in %.1fs", model, elapsed)
            if self._metrics is not None:
                self._metrics.engine_load_seconds.labels(model).observe(elapsed)
                self._metrics.engine_replicas.labels(model).inc()
                self._metrics.model_version.labels(model, loaded.engine.identity.version).inc()
            return loaded


class RedactTaskPayloads(logging.Filter):
    """Celery logs each task's arguments and return value with its success line: here those are users' prompts
    and their rewrites, which do not belong in logs. The line stays, without them."""

    REDACTED = "<redacted>"

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict):
            record.args = {
                key: (self.REDACTED if key in ("return_value", "args", "kwargs") else value)
                for key, value in record.args.items()
            }
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            record.data = {
                k: (self.REDACTED if k in ("return_value", "args", "kwargs") else v) for k, v in data.items()
            }
        return True


def redact_task_logs() -> None:
    """Install the redaction on Celery's task-trace logger (idempotent)."""
    trace_logger = logging.getLogger("celery.app.trace")
    if not any(isinstance(f, RedactTaskPayloads) for f in trace_logger.filters):
        trace_logger.addFilter(RedactTaskPayloads())


def make_celery_app(
    settings: WorkerSettings,
    engines: EngineHolder | None = None,
    metrics: WorkerMetrics | None = None,
) -> Celery:
    """The app both workers and clients use. Workers load ``engines`` in each pool process as it starts."""
    metrics = metrics or WorkerMetrics()
    if engines is None:
        loader = CatalogueEngineLoader(settings)
        engines = EngineHolder(settings.models, loader, metrics, alias_watch_for(settings, loader))
    app = Celery("bpo-optimizer", broker=settings.broker_url, backend=settings.resolved_result_backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A batch that kills its pool process every time (say, out of memory) would be requeued forever by the
        # rejection alone; retrying instead counts the attempt against max_retries (rejection remains the
        # fallback when the retry cannot be sent).
        task_retry_on_worker_lost=True,
        # A task past its hard time limit failed for good: requeueing it would only hit the limit again.
        task_acks_on_failure_or_timeout=True,
        task_track_started=True,
        task_time_limit=settings.task_time_limit_s,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # A pool process reports itself up only after its engines loaded; Celery's default of 4 s would have
        # the parent give up on any real model.
        worker_proc_alive_timeout=settings.engine_load_timeout_s,
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,
            # A worker killed mid-sweep leaves the sweep's lock behind until it expires, delaying every other
            # worker's recovery by as much: a fraction of the visibility timeout (Celery's five minutes at most).
            "unacked_mutex_expire": min(300, max(5, settings.visibility_timeout_s // 4)),
            "socket_connect_timeout": 5,
            # Bounds a publish or poll on a half-open connection (broker failover); BRPOP itself waits 1 s.
            "socket_timeout": 30,
            "socket_keepalive": True,
        },
        redis_socket_connect_timeout=5,
        # Losing a finished batch's result to a Redis blip would redo the whole batch on the next delivery.
        result_backend_always_retry=True,
        result_backend_max_retries=10,
        result_expires=settings.result_expires_s,
        task_routes=(route_task,),
        # On shutdown (SIGTERM is remapped to the cold shutdown by the supervisor and the manifests), a running
        # batch gets this long to finish; then it is put back on its queue for the next worker (late acks).
        worker_soft_shutdown_timeout=settings.soft_shutdown_s,
    )
    redact_task_logs()
    register_tasks(app, engines, metrics, settings)
    register_generation_tasks(app, engines, metrics, settings)

    def load_engines(**_: Any) -> None:
        # Signals are process-wide: only the app this worker process runs should load its engines.
        if current_app._get_current_object() is app:
            engines.load_all()

    def close_engines(pid: int | None = None, **_: Any) -> None:
        if current_app._get_current_object() is app:
            engines.close()
            if pid is not None:
                mark_process_dead(pid)

    worker_process_init.connect(load_engines, weak=False)
    worker_process_shutdown.connect(close_engines, weak=False)
    return app
