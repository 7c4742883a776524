"""The one typed settings object a process reads once at start.

Every environment variable the platform reads is declared here and nowhere else: pydantic-settings maps
``BPO_<FIELD>`` and ``BPO_<SECTION>__<FIELD>`` onto the fields below, so this module is the full list.

    BPO_STATE_DIR                       where prepared models and other caches live
    BPO_ENGINE__NAME                    llamacpp | vllm | openai | transformers
    BPO_ENGINE__MODEL                   a catalogue name, a local GGUF file or HF folder, or a hub id
    BPO_ENGINE__THREADS                 CPU threads for in-process engines (0 = all cores)
    BPO_ENGINE__CONTEXT_LENGTH          context window the engine is opened with
    BPO_ENGINE__OPENAI_BASE_URL         endpoint for the openai engine (OpenAI, vLLM or llama.cpp server)
    BPO_ENGINE__OPENAI_API_KEY          its key (also read from OPENAI_API_KEY when unset)
    BPO_ENGINE__OPENAI_MODEL            the model name the endpoint serves (default: BPO_ENGINE__MODEL), sent as is
    BPO_ENGINE__OPENAI_PROMPT_STYLE     chat_instruction (default) | bpo_template (the endpoint serves a BPO-trained
                                        optimizer, e.g. vLLM serving THUDM/BPO: the paper's template is used)
    BPO_ENGINE__OPENAI_EXTRA_BODY       JSON object of server-specific sampling fields, e.g. '{"repeat_penalty": 1.0}'
                                        (llama.cpp's server applies a repeat penalty of 1.1 unless told otherwise)
    BPO_ENGINE__MAX_CONCURRENCY         requests in flight at once against an endpoint
    BPO_ENGINE__REQUESTS_PER_SECOND     request rate limit against an endpoint, retries included (0 = unlimited)
    BPO_ENGINE__REQUEST_TIMEOUT_S       per-request timeout
    BPO_ENGINE__MAX_ATTEMPTS            attempts per request, the first included
    BPO_ENGINE__RETRY_BASE_DELAY_S      first back-off delay (doubles each retry, with full jitter)
    BPO_ENGINE__RETRY_MAX_DELAY_S       cap on one back-off delay
    BPO_ENGINE__DEVICE                  cpu | cuda | auto, for transformers
    BPO_ENGINE__DTYPE                   auto | float32 | bfloat16 | float16, for transformers and vllm
    BPO_ENGINE__VLLM_KV_CACHE_GIB       KV-cache size for vLLM on CPU
    BPO_ENGINE__VLLM_GPU_MEMORY_UTILIZATION  fraction of GPU memory vLLM may take
    BPO_OPTIMIZER__TEMPERATURE / TOP_P / MAX_NEW_TOKENS / ROUNDS / SEED / BATCH_SIZE

Platform (the distributed pipeline); an empty URL means "start an embedded one under the state directory":
    BPO_PLATFORM__DATABASE_URL          postgresql://... (Postgres, the source of truth)
    BPO_PLATFORM__KAFKA_BOOTSTRAP       host:port of a Kafka cluster
    BPO_PLATFORM__REDIS_URL             redis://... (Celery broker and result backend)
    BPO_PLATFORM__TOPIC_PREFIX          prefix of every topic name
    BPO_PLATFORM__HOST                  address the services bind and are reached at
    BPO_PLATFORM__JOBS_PORT / OPTIMIZER_PORT / GENERATOR_PORT / JUDGE_PORT   gRPC ports
    BPO_PLATFORM__METRICS_PORT_BASE     first of the Prometheus ports (one per process, counting up)
    BPO_PLATFORM__METRICS_HOST          address the services' metrics endpoints bind (default 127.0.0.1)
    BPO_PLATFORM__OPTIMIZER_MODEL       default optimizer model of jobs and of the Optimizer service
    BPO_PLATFORM__TARGET_ENGINE / TARGET_MODEL / JUDGE_ENGINE / JUDGE_MODEL   defaults for jobs
    BPO_PLATFORM__STAGE_BATCH_SIZE      messages a stage takes from its topic at once
    BPO_PLATFORM__WORKER_TIMEOUT_S      how long a stage waits for an optimizer worker's batch
    BPO_PLATFORM__EMBEDDED_POSTGRES_PORT / EMBEDDED_REDIS_PORT / EMBEDDED_KAFKA_PORT   ports `bpo up` uses
    BPO_PLATFORM__WORKERS               optimizer worker processes `bpo up` starts (one engine replica each)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from bpo.optimizer.optimizer import OptimizeParams

EngineName = Literal["llamacpp", "vllm", "openai", "transformers"]
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def _default_state_dir() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "bpo"


class EngineSettings(BaseModel):
    """Which inference engine runs which model, and how it reaches the hardware or endpoint."""

    name: EngineName = "llamacpp"
    model: str = DEFAULT_MODEL
    threads: int = Field(default=0, ge=0)
    context_length: int = Field(default=4096, ge=256)
    openai_base_url: str | None = None
    openai_api_key: SecretStr | None = None
    openai_model: str | None = None
    # Remote models are driven through their chat template unless the endpoint serves a BPO-trained optimizer,
    # which expects the paper's raw template.
    openai_prompt_style: Literal["chat_instruction", "bpo_template"] = "chat_instruction"
    openai_extra_body: dict[str, Any] = Field(default_factory=dict)
    max_concurrency: int = Field(default=8, ge=1)
    requests_per_second: float = Field(default=0.0, ge=0)
    request_timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    retry_base_delay_s: float = Field(default=0.5, ge=0)
    retry_max_delay_s: float = Field(default=30.0, ge=0)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    vllm_kv_cache_gib: int = Field(default=2, ge=1)
    vllm_gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)

    @model_validator(mode="after")
    def _openai_needs_endpoint(self) -> EngineSettings:
        if self.name == "openai" and not self.openai_base_url:
            raise ValueError("engine 'openai' needs openai_base_url (BPO_ENGINE__OPENAI_BASE_URL)")
        return self

    def resolved_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)

    def resolved_api_key(self) -> str:
        if self.openai_api_key is not None:
            return self.openai_api_key.get_secret_value()
        # Local OpenAI-compatible servers accept any key; the SDK insists on one being set.
        return os.environ.get("OPENAI_API_KEY", "not-needed")


class OptimizerSettings(BaseModel):
    """Sampling defaults are the paper's inference settings (top_p 0.9, temperature 0.6, 1024 new tokens)."""

    temperature: float = Field(default=0.6, ge=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_new_tokens: int = Field(default=1024, ge=1)
    rounds: int = Field(default=1, ge=1, le=10)
    seed: int | None = None
    batch_size: int = Field(default=8, ge=1)

    def params(self) -> OptimizeParams:
        from bpo.optimizer.optimizer import OptimizeParams

        return OptimizeParams(self.temperature, self.top_p, self.max_new_tokens, self.seed, self.rounds)


class PlatformSettings(BaseModel):
    database_url: str = ""
    kafka_bootstrap: str = ""
    redis_url: str = ""
    topic_prefix: str = "bpo"
    host: str = "127.0.0.1"
    jobs_port: int = 50051
    optimizer_port: int = 50052
    generator_port: int = 50053
    judge_port: int = 50054
    metrics_port_base: int = 9400
    # Loopback on one machine; 0.0.0.0 in a pod, where Prometheus scrapes from outside.
    metrics_host: str = "127.0.0.1"
    optimizer_model: str = DEFAULT_MODEL
    target_engine: EngineName = "llamacpp"
    # Embedded defaults for one CPU machine: a fast small target, and the stronger packaged model as judge.
    # Real deployments point both at OpenAI-compatible endpoints (per job, or here).
    target_model: str = "smollm2-135m-instruct"
    judge_engine: EngineName = "llamacpp"
    judge_model: str = DEFAULT_MODEL
    stage_batch_size: int = Field(default=8, ge=1)
    worker_timeout_s: float = Field(default=1800.0, gt=0)
    kafka_session_timeout_ms: int = Field(default=6000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=2000, ge=100)
    embedded_postgres_port: int = 55432
    embedded_redis_port: int = 56379
    embedded_kafka_port: int = 59092
    workers: int = Field(default=1, ge=1)
    # Greedy target answers and verdicts are kept in Postgres and reused by any job asking the same again.
    completion_cache: bool = True


class BpoSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BPO_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    state_dir: Path = Field(default_factory=_default_state_dir)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    platform: PlatformSettings = Field(default_factory=PlatformSettings)

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"
