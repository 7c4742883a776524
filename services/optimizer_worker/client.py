"""Send optimizer batches to the workers of a model and await their results from asyncio code
(threads and waiting as in ``task_client.CeleryTaskClient``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from kombu.exceptions import OperationalError

from bpo.errors import BpoError, EngineUnavailableError, error_for_status
from bpo.optimizer.optimizer import OptimizeParams, PromptInput, RewriteFailure, RewriteResult
from services.optimizer_worker.app import queue_for_model
from services.optimizer_worker.task_client import CeleryTaskClient
from services.optimizer_worker.tasks import OPTIMIZE_BATCH_TASK

_RESULT_FIELDS = frozenset(f.name for f in fields(RewriteResult))
_TASK_NAMESPACE = uuid.UUID("5f7c1a52-0b6e-4d1e-9a51-6b1d2c0e7f33")


class OptimizerWorkersClient(CeleryTaskClient):
    task_name = OPTIMIZE_BATCH_TASK
    task_kind = "optimizer"

    def __init__(self, app: Any, timeout_s: float, *, max_waiting: int = 32, wait_slice_s: float = 1.0) -> None:
        super().__init__(app, timeout_s, max_waiting=max_waiting, wait_slice_s=wait_slice_s)

    async def optimize_batch(
        self,
        model: str,
        params: OptimizeParams,
        inputs: Sequence[PromptInput],
        *,
        task_id: str | None = None,
    ) -> list[RewriteResult | RewriteFailure]:
        """One task on ``model``'s queue; results keep the input order.

        The task id is derived from the batch itself (model, parameters, prompts) unless given: a batch sent
        again (a stage redelivered after a crash or a rebalance) gets the stored result of the earlier send, or
        waits on it while a worker still runs it, instead of making the workers do it twice.
        """
        if not inputs:
            return []
        kwargs = {
            "model": model,
            "params": params.as_dict(),
            "items": [{"prompt": item.prompt, "context": item.context} for item in inputs],
        }
        task_id = task_id or batch_task_id(kwargs)
        state, stored = await self._call(self._stored_state, task_id)
        if state == "SUCCESS":
            return decode_entries(stored, inputs)
        if state in ("STARTED", "RETRY"):
            value = await self._wait(self._app.AsyncResult(task_id), self._deadline(), model, queue_for_model(model))
            return decode_entries(value, inputs)
        value = await self._send_and_wait(kwargs, model, queue_for_model(model), task_id)
        return decode_entries(value, inputs)

    def _stored_state(self, task_id: str) -> tuple[str, Any]:
        try:
            meta = self._app.backend.get_task_meta(task_id)
        except OperationalError as exc:
            raise EngineUnavailableError(f"the optimizer result backend is unreachable: {exc}") from exc
        return str(meta.get("status")), meta.get("result")


def batch_task_id(kwargs: dict[str, Any]) -> str:
    """The same batch of work always gets the same task id."""
    canonical = json.dumps(kwargs, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return str(uuid.uuid5(_TASK_NAMESPACE, canonical))


def decode_entries(value: Any, inputs: Sequence[PromptInput]) -> list[RewriteResult | RewriteFailure]:
    if not isinstance(value, list) or len(value) != len(inputs):
        count = len(value) if isinstance(value, list) else type(value).__name__
        raise BpoError(f"an optimizer worker returned {count} entries for {len(inputs)} prompts")
    return [_decode_entry(entry, item) for entry, item in zip(value, inputs, strict=True)]


def _decode_entry(entry: Any, item: PromptInput) -> RewriteResult | RewriteFailure:
    if not isinstance(entry, dict):
        raise BpoError(f"an optimizer worker returned a malformed entry: {entry!r}")
    if entry.get("ok"):
        data = entry.get("result")
        if not isinstance(data, dict):
            raise BpoError(f"an optimizer worker returned a malformed result: {entry!r}")
        try:
            # A newer worker may add fields; an older client keeps the ones it knows.
            return RewriteResult(**{key: data[key] for key in data if key in _RESULT_FIELDS})
        except TypeError as exc:
            raise BpoError(f"an optimizer worker returned an incomplete result: {exc}") from exc
    error, status_code = str(entry.get("error", "")), str(entry.get("status_code", "INTERNAL"))
    return RewriteFailure(item.prompt, error, status_code, error_for_status(status_code, error))
