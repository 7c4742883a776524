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
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from celery import Celery, current_app  # type: ignore[import-untyped]
from celery.signals import worker_process_init, worker_process_shutdown  # type: ignore[import-untyped]

from bpo.engines.base import EngineClient
from bpo.engines.factory import build_engine, resolve_spec
from bpo.errors import EngineUnavailableError, ModelNotFoundError
from bpo.models.catalogue import ModelCatalogue, PromptStyle
from bpo.models.prepare import ModelPreparer
from services.optimizer_worker.metrics import WorkerMetrics, mark_process_dead
from services.optimizer_worker.settings import WorkerSettings
from services.optimizer_worker.tasks import OPTIMIZE_BATCH_TASK, register_tasks

log = logging.getLogger(__name__)

T = TypeVar("T")

QUEUE_PREFIX = "optimizer."


def queue_for_model(model: str) -> str:
    return f"{QUEUE_PREFIX}{model}"


def route_task(name: str, args: Sequence[Any], kwargs: dict[str, Any], options: dict[str, Any], **_: Any) -> Any:
    """Celery router: an optimize task goes to its model's queue, whoever sends it and however."""
    if name != OPTIMIZE_BATCH_TASK:
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


class CatalogueEngineLoader:
    """Loads the platform's engine (``BPO_ENGINE__*``) for a catalogue model, a local path or a hub id."""

    def __init__(
        self,
        settings: WorkerSettings,
        catalogue: ModelCatalogue | None = None,
        preparer: ModelPreparer | None = None,
    ) -> None:
        self._settings = settings
        self._catalogue = catalogue or ModelCatalogue()
        self._preparer = preparer or ModelPreparer(settings.platform.models_dir)

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
        return LoadedModel(build_engine(engine_settings, spec, self._preparer), spec.prompt_style)


class EngineHolder:
    """The engines of one worker process, one replica per served model, and the event loop they run on.

    Loaded once when a pool process starts (``worker_process_init``), or on first use under a pool that sends no
    such signal. One loop lives as long as the process because engines may bind resources to the loop they first
    ran on (the OpenAI client's connection pool): a fresh loop per task would strand them. Used from the pool
    process's single task thread only.
    """

    def __init__(self, models: Sequence[str], loader: EngineLoader, metrics: WorkerMetrics | None = None) -> None:
        self.models = tuple(models)
        self._loader = loader
        self._metrics = metrics
        self._loaded: dict[str, LoadedModel] = {}
        self._load_errors: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def prepare(self) -> None:
        for model in self.models:
            self._loader.prepare(model)

    def load_all(self) -> None:
        for model in self.models:
            self._load(model)

    def get(self, model: str) -> LoadedModel:
        if model not in self.models:
            raise ModelNotFoundError(f"this worker serves {', '.join(self.models)}, not {model!r}")
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
        if self._loop is not None:
            self._loop.close()
            self._loop = None

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
            return loaded


def make_celery_app(
    settings: WorkerSettings,
    engines: EngineHolder | None = None,
    metrics: WorkerMetrics | None = None,
) -> Celery:
    """The app both workers and clients use. Workers load ``engines`` in each pool process as it starts."""
    metrics = metrics or WorkerMetrics()
    engines = engines or EngineHolder(settings.models, CatalogueEngineLoader(settings), metrics)
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
    )
    register_tasks(app, engines, metrics, settings)

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
