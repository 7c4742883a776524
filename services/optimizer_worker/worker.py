"""Run an optimizer worker: ``python -m services.optimizer_worker.worker [celery worker options]``.

Settings come from ``BPO_WORKER_*`` and the platform's ``BPO_*`` (see ``settings``); any arguments are passed to
``celery worker`` after the defaults below, so they override them (``--concurrency 2``, ``--loglevel DEBUG``).

The pool is prefork with one process per engine replica: each process loads its engines once as it starts and
runs one batch at a time, so more processes mean more replicas (and more memory), never shared engines.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import redis
from celery.signals import worker_ready, worker_shutdown  # type: ignore[import-untyped]
from pydantic import ValidationError

from bpo.errors import BpoError
from bpo.settings import BpoSettings
from bpo.store.db import wait_for_schema
from services.optimizer_worker.app import (
    CatalogueEngineLoader,
    EngineHolder,
    alias_watch_for,
    make_celery_app,
    queue_for_model,
)
from services.optimizer_worker.metrics import (
    WorkerMetrics,
    enable_multiprocess,
    remove_multiprocess_dir,
    serve_multiprocess_metrics,
)
from services.optimizer_worker.presence import PresenceBeacon
from services.optimizer_worker.settings import WorkerSettings


def worker_argv(settings: WorkerSettings, node_name: str, extra: Sequence[str] = ()) -> list[str]:
    queues = ",".join(queue_for_model(model) for model in settings.models)
    return [
        "worker",
        "--pool=prefork",
        f"--concurrency={settings.concurrency}",
        f"--queues={queues}",
        f"--hostname={node_name}@%h",
        f"--loglevel={settings.log_level}",
        # Gossip and mingle exchange worker state over broadcast channels; these workers share nothing (no
        # revokes, no remote control use), so they only slow start-up and add broker traffic per worker.
        "--without-gossip",
        "--without-mingle",
        *extra,
    ]


def run_worker(settings: WorkerSettings, node_name: str, extra_argv: Sequence[str] = ()) -> int:
    """Run a worker in the foreground until it is shut down; returns its exit code."""
    metrics_dir: Path | None = None
    if settings.metrics_port:
        # Before any metric exists: the children's samples must go to files the parent's endpoint can read.
        metrics_dir = enable_multiprocess(node_name)
    try:
        database_url = settings.platform.platform.database_url
        if database_url:
            try:
                # The registry is read before the first batch: never before its tables exist.
                wait_for_schema(database_url, settings.schema_wait_s)
            except BpoError as exc:
                print(f"cannot start: {exc}", file=sys.stderr)
                return 1
        metrics = WorkerMetrics()
        metrics.start_time.set_to_current_time()
        loader = CatalogueEngineLoader(settings, observe=metrics.endpoints.observer)
        engines = EngineHolder(settings.models, loader, metrics, alias_watch_for(settings, loader))
        try:
            # Once, in the parent: processes starting together would otherwise each assemble or convert the same
            # weights, and a model that cannot be found stops the worker here rather than in every process.
            engines.prepare()
        except BpoError as exc:
            print(f"cannot serve {', '.join(settings.models)}: {exc}", file=sys.stderr)
            return 1
        app = make_celery_app(settings, engines, metrics)
        if settings.metrics_port:
            serve_multiprocess_metrics(settings.metrics_host, settings.metrics_port)
        beacon = PresenceBeacon(redis.Redis.from_url(settings.broker_url), node_name, settings.models)
        # Announced once the worker consumes its queues; withdrawn when it stops (or expired if it dies).
        worker_ready.connect(lambda **_: beacon.start(), weak=False)
        worker_shutdown.connect(lambda **_: beacon.stop(), weak=False)
        code = app.start(worker_argv(settings, node_name, extra_argv))
        return int(code or 0)
    finally:
        if metrics_dir is not None:
            remove_multiprocess_dir(metrics_dir)


def run_for_platform(settings: BpoSettings, name: str) -> None:
    """A worker of the platform's own stack (``bpo stack``): its Redis and optimizer model, named ``name``."""
    code = run_worker(WorkerSettings.for_platform(settings), name)
    if code:
        raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    # Until Celery takes over logging: what the worker says while it starts (waiting for the schema) is seen.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        print(f"invalid worker settings:\n{exc}", file=sys.stderr)
        return 2
    return run_worker(settings, f"bpo-optimizer-{os.getpid()}", extra)


if __name__ == "__main__":
    sys.exit(main())
