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

from bpo.engines.registry import EngineRegistry
from bpo.errors import InvalidConfigurationError
from bpo.grpc_server import serve
from bpo.metrics import PlatformMetrics, serve_metrics
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.pipeline.jobspec import JobLookup
from bpo.pipeline.stage import INPUT_TOPIC, Stage, StageContext
from bpo.settings import BpoSettings
from bpo.store.db import migrate, open_pool
from bpo.store.repository import PipelineStore
from bpo.streaming.kafka import KafkaSettings, ensure_topics, make_producer, publish
from bpo.streaming.loop import StageLoop

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
    publish: Callable[[str, str, bytes], None]
    loop: asyncio.AbstractEventLoop
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def topic(self, name: str) -> str:
        return self.kafka.topic(name)

    def engine_registry(self) -> EngineRegistry:
        """The targets' and judges' engines of this process, closed with it; greedy calls go through the
        completion cache unless the platform turns it off."""
        settings = self.settings
        engines = EngineRegistry(
            settings.engine,
            ModelCatalogue(),
            ModelPreparer(settings.models_dir),
            cache=self.store if settings.platform.completion_cache else None,
            on_cache_lookup=self.metrics.record_completion_cache,
        )
        self.closers.append(engines.aclose)
        return engines

    def stage_context(self) -> StageContext:
        return StageContext(
            store=self.store,
            jobs=JobLookup(self.store, self.settings.platform, defaults=self.settings.optimizer.params()),
            publish=self.publish,
            topic=self.topic,
            metrics=self.metrics,
            loop=self.loop,
        )


@dataclass
class ServiceParts:
    register: Callable[[grpc.aio.Server], None]
    service_names: Sequence[str]
    stage: Stage[Any] | None = None
    # Gauges read from outside the process's own work (queue depths): refreshed every few seconds.
    gauges: list[Callable[[], None]] = field(default_factory=list)


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


async def run_service(
    name: str,
    settings: BpoSettings,
    port: int,
    metrics_port: int,
    build: Callable[[Runtime], Awaitable[ServiceParts]],
    *,
    on_ready: Callable[[Runtime], Awaitable[None]] | None = None,
) -> None:
    require_urls(settings)
    metrics = PlatformMetrics()
    serve_metrics(metrics, metrics_port, settings.platform.metrics_host)
    with ExitStack() as stack:
        pool = open_pool(settings.platform.database_url)
        stack.callback(pool.close)
        await asyncio.to_thread(migrate, pool)
        kafka = kafka_settings(settings)
        await asyncio.to_thread(ensure_topics, kafka, [kafka.topic(t) for t in TOPICS])
        producer = make_producer(kafka)
        stack.callback(producer.close)

        def publish_message(topic: str, key: str, value: bytes) -> None:
            publish(producer, topic, key, value)

        runtime = Runtime(
            settings=settings,
            store=PipelineStore(pool),
            kafka=kafka,
            metrics=metrics,
            publish=publish_message,
            loop=asyncio.get_running_loop(),
        )
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
        gauge_task = asyncio.create_task(refresh_gauges(parts.gauges))
        if on_ready is not None:
            await on_ready(runtime)
        try:
            await serve(
                service_name=name,
                address=f"{settings.platform.host}:{port}",
                register=parts.register,
                full_service_names=parts.service_names,
                metrics=metrics,
            )
        finally:
            gauge_task.cancel()
            if stage_loop is not None and thread is not None:
                stage_loop.stop()
                await asyncio.to_thread(thread.join, 30)
            for close in reversed(runtime.closers):
                await close()
