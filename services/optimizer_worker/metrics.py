"""Prometheus metrics of the optimizer workers.

Celery's prefork pool runs tasks in child processes while the metrics endpoint lives in the parent, so the
worker uses prometheus_client's multiprocess mode: each child writes its samples to files under
``PROMETHEUS_MULTIPROC_DIR`` and the parent's endpoint aggregates them. prometheus_client picks its value store
when it is first imported, so ``enable_multiprocess`` must run before anything imports it: this module only
imports prometheus_client inside its functions, so the worker can call ``enable_multiprocess`` first.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def enable_multiprocess(hostname: str) -> Path:
    """A fresh samples directory for this worker, named in the environment before prometheus_client loads.

    Fresh per worker because a directory reused across restarts would add a dead worker's counters to the
    new one's, and two workers sharing one would each report the other's samples.
    """
    if "prometheus_client" in sys.modules and os.environ.get(MULTIPROC_ENV) is None:
        raise RuntimeError(
            "prometheus_client was imported before multiprocess mode was enabled; its samples would stay per process"
        )
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in hostname)
    directory = Path(tempfile.mkdtemp(prefix=f"bpo-worker-metrics-{safe}-"))
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def remove_multiprocess_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


class WorkerMetrics:
    """The worker's metrics. ``registry=None`` leaves them unregistered, as multiprocess mode wants: the
    endpoint's collector reads every process's files instead of any one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        from bpo.metrics import EndpointMetrics

        self.tasks = Counter(
            "bpo_worker_tasks",
            "Optimizer batch tasks finished, by outcome (success, retry, failure, duplicate)",
            ["model", "outcome"],
            registry=registry,
        )
        self.items = Counter(
            "bpo_worker_items",
            "Prompts in finished batches, by status (OK or the failure's status code)",
            ["model", "status"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "bpo_worker_batch_size", "Prompts per task", ["model"], buckets=BATCH_BUCKETS, registry=registry
        )
        self.task_seconds = Histogram(
            "bpo_worker_task_seconds",
            "Time a task spent optimizing its batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "bpo_worker_tokens", "Optimizer tokens, prompt (in) and generated (out)", ["model", "direction"],
            registry=registry,
        )  # fmt: skip
        self.engine_replicas = Gauge(
            "bpo_worker_engine_replicas",
            "Engine replicas loaded and serving, over the worker's live processes",
            ["model"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.engine_load_seconds = Histogram(
            "bpo_worker_engine_load_seconds",
            "Time a worker process took to load one engine",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.model_version = Gauge(
            "bpo_worker_model_version",
            "Engine replicas serving each version of a model, over the worker's live processes",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.rewrites = Counter(
            "bpo_worker_rewrites",
            "Prompts optimized: rewritten or kept_original, with the fallback reason a rewrite was refused for",
            ["model", "outcome", "fallback_reason"],
            registry=registry,
        )
        # Set once by the worker's parent process: a change means the worker restarted in place.
        self.start_time = Gauge(
            "bpo_worker_start_time_seconds", "Unix time the worker started", registry=registry, multiprocess_mode="max"
        )
        self.endpoints = EndpointMetrics(registry)


def multiprocess_exposition_registry() -> CollectorRegistry:
    """The registry the endpoint serves: every process's samples, read from the multiprocess directory."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def serve_multiprocess_metrics(host: str, port: int) -> None:
    """The worker's endpoint, in the parent process; it serves from a daemon thread."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=multiprocess_exposition_registry())


def mark_process_dead(pid: int) -> None:
    """Drop a finished process's live gauges, so replicas it no longer holds stop counting."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client.multiprocess import mark_process_dead as _mark

        _mark(pid)  # type: ignore[no-untyped-call]
