"""The optimizer task: one batch of prompts through one model's engine, as one engine batch.

Wire format (JSON): ``bpo.optimize_batch(model, params, items)`` where ``params`` holds ``OptimizeParams``
fields and each item is ``{"prompt": str, "context": str | None}``. It returns one entry per item, in order:
``{"ok": True, "result": RewriteResult.to_dict()}`` or ``{"ok": False, "error": str, "status_code": str}``.

A task is safe to run more than once (late acks redeliver it after a crash): it only reads its input and
returns a value, and a task id whose result is already stored returns that result without running again.
With a seed, the same input also gives the same rewrites.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from celery.utils.time import get_exponential_backoff_interval  # type: ignore[import-untyped]
from pydantic import ValidationError

from bpo.errors import BpoError, EngineOverloadedError, EngineUnavailableError, InvalidPromptError
from bpo.optimizer.guards import FallbackReason
from bpo.optimizer.optimizer import OptimizeParams, PromptInput, PromptOptimizer, RewriteFailure, RewriteResult
from bpo.settings import OptimizerSettings

if TYPE_CHECKING:
    from services.optimizer_worker.app import EngineHolder
    from services.optimizer_worker.metrics import WorkerMetrics
    from services.optimizer_worker.settings import WorkerSettings

log = logging.getLogger(__name__)

OPTIMIZE_BATCH_TASK = "bpo.optimize_batch"
# Errors of the engine rather than of the input: another attempt, later or on another replica, may succeed.
TRANSIENT_STATUS_CODES = frozenset({EngineUnavailableError.status_code, EngineOverloadedError.status_code})

UNSERVED_LABEL = "unserved"
# The fallback reason of a result that has none.
NO_FALLBACK = "none"
_FALLBACK_REASONS = frozenset(reason.value for reason in FallbackReason)

_PARAM_FIELDS = frozenset(f.name for f in fields(OptimizeParams))
_ITEM_FIELDS = frozenset(f.name for f in fields(PromptInput))


def parse_params(raw: object) -> OptimizeParams:
    if not isinstance(raw, Mapping):
        raise InvalidPromptError(f"params must be an object, got {type(raw).__name__}")
    unknown = set(raw) - _PARAM_FIELDS
    if unknown:
        raise InvalidPromptError(f"unknown optimize params: {', '.join(sorted(map(str, unknown)))}")
    try:
        # The bounds the CLI and the platform's settings enforce, so a task cannot ask for what they refuse.
        checked = OptimizerSettings.model_validate(dict(raw), strict=True).model_dump()
    except ValidationError as exc:
        raise InvalidPromptError(f"invalid optimize params: {_first_error(exc)}") from exc
    values: dict[str, Any] = {str(name): checked.get(name, value) for name, value in raw.items()}
    return OptimizeParams(**values)


def parse_item(raw: object) -> PromptInput:
    if not isinstance(raw, Mapping):
        raise InvalidPromptError(f"an item must be an object, got {type(raw).__name__}")
    unknown = set(raw) - _ITEM_FIELDS
    if unknown:
        raise InvalidPromptError(f"unknown item fields: {', '.join(sorted(map(str, unknown)))}")
    prompt, context = raw.get("prompt"), raw.get("context")
    if not isinstance(prompt, str):
        raise InvalidPromptError("an item needs a string 'prompt'")
    if context is not None and not isinstance(context, str):
        raise InvalidPromptError("an item's 'context' must be a string or null")
    return PromptInput(prompt, context)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(map(str, error['loc']))}: {error['msg']}"


def failure_entry(error: str, status_code: str) -> dict[str, Any]:
    return {"ok": False, "error": error, "status_code": status_code}


def encode_outcome(outcome: RewriteResult | RewriteFailure) -> dict[str, Any]:
    if isinstance(outcome, RewriteFailure):
        return failure_entry(outcome.error, outcome.status_code)
    return {"ok": True, "result": outcome.to_dict()}


@dataclass(slots=True)
class BatchRun:
    entries: list[dict[str, Any]]
    # Set when the engine, not the input, failed the batch: the task retries it instead of returning.
    transient_error: BpoError | None = None


def run_batch(engines: EngineHolder, model: str, params: object, items: object) -> BatchRun:
    """Validate, optimize as one engine batch, and encode; input errors become per-item failures."""
    if not isinstance(items, list):
        raise InvalidPromptError(f"items must be a list, got {type(items).__name__}")
    entries: list[dict[str, Any] | None] = [None] * len(items)
    inputs: list[PromptInput] = []
    positions: list[int] = []
    for position, raw in enumerate(items):
        try:
            inputs.append(parse_item(raw))
            positions.append(position)
        except BpoError as exc:
            entries[position] = failure_entry(str(exc), exc.status_code)
    transient: BpoError | None = None
    try:
        optimize_params = parse_params(params)
        loaded = engines.get(model) if inputs else None
        outcomes: Sequence[RewriteResult | RewriteFailure] = []
        if loaded is not None:
            optimizer = PromptOptimizer(loaded.engine, loaded.prompt_style, optimize_params)
            outcomes = engines.run(optimizer.optimize_batch(inputs))
        for position, outcome in zip(positions, outcomes, strict=True):
            entries[position] = encode_outcome(outcome)
            if isinstance(outcome, RewriteFailure) and outcome.status_code in TRANSIENT_STATUS_CODES:
                transient = transient or outcome.exception or BpoError(outcome.error)
    except BpoError as exc:
        for position in positions:
            entries[position] = failure_entry(str(exc), exc.status_code)
        if exc.status_code in TRANSIENT_STATUS_CODES:
            transient = exc
    return BatchRun([entry for entry in entries if entry is not None], transient)


def retry_delay_s(retries: int, base_s: int, cap_s: int) -> int:
    """Exponential back-off with full jitter, so replicas recovering together do not retry in lockstep."""
    return int(get_exponential_backoff_interval(base_s, retries, cap_s, full_jitter=True))


def retry_if_transient(
    task: Any, error: Exception | None, settings: WorkerSettings, metrics: WorkerMetrics, label: str, what: str
) -> None:
    """Retry the task later when its batch hit a transient engine error and retries remain; else return."""
    request = task.request
    if error is None or request.retries >= settings.max_retries:
        return
    countdown = retry_delay_s(request.retries, settings.retry_backoff_s, settings.retry_backoff_max_s)
    metrics.tasks.labels(label, "retry").inc()
    log.warning(
        "%s hit an engine error (%s); retry %d/%d in %ds",
        what, error, request.retries + 1, settings.max_retries, countdown,
    )  # fmt: skip
    raise task.retry(exc=error, countdown=countdown, max_retries=settings.max_retries)


def task_options(name: str, settings: WorkerSettings) -> dict[str, Any]:
    """How every worker task is declared: late acks, redelivery on worker loss, retries decided by the task."""
    return {
        "bind": True,
        "name": name,
        # Celery shares tasks with every app created later by default; these close over one app's engines.
        "shared": False,
        "acks_late": True,
        "reject_on_worker_lost": True,
        # Retries are decided from the batch's outcome: an exception escaping the task is a bug or bad input,
        # and neither improves with another attempt.
        "autoretry_for": (),
        "max_retries": settings.max_retries,
        # The delay of a retry after a pool process died (Celery's own default is three minutes).
        "default_retry_delay": settings.retry_backoff_s,
    }


def rewrite_outcome(result: Mapping[str, Any]) -> tuple[str, str]:
    """(outcome, fallback reason) of one result: rewritten or kept_original, and the reason a rewrite was refused
    (``none`` when none was, e.g. the model gave the prompt back unchanged)."""
    reason = result.get("fallback_reason")
    outcome = "rewritten" if result["optimized"] != result["original"] else "kept_original"
    return outcome, reason if isinstance(reason, str) and reason in _FALLBACK_REASONS else NO_FALLBACK


def declare_rewrite_outcomes(metrics: WorkerMetrics, model: str) -> None:
    """Every outcome's series at zero, so that the first fallback of a kind shows in rates."""
    for outcome in ("rewritten", "kept_original"):
        for reason in (*FallbackReason, NO_FALLBACK):
            metrics.rewrites.labels(model, outcome, reason)


def _record(metrics: WorkerMetrics, model: str, run: BatchRun, elapsed_s: float, batch_size: int) -> None:
    metrics.batch_size.labels(model).observe(batch_size)
    metrics.task_seconds.labels(model).observe(elapsed_s)
    for entry in run.entries:
        if entry["ok"]:
            metrics.items.labels(model, "OK").inc()
            metrics.tokens.labels(model, "in").inc(entry["result"]["tokens_in"])
            metrics.tokens.labels(model, "out").inc(entry["result"]["tokens_out"])
            metrics.rewrites.labels(model, *rewrite_outcome(entry["result"])).inc()
        else:
            metrics.items.labels(model, entry["status_code"]).inc()


def stored_success(task: Any, task_id: str) -> Any:
    """The stored result of an earlier run of this task id that succeeded, or None."""
    try:
        meta = task.backend.get_task_meta(task_id)
    except Exception:
        # Only an optimisation: with the backend unreachable the batch runs, as it would without the check.
        log.warning("could not look up a stored result for task %s", task_id, exc_info=True)
        return None
    return meta.get("result") if meta.get("status") == "SUCCESS" else None


def register_tasks(app: Any, engines: EngineHolder, metrics: WorkerMetrics, settings: WorkerSettings) -> Any:
    """Register ``bpo.optimize_batch`` on ``app``, bound to this app's engine holder; returns the task."""
    for model in engines.models:
        declare_rewrite_outcomes(metrics, model)

    def optimize_batch(task: Any, model: str, params: dict[str, Any], items: list[dict[str, Any]]) -> Any:
        request = task.request
        # The model name comes off the wire: only served names become label values, or any sender could grow
        # the metrics without bound.
        label = model if model in engines.models else UNSERVED_LABEL
        if not request.is_eager:
            stored = stored_success(task, request.id)
            if stored is not None:
                # A redelivery of a batch that finished before its ack was lost, or a caller re-sending the
                # same task id: the stored result is the answer, running again would only cost engine time.
                metrics.tasks.labels(label, "duplicate").inc()
                log.info("task %s already succeeded; returning its stored result", request.id)
                return stored
        started = time.perf_counter()
        try:
            run = run_batch(engines, model, params, items)
        except Exception:
            metrics.tasks.labels(label, "failure").inc()
            raise
        elapsed = time.perf_counter() - started
        retry_if_transient(task, run.transient_error, settings, metrics, label, f"batch of {len(items)} for {model}")
        _record(metrics, label, run, elapsed, len(items))
        metrics.tasks.labels(label, "success" if run.transient_error is None else "failure").inc()
        return run.entries

    return app.task(**task_options(OPTIMIZE_BATCH_TASK, settings))(optimize_batch)
