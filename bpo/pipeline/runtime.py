"""The process shell every platform service shares: settings read once, Postgres migrated, a Kafka producer,
metrics served, a gRPC server and (for pipeline stages) a Kafka consumer loop on its own thread.

Services plug in through ``ServiceParts``: how to register their servicers and, optionally, a stage.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import grpc

from bpo.auth import Authenticator, AuthInterceptor
from bpo.endpoints import Endpoints
from bpo.engines.registry import EngineRegistry
from bpo.errors import InvalidConfigurationError
from bpo.grpc_server import DependencyHealth, serve
from bpo.metrics import PlatformMetrics, serve_metrics
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.pipeline.jobspec import JobLookup
from bpo.pipeline.quotas import QuotaGuard
from bpo.pipeline.stage import INPUT_TOPIC, PublishMany, Stage, StageContext
from bpo.settings import BpoSettings
from bpo.store.db import database_ready, migrate, open_pool
from bpo.store.repository import PipelineStore, RetryPolicy
from bpo.streaming.kafka import (
    KafkaSettings,
    OutboundMessage,
    PublishedRecord,
    PublishError,
    ensure_topics,
    make_producer,
    publish_many,
)
from bpo.streaming.loop import StageLoop
from bpo.tls import server_credentials

log = logging.getLogger(__name__)
TOPICS = ("prompts", "rewrites", "answers", "verdicts", "deadletter")


def kafka_settings(settings: BpoSettings) -> KafkaSettings:
    platform = settings.platform
    return KafkaSettings(
        bootstrap_servers=platform.kafka_bootstrap,
        topic_prefix=platform.topic_prefix,
        session_timeout_ms=platform.kafka_session_timeout_ms,
        heartbeat_interval_ms=platform.kafka_heartbeat_interval_ms,
        max_poll_records=platform.stage_batch_size,
        # A stage polls again only after its batch: the group must not give its partitions away meanwhile.
        max_poll_interval_ms=int((platform.stage_batch_deadline_s + 120) * 1000),
        max_message_bytes=platform.kafka_max_message_bytes,
        partitions=platform.kafka_partitions,
    )


def retry_policy(settings: BpoSettings) -> RetryPolicy:
    platform = settings.platform
    return RetryPolicy(
        base_delay_s=platform.item_retry_base_s,
        max_delay_s=platform.item_retry_max_s,
        max_attempts=platform.item_max_attempts,
    )


def require_urls(settings: BpoSettings, *, kafka: bool = True) -> None:
    missing = [
        name
        for name, value in (
            ("BPO_PLATFORM__DATABASE_URL", settings.platform.database_url),
            ("BPO_PLATFORM__KAFKA_BOOTSTRAP", settings.platform.kafka_bootstrap if kafka else "set"),
        )
        if not value
    ]
    if missing:
        raise InvalidConfigurationError(
            f"{', '.join(missing)} not set: start the platform with `bpo up` (which starts embedded services) "
            "or point it at your own"
        )


@dataclass
class Runtime:
    settings: BpoSettings
    store: PipelineStore
    kafka: KafkaSettings
    metrics: PlatformMetrics
    publish_many: PublishMany
    loop: asyncio.AbstractEventLoop
    # The operator's declared endpoints (read once per process).
    endpoints: Endpoints
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Whether each dependency answers (name -> check), for health: checks run off the event loop.
    dependencies: dict[str, Callable[[], bool]] = field(default_factory=dict)

    @property
    def quotas(self) -> QuotaGuard:
        return QuotaGuard(self.store)

    def topic(self, name: str) -> str:
        return self.kafka.topic(name)

    def engine_registry(self) -> EngineRegistry:
        """The targets' and judges' engines of this process, closed with it; greedy calls go through the
        completion cache unless the platform turns it off."""
        settings = self.settings
        engines = EngineRegistry(
            self.endpoints,
            ModelCatalogue(),
            ModelPreparer(settings.models_dir),
            cache=self.store if settings.platform.completion_cache else None,
            on_cache_lookup=self.metrics.record_completion_cache,
            observe=self.metrics.endpoints.observer,
        )
        self.closers.append(engines.aclose)
        return engines

    def stage_context(self) -> StageContext:
        return StageContext(
            store=self.store,
            jobs=JobLookup(self.store, self.settings.platform, defaults=self.settings.optimizer.params()),
            publish_many=self.publish_many,
            topic=self.topic,
            metrics=self.metrics,
            loop=self.loop,
            retry=retry_policy(self.settings),
            batch_deadline_s=self.settings.platform.stage_batch_deadline_s,
            endpoints=self.endpoints,
        )


@dataclass
class ServiceParts:
    register: Callable[[grpc.aio.Server], None]
    service_names: Sequence[str]
    stage: Stage[Any] | None = None
    # Gauges read from outside the process's own work (queue depths): refreshed every few seconds.
    gauges: list[Callable[[], None]] = field(default_factory=list)
    # Long-running work beside the server (the jobs service's sweep), started once the server is up.
    background: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Checks of dependencies of this service alone (the rewriter's Redis), for health.
    dependencies: dict[str, Callable[[], bool]] = field(default_factory=dict)


GAUGE_INTERVAL_S = 5.0


async def refresh_gauges(gauges: Sequence[Callable[[], None]]) -> None:
    while True:
        for refresh in gauges:
            try:
                await asyncio.to_thread(refresh)
            except Exception as exc:  # a metric must never take the service down
                log.debug("gauge refresh failed: %s", exc)
        await asyncio.sleep(GAUGE_INTERVAL_S)


def lag_gauge(stage: str, loop: StageLoop, metrics: PlatformMetrics) -> Callable[[], None]:
    def refresh() -> None:
        for (_, partition), lag in loop.consumer_lag().items():
            metrics.consumer_lag.labels(stage, str(partition)).set(lag)

    return refresh


async def _logged(work: Callable[[], Awaitable[None]]) -> None:
    try:
        await work()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("background work %s stopped", getattr(work, "__qualname__", work))


async def run_service(
    name: str,
    settings: BpoSettings,
    build: Callable[[Runtime], Awaitable[ServiceParts]],
) -> None:
    """Run service ``name`` as replica ``settings.platform.replica``: its gRPC and metrics ports follow from both."""
    require_urls(settings)
    platform = settings.platform
    port = platform.grpc_port(name, platform.replica)
    metrics = PlatformMetrics()
    serve_metrics(metrics, platform.metrics_port(platform.process_name(name, platform.replica)), platform.metrics_host)
    with ExitStack() as stack:
        pool = open_pool(settings.platform.database_url)
        stack.callback(pool.close)
        await asyncio.to_thread(migrate, pool)
        kafka = kafka_settings(settings)
        topics = [kafka.topic(t) for t in TOPICS]
        await asyncio.to_thread(ensure_topics, kafka, topics, kafka.partitions)
        producer = make_producer(kafka)
        stack.callback(producer.close)

        def publish_batch(messages: Sequence[OutboundMessage]) -> list[PublishedRecord | PublishError]:
            return publish_many(producer, messages, timeout_s=kafka.publish_timeout_s)

        def broker_ready() -> bool:
            # A broker that restarted empty (the embedded one keeps nothing) gets its topics back here.
            ensure_topics(kafka, topics, kafka.partitions)
            return True

        runtime = Runtime(
            settings=settings,
            store=PipelineStore(pool),
            kafka=kafka,
            metrics=metrics,
            publish_many=publish_batch,
            loop=asyncio.get_running_loop(),
            endpoints=Endpoints.from_settings(settings),
            dependencies={"postgres": lambda: database_ready(pool), "kafka": broker_ready},
        )
        authenticator = Authenticator(runtime.store.team_for_token, settings.platform.auth_cache_s)
        parts = await build(runtime)
        stage_loop: StageLoop | None = None
        thread: threading.Thread | None = None
        if parts.stage is not None:
            stage = parts.stage
            stage_loop = StageLoop(
                kafka,
                group_id=f"{settings.platform.topic_prefix}-{stage.name}",
                input_topic=kafka.topic(INPUT_TOPIC[stage.name]),
                handler=stage.handle,
                on_dead_letter=stage.on_dead_letter,
                producer=producer,
            )
            thread = threading.Thread(target=stage_loop.run, name=f"{stage.name}-loop", daemon=True)
            thread.start()
            parts.gauges.append(lag_gauge(stage.name, stage_loop, metrics))
            # Serving only once the stage consumes: `bpo up` (and a readiness probe) then waits for the consumer
            # group to form, instead of a first job waiting on it.
            consuming = stage_loop
            parts.dependencies["kafka_consumer_group"] = lambda: consuming.joined
        tasks = [asyncio.create_task(refresh_gauges(parts.gauges))]

        def started(_: int) -> None:
            tasks.extend(asyncio.create_task(_logged(work)) for work in parts.background)

        try:
            await serve(
                service_name=name,
                address=f"{settings.platform.host}:{port}",
                register=parts.register,
                full_service_names=parts.service_names,
                metrics=metrics,
                max_message_bytes=settings.platform.grpc_max_message_bytes,
                health=DependencyHealth(runtime.dependencies | parts.dependencies, metrics),
                on_started=started,
                interceptors=[AuthInterceptor(authenticator)],
                credentials=server_credentials(settings.platform),
            )
        finally:
            for task in tasks:
                task.cancel()
            if stage_loop is not None and thread is not None:
                stage_loop.stop()
                await asyncio.to_thread(thread.join, 30)
            for close in reversed(runtime.closers):
                await close()
