"""Plain generation on the optimizer workers: ``bpo.generate_batch``, and the client that sends it.

The pair constructor (``bpo pairs build``) needs completions of its own requests from a model the workers
already serve, so the workers take a second task beside ``bpo.optimize_batch``: the same queue per model
(``optimizer.<model>``), the same engine replica per process, the same delivery settings.

Wire format (JSON): ``bpo.generate_batch(model, requests)`` where each request is
``bpo.pairs.generation.request_to_wire``'s object. It returns ``{"engine": str, "model_version": str,
"entries": [...]}`` with one ``outcome_to_wire`` entry per request, in order; a malformed request fails alone.
Like the optimize task it only reads its input and returns a value, so running it twice is harmless, and a
task id whose result is already stored returns that result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from kombu.exceptions import OperationalError

from bpo.engines.base import Completion, GenerationRequest
from bpo.errors import BpoError, EngineUnavailableError
from bpo.pairs.generation import (
    GenerationFailure,
    Outcome,
    outcome_from_wire,
    outcome_to_wire,
    request_from_wire,
    request_to_wire,
    run_generation,
)
from services.optimizer_worker.task_client import CeleryTaskClient
from services.optimizer_worker.tasks import UNSERVED_LABEL, retry_if_transient, stored_success, task_options

if TYPE_CHECKING:
    from services.optimizer_worker.app import EngineHolder
    from services.optimizer_worker.metrics import WorkerMetrics
    from services.optimizer_worker.settings import WorkerSettings

log = logging.getLogger(__name__)
GENERATE_BATCH_TASK: Final = "bpo.generate_batch"


def _queue(model: str) -> str:
    # Imported here: app imports this module to register the task.
    from services.optimizer_worker.app import queue_for_model

    return queue_for_model(model)


@dataclass(slots=True)
class GenerationRun:
    engine: str
    model_version: str
    outcomes: list[Outcome | None]

    @property
    def transient(self) -> GenerationFailure | None:
        return next((o for o in self.outcomes if isinstance(o, GenerationFailure) and o.transient), None)

    def to_wire(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "model_version": self.model_version,
            "entries": [outcome_to_wire(o) for o in self.outcomes if o is not None],
        }


def run_generation_batch(engines: EngineHolder, model: str, requests: object) -> GenerationRun:
    """Validate, generate as one engine batch, and keep per-request failures in place."""
    if not isinstance(requests, list):
        raise BpoError(f"requests must be a list, got {type(requests).__name__}")
    outcomes: list[Outcome | None] = [None] * len(requests)
    parsed: list[GenerationRequest] = []
    positions: list[int] = []
    for position, raw in enumerate(requests):
        try:
            parsed.append(request_from_wire(raw))
            positions.append(position)
        except BpoError as exc:
            outcomes[position] = GenerationFailure.from_error(exc)
    engine_name, version = "", ""
    try:
        if parsed:
            loaded = engines.get(model)
            engine_name, version = loaded.engine.engine_name, loaded.engine.identity.version
            for position, outcome in zip(positions, engines.run(run_generation(loaded.engine, parsed)), strict=True):
                outcomes[position] = outcome
    except BpoError as exc:
        for position in positions:
            outcomes[position] = GenerationFailure.from_error(exc)
    return GenerationRun(engine_name, version, outcomes)


def _record(metrics: WorkerMetrics, label: str, run: GenerationRun, elapsed_s: float) -> None:
    metrics.batch_size.labels(label).observe(len(run.outcomes))
    metrics.task_seconds.labels(label).observe(elapsed_s)
    for outcome in run.outcomes:
        if isinstance(outcome, Completion):
            metrics.items.labels(label, "OK").inc()
            metrics.tokens.labels(label, "in").inc(outcome.prompt_tokens)
            metrics.tokens.labels(label, "out").inc(outcome.completion_tokens)
        elif outcome is not None:
            metrics.items.labels(label, outcome.status_code).inc()


def register_generation_tasks(app: Any, engines: EngineHolder, metrics: WorkerMetrics, settings: WorkerSettings) -> Any:
    """Register ``bpo.generate_batch`` on ``app``, bound to this app's engine holder; returns the task."""

    def generate_batch(task: Any, model: str, requests: list[dict[str, Any]]) -> Any:
        request = task.request
        label = model if model in engines.models else UNSERVED_LABEL
        if not request.is_eager:
            stored = stored_success(task, request.id)
            if stored is not None:
                metrics.tasks.labels(label, "duplicate").inc()
                return stored
        started = time.perf_counter()
        try:
            run = run_generation_batch(engines, model, requests)
        except Exception:
            metrics.tasks.labels(label, "failure").inc()
            raise
        transient = run.transient
        error = EngineUnavailableError(transient.error) if transient is not None else None
        retry_if_transient(task, error, settings, metrics, label, f"generation batch for {model}")
        _record(metrics, label, run, time.perf_counter() - started)
        metrics.tasks.labels(label, "success" if transient is None else "failure").inc()
        return run.to_wire()

    return app.task(**task_options(GENERATE_BATCH_TASK, settings))(generate_batch)


# -- client ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GeneratedBatch:
    engine: str
    model_version: str
    outcomes: list[Outcome]


def decode_batch(value: Any, count: int) -> GeneratedBatch:
    if not isinstance(value, dict) or not isinstance(value.get("entries"), list):
        raise BpoError(f"a generation worker returned a malformed result: {value!r}"[:500])
    entries = value["entries"]
    if len(entries) != count:
        raise BpoError(f"a generation worker returned {len(entries)} entries for {count} requests")
    return GeneratedBatch(str(value.get("engine", "")), str(value.get("model_version", "")),
                          [outcome_from_wire(entry) for entry in entries])  # fmt: skip


class GenerationWorkersClient(CeleryTaskClient):
    """Sends generation batches to the workers serving a model and awaits them from asyncio code."""

    task_name = GENERATE_BATCH_TASK
    task_kind = "generation"

    def __init__(self, app: Any, timeout_s: float, *, max_waiting: int = 16, wait_slice_s: float = 1.0) -> None:
        super().__init__(app, timeout_s, max_waiting=max_waiting, wait_slice_s=wait_slice_s)

    async def serving_workers(self, model: str, timeout_s: float = 2.0) -> list[str]:
        """Names of the workers consuming ``model``'s queue (asked over Celery's remote control)."""
        queue = _queue(model)
        replies = await self._call(self._active_queues, timeout_s)
        return sorted(worker for worker, queues in (replies or {}).items()
                      if any(q.get("name") == queue for q in queues or ()))  # fmt: skip

    async def generate(
        self, model: str, requests: Sequence[GenerationRequest], *, task_id: str | None = None
    ) -> GeneratedBatch:
        if not requests:
            return GeneratedBatch("", "", [])
        kwargs = {"model": model, "requests": [request_to_wire(r) for r in requests]}
        value = await self._send_and_wait(kwargs, model, _queue(model), task_id)
        return decode_batch(value, len(requests))

    def _active_queues(self, timeout_s: float) -> Any:
        try:
            return self._app.control.inspect(timeout=timeout_s).active_queues()
        except (OperationalError, OSError) as exc:
            raise EngineUnavailableError(f"the optimizer broker is unreachable: {exc}") from exc


class WorkersGenerator:
    """``bpo.pairs.generation.Generator`` over the Celery workers that serve ``model``."""

    def __init__(self, client: GenerationWorkersClient, model: str, *, max_in_flight: int = 4) -> None:
        self._client = client
        self._model = model
        self._max_in_flight = max_in_flight
        self.engines_seen: set[tuple[str, str]] = set()

    @property
    def name(self) -> str:
        return self._model

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        batch = await self._client.generate(self._model, requests)
        self.engines_seen.add((batch.engine, batch.model_version))
        return batch.outcomes
