"""What both worker clients share: Celery's blocking client API run on the client's own threads, and a result
awaited in short slices until a deadline.

Celery's client API blocks (publishing, and waiting on the result backend's pub/sub), so every call runs on the
client's own small thread pool: the event loop never blocks, and a burst of batches cannot starve the loop's
default executor that other code relies on. Waiting is done in short slices, so a cancelled caller frees its
thread within a slice.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from celery.exceptions import TimeoutError as CeleryTimeoutError  # type: ignore[import-untyped]
from kombu.exceptions import OperationalError

from bpo.errors import BpoError, EngineUnavailableError

T = TypeVar("T")


class CeleryTaskClient:
    """Sends one kind of task (``task_name``; ``task_kind`` names it in errors) and awaits its results."""

    task_name: str
    task_kind: str

    def __init__(self, app: Any, timeout_s: float, *, max_waiting: int, wait_slice_s: float) -> None:
        """``timeout_s`` bounds one task from sending to result; ``max_waiting`` tasks are awaited at once."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._app = app
        self._timeout_s = timeout_s
        self._wait_slice_s = wait_slice_s
        self._executor = ThreadPoolExecutor(max_workers=max_waiting, thread_name_prefix=f"bpo-{self.task_kind}-client")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self._timeout_s

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    async def _send_and_wait(self, kwargs: dict[str, Any], model: str, queue: str, task_id: str | None) -> Any:
        deadline = self._deadline()
        result = await self._call(self._send, kwargs, queue, task_id)
        return await self._wait(result, deadline, model, queue)

    def _send(self, kwargs: dict[str, Any], queue: str, task_id: str | None) -> Any:
        try:
            return self._app.send_task(self.task_name, kwargs=kwargs, queue=queue, task_id=task_id)
        except OperationalError as exc:
            raise EngineUnavailableError(f"the optimizer broker is unreachable: {exc}") from exc

    async def _wait(self, result: Any, deadline: float, model: str, queue: str) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                state = await self._call(self._give_up, result)
                raise EngineUnavailableError(
                    f"no worker for {model!r} finished {self.task_kind} task {result.id} within "
                    f"{self._timeout_s:g}s (state {state}, queue {queue})"
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
            raise BpoError(f"{self.task_kind} task {result.id} ended {state}: {value!r}")

    @staticmethod
    def _get(result: Any, timeout_s: float) -> tuple[str, Any]:
        value = result.get(timeout=timeout_s, propagate=False)
        return str(result.state), value

    def _give_up(self, result: Any) -> str:
        state = str(result.state)
        # Stop listening for a result nobody awaits any more; the result itself stays stored for a re-send.
        self._app.backend.remove_pending_result(result)
        return state
