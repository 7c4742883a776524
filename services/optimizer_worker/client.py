"""Send optimizer batches to the workers of a model and await their results from asyncio code.

Celery's client API blocks (publishing, and waiting on the result backend's pub/sub), so every call runs on the
client's own small thread pool: the event loop never blocks, and a burst of batches cannot starve the loop's
default executor that other code relies on. Waiting is done in short slices, so a cancelled caller frees its
thread within a slice.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import Any, TypeVar

from celery.exceptions import TimeoutError as CeleryTimeoutError  # type: ignore[import-untyped]
from kombu.exceptions import OperationalError

from bpo.errors import BpoError, EngineUnavailableError, error_for_status
from bpo.optimizer.optimizer import OptimizeParams, PromptInput, RewriteFailure, RewriteResult
from services.optimizer_worker.app import queue_for_model
from services.optimizer_worker.tasks import OPTIMIZE_BATCH_TASK

T = TypeVar("T")

_RESULT_FIELDS = frozenset(f.name for f in fields(RewriteResult))


class OptimizerWorkersClient:
    def __init__(self, app: Any, timeout_s: float, *, max_waiting: int = 32, wait_slice_s: float = 1.0) -> None:
        """``timeout_s`` bounds one batch from sending to result; ``max_waiting`` batches are awaited at once."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._app = app
        self._timeout_s = timeout_s
        self._wait_slice_s = wait_slice_s
        self._executor = ThreadPoolExecutor(max_workers=max_waiting, thread_name_prefix="bpo-optimizer-client")

    async def optimize_batch(
        self,
        model: str,
        params: OptimizeParams,
        inputs: Sequence[PromptInput],
        *,
        task_id: str | None = None,
    ) -> list[RewriteResult | RewriteFailure]:
        """One task on ``model``'s queue; results keep the input order.

        A caller that passes a deterministic ``task_id`` (say, derived from its job and batch) gets the stored
        result of an earlier send with that id instead of new work, e.g. after its own restart.
        """
        if not inputs:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        kwargs = {
            "model": model,
            "params": params.as_dict(),
            "items": [{"prompt": item.prompt, "context": item.context} for item in inputs],
        }
        if task_id is not None:
            stored = await self._call(self._stored_success, task_id)
            if stored is not None:
                return decode_entries(stored, inputs)
        result = await self._call(self._send, kwargs, queue_for_model(model), task_id)
        value = await self._wait(result, deadline, model)
        return decode_entries(value, inputs)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- blocking work, run on the client's threads ---------------------------------------------------------

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    def _stored_success(self, task_id: str) -> Any:
        try:
            meta = self._app.backend.get_task_meta(task_id)
        except OperationalError as exc:
            raise EngineUnavailableError(f"the optimizer result backend is unreachable: {exc}") from exc
        return meta.get("result") if meta.get("status") == "SUCCESS" else None

    def _send(self, kwargs: dict[str, Any], queue: str, task_id: str | None) -> Any:
        try:
            return self._app.send_task(OPTIMIZE_BATCH_TASK, kwargs=kwargs, queue=queue, task_id=task_id)
        except OperationalError as exc:
            raise EngineUnavailableError(f"the optimizer broker is unreachable: {exc}") from exc

    async def _wait(self, result: Any, deadline: float, model: str) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                state = await self._call(self._give_up, result)
                raise EngineUnavailableError(
                    f"no optimizer worker for {model!r} finished task {result.id} within {self._timeout_s:g}s "
                    f"(state {state}, queue {queue_for_model(model)})"
                )
            try:
                state, value = await self._call(self._get, result, min(self._wait_slice_s, remaining))
            except CeleryTimeoutError:
                continue
            except OperationalError as exc:
                raise EngineUnavailableError(f"the optimizer result backend is unreachable: {exc}") from exc
            if state == "SUCCESS":
                return value
            if isinstance(value, BpoError):
                raise value
            raise BpoError(f"optimizer task {result.id} ended {state}: {value!r}")

    @staticmethod
    def _get(result: Any, timeout_s: float) -> tuple[str, Any]:
        value = result.get(timeout=timeout_s, propagate=False)
        return str(result.state), value

    def _give_up(self, result: Any) -> str:
        state = str(result.state)
        # Stop listening for a result nobody awaits any more; the result itself stays stored for a re-send.
        self._app.backend.remove_pending_result(result)
        return state


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
