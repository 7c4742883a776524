"""The platform's Prometheus metrics, defined once. Each process builds one ``PlatformMetrics`` on its own
registry and exposes it on its metrics port; Celery's prefork workers use multiprocess mode instead."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import multiprocess as prometheus_multiprocess

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class PlatformMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.grpc_requests = Counter(
            "bpo_grpc_requests", "gRPC calls handled", ["service", "method", "code"], registry=r
        )
        self.grpc_latency = Histogram(
            "bpo_grpc_latency_seconds", "gRPC call latency", ["service", "method"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.stage_messages = Counter(
            "bpo_stage_messages", "Topic messages a stage handled, by outcome", ["stage", "outcome"], registry=r
        )
        self.stage_batch_size = Histogram(
            "bpo_stage_batch_size", "Messages per stage batch", ["stage"], buckets=BATCH_BUCKETS, registry=r
        )
        self.stage_latency = Histogram(
            "bpo_stage_batch_seconds", "Time to process one stage batch", ["stage"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.consumer_lag = Gauge(
            "bpo_consumer_lag", "Messages behind the partition's high-water mark", ["stage", "partition"], registry=r
        )
        self.items_failed = Counter("bpo_items_failed", "Items marked failed", ["stage"], registry=r)
        self.cache_lookups = Counter("bpo_rewrite_cache_lookups", "Rewrite cache lookups", ["result"], registry=r)
        self.completion_cache_lookups = Counter(
            "bpo_completion_cache_lookups", "Greedy target and judge requests by cache result", ["result"], registry=r
        )
        self.tokens = Counter("bpo_tokens", "Tokens processed", ["role", "direction"], registry=r)
        self.tokens_per_second = Gauge(
            "bpo_output_tokens_per_second", "Output tokens per second of the last batch", ["role"], registry=r
        )
        self.celery_queue_depth = Gauge(
            "bpo_celery_queue_depth", "Optimizer tasks waiting in a worker queue", ["queue"], registry=r
        )
        self.jobs = Counter("bpo_jobs", "Jobs by event", ["event"], registry=r)

    def record_completion_cache(self, hits: int, misses: int) -> None:
        self.completion_cache_lookups.labels("hit").inc(hits)
        self.completion_cache_lookups.labels("miss").inc(misses)


def serve_metrics(metrics: PlatformMetrics, port: int, host: str = "127.0.0.1") -> int:
    """Expose the registry over HTTP on ``host``; port 0 picks a free one. Returns the port."""
    if port < 0:
        return -1
    server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    return int(server.server_port)


def multiprocess_registry() -> CollectorRegistry:
    """For prefork workers: aggregate every child's samples (needs PROMETHEUS_MULTIPROC_DIR set before import)."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        raise RuntimeError("PROMETHEUS_MULTIPROC_DIR must be set for multiprocess metrics")
    registry = CollectorRegistry()
    prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry
