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
    BPO_OPTIMIZER__TEMPERATURE / TOP_P / MAX_NEW_TOKENS / ROUNDS / SEED
    BPO_OPTIMIZER__BATCH_SIZE           prompts per optimizer engine batch: per task sent to a worker (a stage
                                        batch's misses go out as several tasks at once), per OptimizeBatch group

Platform (the distributed pipeline); an empty URL means "start an embedded one under the state directory":
    BPO_PLATFORM__DATABASE_URL          postgresql://... (Postgres, the source of truth)
    BPO_PLATFORM__KAFKA_BOOTSTRAP       host:port of a Kafka cluster
    BPO_PLATFORM__REDIS_URL             redis://... (Celery broker and result backend)
    BPO_PLATFORM__TOPIC_PREFIX          prefix of every topic name
    BPO_PLATFORM__HOST                  address the services bind and are reached at
    BPO_PLATFORM__JOBS_PORT / OPTIMIZER_PORT / GENERATOR_PORT / JUDGE_PORT   gRPC ports
    BPO_PLATFORM__METRICS_PORT_BASE     first of the Prometheus ports (one per process, counting up)
    BPO_PLATFORM__METRICS_HOST          address the services' metrics endpoints bind (default 127.0.0.1)
    BPO_PLATFORM__PROMETHEUS_PORT       port of the Prometheus `bpo up --with-prometheus` starts (default 9090)
    BPO_PLATFORM__PROMETHEUS_SCRAPE_INTERVAL_S  how often that Prometheus scrapes and evaluates the alert rules
    BPO_PLATFORM__OPTIMIZER_MODEL       default optimizer (endpoint name) of jobs and of the Optimizer service
    BPO_PLATFORM__TARGET_MODEL / JUDGE_MODEL   the declared endpoints a job uses when it names none
    BPO_PLATFORM__STAGE_BATCH_SIZE      messages a stage takes from its topic at once
    BPO_PLATFORM__STAGE_BATCH_DEADLINE_S  how long a stage waits for one group of a batch before parking it
    BPO_PLATFORM__WORKER_TIMEOUT_S      how long a stage waits for an optimizer worker's batch
    BPO_PLATFORM__ITEM_RETRY_BASE_S / ITEM_RETRY_MAX_S / ITEM_MAX_ATTEMPTS   transient failures of an item:
                                        exponential back-off from the base to the cap, then the item fails
    BPO_PLATFORM__SWEEP_INTERVAL_S / SWEEP_IDLE_S / SWEEP_BATCH   the jobs service re-publishes parked items
                                        when due and items idle beyond SWEEP_IDLE_S in a job that made no
                                        progress for as long (lost messages, not queued ones)
    BPO_PLATFORM__SUBMISSION_TIMEOUT_S  a submission silent this long is deleted as aborted
    BPO_PLATFORM__MAX_ITEM_BYTES        largest prompt + context of one item (refused beyond, with the reason)
    BPO_PLATFORM__KAFKA_MAX_MESSAGE_BYTES / GRPC_MAX_MESSAGE_BYTES   message size limits of each hop
    BPO_PLATFORM__KAFKA_PARTITIONS      partitions of each topic the platform creates (stage replicas at most)
    BPO_PLATFORM__EMBEDDED_POSTGRES_PORT / EMBEDDED_REDIS_PORT / EMBEDDED_KAFKA_PORT   ports `bpo up` uses
    BPO_PLATFORM__WORKERS               optimizer worker processes `bpo up` starts (one engine replica each)
    BPO_PLATFORM__REPLICAS              replicas `bpo up` starts of each stage service (rewriter, generator,
                                        judge), one consumer group each; at most KAFKA_PARTITIONS
    BPO_PLATFORM__REPLICA               which replica this process is (the supervisor sets it per child)
    BPO_PLATFORM__TLS_CERT_FILE / TLS_KEY_FILE   TLS on every gRPC server
    BPO_PLATFORM__TLS_CLIENT_CA_FILE / TLS_REQUIRE_CLIENT_CERT   mTLS: client certificates signed by this CA
    BPO_PLATFORM__AUTH_CACHE_S          how long a verified token is trusted before it is checked again

Endpoints and secrets (bpo/endpoints.py): callers name endpoints; the operator declares them.
    BPO_ENDPOINTS_FILE                  TOML file of declared endpoints (or BPO_ENDPOINTS, the same as JSON)
    BPO_SECRETS_DIR                     folder of named secrets (files); BPO_SECRET_<NAME> variables win

Clients (the bpo command):
    BPO_CLIENT__TOKEN / TOKEN_FILE      a team's bearer token (default: the admin token `bpo up` wrote)
    BPO_CLIENT__CA_FILE                 CA bundle to verify the servers' TLS certificates
    BPO_CLIENT__CERT_FILE / KEY_FILE    the client's certificate and key, for mTLS
    BPO_CLIENT__SERVER_NAME             the name the server certificate must carry, when not the host dialled
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
# The platform's service processes, in the order of their metrics ports (``PlatformSettings.metrics_port``).
SERVICE_PROCESSES = ("jobs", "rewriter", "generator", "judge")
# The services that consume a stage topic and so scale out as replicas in one consumer group (the jobs service
# runs the sweep and stays single).
STAGE_SERVICES = ("rewriter", "generator", "judge")
# Replica r > 0 of a stage service listens on its service's gRPC port + r * REPLICA_PORT_STRIDE, and exposes
# metrics in a block after the workers' (REPLICA_METRICS_OFFSET from the base, one port per replica and service).
REPLICA_PORT_STRIDE = 100
REPLICA_METRICS_OFFSET = 64


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
    # The Prometheus `bpo up --with-prometheus` runs beside the platform (bpo/observability/prometheus.py).
    prometheus_port: int = Field(default=9090, ge=1, le=65535)
    prometheus_scrape_interval_s: float = Field(default=15.0, gt=0)
    optimizer_model: str = DEFAULT_MODEL
    # The declared endpoints (bpo/endpoints.py) a job uses when it names none. The embedded defaults suit one CPU
    # machine: a fast small target and the stronger packaged model as judge; deployments declare their own.
    target_model: str = "smollm2-135m-instruct"
    judge_model: str = DEFAULT_MODEL
    stage_batch_size: int = Field(default=8, ge=1)
    # How long a stage waits for one group of a batch (an endpoint's or a model's items) before parking them
    # for a retry; the Kafka poll interval is derived from it.
    stage_batch_deadline_s: float = Field(default=600.0, gt=0)
    worker_timeout_s: float = Field(default=1800.0, gt=0)
    # Items whose stage failed transiently: retried with back-off from the base to the cap, then failed.
    item_retry_base_s: float = Field(default=5.0, ge=0)
    item_retry_max_s: float = Field(default=300.0, ge=0)
    item_max_attempts: int = Field(default=12, ge=1)
    # The jobs service's sweep: how often it runs, how long an item may sit unprocessed after it was handed to
    # its stage before it is re-published (its message may be lost), how many items one pass takes at most,
    # and how long a submission may go silent before it is deleted as aborted.
    sweep_interval_s: float = Field(default=15.0, gt=0)
    sweep_idle_s: float = Field(default=900.0, gt=0)
    sweep_batch: int = Field(default=5000, ge=1)
    submission_timeout_s: float = Field(default=120.0, gt=0)
    # Size limits, consistent across hops: an item's prompt and context together; a Kafka message (what the
    # brokers accept); a gRPC message (a SubmitJob item or an Optimize call). An item's largest message on a
    # topic carries it twice (the original and its rewrite) plus answers and verdicts.
    max_item_bytes: int = Field(default=256 * 1024, ge=1024)
    kafka_max_message_bytes: int = Field(default=1024 * 1024, ge=64 * 1024)
    grpc_max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    kafka_partitions: int = Field(default=8, ge=1)
    kafka_session_timeout_ms: int = Field(default=6000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=2000, ge=100)
    embedded_postgres_port: int = 55432
    embedded_redis_port: int = 56379
    embedded_kafka_port: int = 59092
    workers: int = Field(default=1, ge=1, le=REPLICA_METRICS_OFFSET - len(SERVICE_PROCESSES))
    # Replicas `bpo up` starts of each stage service (one consumer group each: at most one per partition), and
    # which replica this process is (set by the supervisor for each child; 0 is the first).
    replicas: int = Field(default=1, ge=1, le=32)
    replica: int = Field(default=0, ge=0)
    # Greedy target answers and verdicts are kept in Postgres and reused by any job asking the same again.
    completion_cache: bool = True
    # TLS on every gRPC server when a certificate and key are given; client certificates signed by the CA in
    # tls_client_ca_file are then required when tls_require_client_cert is set (mTLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    tls_require_client_cert: bool = False
    # How long a verified token is trusted before it is looked up again (a revocation takes effect within it).
    auth_cache_s: float = Field(default=5.0, ge=0)

    def grpc_port(self, service: str, replica: int = 0) -> int:
        """The gRPC port of replica ``replica`` of ``service`` (its configured port for the first replica)."""
        ports = {
            "jobs": self.jobs_port,
            "rewriter": self.optimizer_port,
            "generator": self.generator_port,
            "judge": self.judge_port,
        }
        if service not in ports:
            raise ValueError(f"no gRPC port for {service!r}: not one of {', '.join(SERVICE_PROCESSES)}")
        return ports[service] + replica * REPLICA_PORT_STRIDE

    @staticmethod
    def process_name(service: str, replica: int = 0) -> str:
        """How logs, metrics and `bpo status` name replica ``replica`` of ``service``: ``rewriter``, ``rewriter-1``."""
        return service if replica == 0 else f"{service}-{replica}"

    def metrics_port(self, process: str) -> int:
        """The Prometheus port of one of the platform's processes: from the metrics base, one per service in
        ``SERVICE_PROCESSES`` order, then `bpo up`'s optimizer workers ``worker-0``, ``worker-1``, ..., then the
        further replicas of the stage services (``rewriter-1``, ``generator-1``, ...)."""
        if process in SERVICE_PROCESSES:
            return self.metrics_port_base + SERVICE_PROCESSES.index(process)
        kind, _, index = process.partition("-")
        if kind == "worker" and index.isdigit():
            return self.metrics_port_base + len(SERVICE_PROCESSES) + int(index)
        if kind in STAGE_SERVICES and index.isdigit() and int(index) > 0:
            block = (int(index) - 1) * len(STAGE_SERVICES) + STAGE_SERVICES.index(kind)
            return self.metrics_port_base + REPLICA_METRICS_OFFSET + block
        raise ValueError(
            f"no metrics port for {process!r}: not one of {', '.join(SERVICE_PROCESSES)}, worker-N or a stage "
            "service's replica (rewriter-N, generator-N, judge-N with N >= 1)"
        )

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> PlatformSettings:
        # The largest message an item produces: its prompt and context twice (original and rewrite), with room
        # for answers, judgements and framing.
        largest = 2 * self.max_item_bytes + 256 * 1024
        if largest > self.kafka_max_message_bytes:
            raise ValueError(
                f"max_item_bytes ({self.max_item_bytes}) is too large for kafka_max_message_bytes "
                f"({self.kafka_max_message_bytes}): an item's messages need up to {largest} bytes"
            )
        if self.max_item_bytes + 64 * 1024 > self.grpc_max_message_bytes:
            raise ValueError("grpc_max_message_bytes must exceed max_item_bytes by at least 64 KiB")
        if self.replicas > self.kafka_partitions:
            # Replicas beyond the partition count would sit idle in their consumer group.
            raise ValueError(f"replicas ({self.replicas}) cannot exceed kafka_partitions ({self.kafka_partitions})")
        return self


class ClientSettings(BaseModel):
    """How the ``bpo`` command and other clients reach the platform's gRPC services as a caller."""

    # A team's bearer token, or a file holding one; without either, the token `bpo up` wrote for its admin.
    token: SecretStr | None = None
    token_file: Path | None = None
    # TLS: the CA bundle that signed the servers' certificates; a client certificate and key for mTLS; and the
    # name the server certificate is checked against when it differs from the host dialled.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None


class BpoSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BPO_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    state_dir: Path = Field(default_factory=_default_state_dir)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    platform: PlatformSettings = Field(default_factory=PlatformSettings)
    client: ClientSettings = Field(default_factory=ClientSettings)
    # The operator's model endpoints (bpo/endpoints.py): a TOML file, or the same as JSON in the variable.
    endpoints_file: Path | None = None
    endpoints: str = ""
    # Where named secrets (endpoint API keys) are read from when no BPO_SECRET_<NAME> variable holds them.
    secrets_dir: Path | None = None

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"
