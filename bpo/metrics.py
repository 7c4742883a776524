"""The platform's Prometheus metrics, defined once. Each process builds one ``PlatformMetrics`` on its own
registry and exposes it on its metrics port; Celery's prefork workers use multiprocess mode instead."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import multiprocess as prometheus_multiprocess

from bpo.engines.observer import ENDPOINT_OUTCOMES, EndpointObserver

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# A rate limiter's wait is zero until the endpoint is saturated, then up to seconds.
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# What a stage does with each message (``bpo_stage_messages_total``'s outcome).
STAGE_OUTCOMES = ("done", "failed", "parked", "deferred", "skipped", "redelivered", "duplicate", "poison")
# The judge's verdicts: who won, and whether the verdicts of both orders agreed.
WINNERS = ("optimized", "original", "tie")


class FailureReason(StrEnum):
    """Why an item failed for good, as a class (the label of ``bpo_items_failed_total``; the text is the item's)."""

    REJECTED = "rejected"  # its input can never succeed (the endpoint or the stage refused it)
    RETRIES_EXHAUSTED = "retries_exhausted"  # transient errors until its last attempt
    TOO_LARGE = "too_large"  # its output or message is larger than the broker accepts
    UNUSABLE_JOB = "unusable_job"  # its job's spec cannot be used any more
    DEAD_LETTERED = "dead_lettered"  # its message could not be read and went to the dead-letter topic


class EndpointMetrics:
    """Requests to model endpoints, from the engines that make them (``bpo/engines/observer.py``). Shared by the
    services' registries and the optimizer workers' multiprocess mode (``registry=None``)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = Counter(
            "bpo_endpoint_requests", "HTTP requests to model endpoints (each retry is one), by outcome",
            ["endpoint", "outcome"], registry=registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "bpo_endpoint_request_seconds", "Time of one request to a model endpoint", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.retries = Counter(
            "bpo_endpoint_retries", "Requests retried after a retryable error", ["endpoint"], registry=registry
        )
        self.rate_limit_wait = Histogram(
            "bpo_endpoint_rate_limit_wait_seconds", "Time a request waited for its endpoint's rate limiter",
            ["endpoint"], buckets=WAIT_BUCKETS, registry=registry,
        )  # fmt: skip

    def observer(self, endpoint: str) -> EndpointObserver:
        """What an engine calling ``endpoint`` reports to; its series start at zero, so the first error shows."""
        for outcome in ENDPOINT_OUTCOMES:
            self.requests.labels(endpoint, outcome)
        self.retries.labels(endpoint)
        return _EndpointSeries(self, endpoint)


@dataclass(frozen=True, slots=True)
class _EndpointSeries:
    metrics: EndpointMetrics
    endpoint: str

    def request_done(self, outcome: str, seconds: float) -> None:
        self.metrics.requests.labels(self.endpoint, outcome if outcome in ENDPOINT_OUTCOMES else "error").inc()
        self.metrics.request_seconds.labels(self.endpoint).observe(seconds)

    def retrying(self) -> None:
        self.metrics.retries.labels(self.endpoint).inc()

    def rate_limit_waited(self, seconds: float) -> None:
        self.metrics.rate_limit_wait.labels(self.endpoint).observe(seconds)


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
        self.items_failed = Counter(
            "bpo_items_failed", "Items failed for good, by stage and reason class (FailureReason)", ["stage", "reason"],
            registry=r,
        )  # fmt: skip
        self.dead_letters = Counter(
            "bpo_dead_letters", "Messages a stage sent to the dead-letter topic", ["stage"], registry=r
        )
        self.cache_lookups = Counter("bpo_rewrite_cache_lookups", "Rewrite cache lookups", ["result"], registry=r)
        self.completion_cache_lookups = Counter(
            "bpo_completion_cache_lookups", "Greedy target and judge requests by cache result", ["result"], registry=r
        )
        self.tokens = Counter("bpo_tokens", "Tokens processed", ["role", "direction"], registry=r)
        self.celery_queue_depth = Gauge(
            "bpo_celery_queue_depth", "Optimizer tasks waiting in a worker queue", ["queue"], registry=r
        )
        self.optimizer_workers = Gauge(
            "bpo_optimizer_workers", "Live optimizer workers announcing the model of a queue", ["queue"], registry=r
        )
        self.jobs = Counter("bpo_jobs", "Jobs by event", ["event"], registry=r)
        self.jobs_running = Gauge("bpo_jobs_running", "Jobs in the running state", registry=r)
        self.items_submitted = Counter(
            "bpo_items_submitted", "Items of submitted jobs: accepted, rejected at submission, or duplicates",
            ["result"], registry=r,
        )  # fmt: skip
        self.oldest_pending_item_age = Gauge(
            "bpo_oldest_pending_item_age_seconds", "Age of the oldest unfinished item of a running job", registry=r
        )
        self.judged_items = Counter(
            "bpo_judged_items", "Items judged, by winner and whether the verdicts of both orders agreed",
            ["winner", "position_consistent"], registry=r,
        )  # fmt: skip
        self.endpoints = EndpointMetrics(r)
        self.dependency_up = Gauge(
            "bpo_dependency_up", "Whether a dependency of the service answers (1) or not (0)", ["dependency"],
            registry=r,
        )  # fmt: skip
        # Per team (a bounded label: teams are what the operator created).
        self.team_tokens = Counter(
            "bpo_team_tokens", "Tokens spent for a team, by role", ["team", "role", "direction"], registry=r
        )
        self.team_cost = Counter(
            "bpo_team_cost_usd",
            "Cost at the declared endpoints' prices, by team and role",
            ["team", "role"],
            registry=r,
        )
        self.items_republished = Counter(
            "bpo_items_republished", "Items the sweep handed to their stage again, by why", ["reason"], registry=r
        )

    def declare_stage(self, stage: str) -> None:
        """Create a stage's series at zero, so that rates and alerts see its first events (a series that appears
        with its first increment hides that increment from ``rate``)."""
        for outcome in STAGE_OUTCOMES:
            self.stage_messages.labels(stage, outcome)
        for reason in FailureReason:
            self.items_failed.labels(stage, reason)
        self.dead_letters.labels(stage)

    def declare_grpc_methods(self, service: str, methods: Sequence[str]) -> None:
        """Create each method's latency series at zero (as ``declare_stage``): the first calls after a start then
        show in latency percentiles instead of only from the second scrape that saw the series grow."""
        for method in methods:
            self.grpc_latency.labels(service, method)

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
