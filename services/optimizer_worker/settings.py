"""Settings of an optimizer worker, read once per process from ``BPO_WORKER_*`` (plus the platform's ``BPO_*``).

    BPO_WORKER_BROKER_URL               Redis URL of the Celery broker
    BPO_WORKER_RESULT_BACKEND           Redis URL of the result backend (default: the broker's)
    BPO_WORKER_MODELS                   optimizer models served: JSON list or comma-separated names
    BPO_WORKER_CONCURRENCY              prefork processes, each holding one engine replica per model
    BPO_WORKER_VISIBILITY_TIMEOUT_S     seconds before an unacknowledged task is handed to another worker
    BPO_WORKER_TASK_TIME_LIMIT_S        hard limit of one task; the process running it is replaced
    BPO_WORKER_MAX_RETRIES              retries of a batch whose engine was unavailable
    BPO_WORKER_RETRY_BACKOFF_S          first retry delay (doubles each retry, full jitter)
    BPO_WORKER_RETRY_BACKOFF_MAX_S      cap on one retry delay
    BPO_WORKER_RESULT_EXPIRES_S         how long a batch result stays fetchable (and dedupes a re-sent task id)
    BPO_WORKER_UNACKED_RESTORE_INTERVAL_S  how often a worker looks for tasks whose visibility timeout ran out
    BPO_WORKER_ENGINE_LOAD_TIMEOUT_S    how long a new process may take to load its engines
    BPO_WORKER_METRICS_PORT             Prometheus port of the worker (0 = no metrics endpoint)
    BPO_WORKER_METRICS_HOST             address the metrics endpoint binds
    BPO_WORKER_LOG_LEVEL                Celery worker log level
    BPO_WORKER_ALIAS_CHECK_INTERVAL_S   how often (at most) a process looks up a served alias such as ``latest``
                                        in the model registry (needs BPO_PLATFORM__DATABASE_URL)
    BPO_WORKER_SCHEMA_WAIT_S            how long a starting worker waits for the database migrations before
                                        giving up with an error (it reads the registry, never migrates)
    BPO_WORKER_SOFT_SHUTDOWN_S          on shutdown, how long a running batch may finish before it is requeued

The engine each process loads (engine name, threads, context length, state directory) comes from the platform's
own ``BpoSettings`` (``BPO_ENGINE__*``, ``BPO_STATE_DIR``); only the model name is taken from ``models``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bpo.settings import DEFAULT_MODEL, BpoSettings, EngineSettings

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BPO_WORKER_", extra="ignore", validate_default=True)

    broker_url: str = DEFAULT_REDIS_URL
    # Empty means "the broker's URL": one Redis serves both unless told otherwise.
    result_backend: str = ""
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [DEFAULT_MODEL], min_length=1)
    concurrency: int = Field(default=1, ge=1)
    # The Redis transport has no broker-side acknowledgement: a delivered task sits in an "unacked" set and is
    # handed out again once this many seconds pass without an ack. It must outlast the longest a delivered task
    # can stay unacknowledged, or a task still running is started a second time elsewhere: a retry waits out
    # its countdown in the worker, then may wait for the task running ahead of it, then runs itself. Its cost
    # is recovery time: a task whose whole worker died is redone only after this timeout, so production takes
    # an hour and tests half a minute.
    visibility_timeout_s: int = Field(default=3600, ge=1)
    task_time_limit_s: int = Field(default=1500, ge=1)
    max_retries: int = Field(default=3, ge=0)
    retry_backoff_s: int = Field(default=2, ge=0)
    retry_backoff_max_s: int = Field(default=120, ge=0)
    result_expires_s: int = Field(default=86_400, ge=1)
    unacked_restore_interval_s: int = Field(default=30, ge=1)
    engine_load_timeout_s: float = Field(default=900.0, gt=0)
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    # One indexed lookup per served alias and process at most this often, made before a batch starts.
    alias_check_interval_s: float = Field(default=5.0, gt=0)
    schema_wait_s: float = Field(default=120.0, ge=0)
    # Shorter than what the supervisor (40 s) and Kubernetes (terminationGracePeriodSeconds) wait before killing.
    soft_shutdown_s: float = Field(default=25.0, ge=0)
    platform: BpoSettings = Field(default_factory=BpoSettings)

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _queue_safe_names(cls, value: list[str]) -> list[str]:
        for name in value:
            # Queue names reach ``celery worker -Q`` as a comma-separated list.
            if not name or "," in name or any(ch.isspace() for ch in name):
                raise ValueError(f"model name {name!r} cannot name a queue (empty, or has a comma or whitespace)")
        if len(set(value)) != len(value):
            raise ValueError(f"models lists a name twice: {value}")
        return value

    @model_validator(mode="after")
    def _timeouts_are_consistent(self) -> WorkerSettings:
        if self.visibility_timeout_s <= self.longest_unacked_s:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed 2 * task_time_limit_s "
                f"({self.task_time_limit_s}) + retry_backoff_max_s ({self.retry_backoff_max_s}), or a running "
                "or waiting task is redelivered and runs twice"
            )
        if self.unacked_restore_interval_s > self.visibility_timeout_s:
            raise ValueError("unacked_restore_interval_s must not exceed visibility_timeout_s")
        return self

    @classmethod
    def for_platform(cls, settings: BpoSettings) -> WorkerSettings:
        """The settings of the platform's own workers: its Redis and its optimizer model, unless ``BPO_WORKER_*``
        names others."""
        from_env = cls(platform=settings)
        values = from_env.model_dump() | {"platform": settings}
        if "broker_url" not in from_env.model_fields_set and settings.platform.redis_url:
            values["broker_url"] = settings.platform.redis_url
        if "models" not in from_env.model_fields_set:
            values["models"] = [settings.platform.optimizer_model]
        return cls.model_validate(values)

    @property
    def longest_unacked_s(self) -> int:
        """The longest a delivered task stays unacknowledged: its retry countdown, the task running ahead of it
        in the same process, and its own run."""
        return self.retry_backoff_max_s + 2 * self.task_time_limit_s

    @property
    def resolved_result_backend(self) -> str:
        return self.result_backend or self.broker_url

    def engine_settings_for(self, model: str) -> EngineSettings:
        """The engine that serves ``model``: a declared optimizer endpoint's own (bpo/endpoints.py), else the
        platform's engine settings with this model (a registered optimizer, an alias); with the cores shared
        among the worker's processes."""
        from bpo.endpoints import Endpoints

        endpoints = Endpoints.from_settings(self.platform)
        if model in endpoints.names() and "optimizer" in endpoints.get(model).roles:
            engine = endpoints.engine_settings(endpoints.get(model))
            update: dict[str, Any] = {}
        else:
            engine = self.platform.engine
            update = {"model": model}
        if engine.threads == 0:
            # Every process holds its own replica; all of them taking every core would oversubscribe the CPU.
            update["threads"] = max(1, engine.resolved_threads() // self.concurrency)
        return engine.model_copy(update=update)
