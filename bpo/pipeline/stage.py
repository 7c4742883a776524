"""What every pipeline stage shares: decode a batch from its topic, skip what is already done or no longer
wanted, do the work on the service's event loop, write each output once, forward it, report failures.

The Kafka loop (``bpo.streaming``) calls ``handle`` from its own thread and commits offsets only after it
returns; a message ``handle`` reports as failed is retried and finally dead-lettered, and ``on_dead_letter``
marks its item failed with the reason so the job goes on without it.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from bpo.errors import BpoError
from bpo.metrics import PlatformMetrics
from bpo.pipeline.jobspec import JobLookup, ResolvedJob
from bpo.store.repository import PipelineStore
from bpo.streaming.kafka import InboundMessage, MessageFailure
from bpo.v1 import bpo_pb2 as pb

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

Publish = Callable[[str, str, bytes], None]
# Topic names by the stage that consumes them.
INPUT_TOPIC = {"rewrite": "prompts", "generate": "rewrites", "judge": "answers"}
OUTPUT_TOPIC = {"rewrite": "rewrites", "generate": "answers", "judge": "verdicts"}


class PermanentItemError(BpoError):
    """This item can never succeed (bad input): fail it now instead of retrying and dead-lettering."""

    status_code = "INVALID_ARGUMENT"


@dataclass(frozen=True, slots=True)
class StageContext:
    store: PipelineStore
    jobs: JobLookup
    publish: Publish
    topic: Callable[[str], str]
    metrics: PlatformMetrics
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class Work(Generic[M]):
    message: InboundMessage
    payload: M
    item_id: str
    job: ResolvedJob


class Stage(abc.ABC, Generic[M]):
    name: str
    message_type: type[M]

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx

    @abc.abstractmethod
    def item_of(self, payload: M) -> pb.PromptItem: ...

    @abc.abstractmethod
    def stored_output(self, row: dict[str, object], payload: M) -> Message | None:
        """The output already written for this item (a redelivery), to forward instead of redoing the work."""

    @abc.abstractmethod
    async def process(self, work: Sequence[Work[M]]) -> list[tuple[Work[M], Exception]]:
        """Do the work, write each output once, forward it; return the items that failed."""

    # -- called from the Kafka thread --------------------------------------------------------------------

    def handle(self, messages: list[InboundMessage]) -> list[MessageFailure]:
        started = time.perf_counter()
        self.ctx.metrics.stage_batch_size.labels(self.name).observe(len(messages))
        failures: list[MessageFailure] = []
        todo: list[Work[M]] = []
        for message in messages:
            try:
                payload = self.message_type.FromString(message.value)
            except DecodeError as exc:
                failures.append(MessageFailure(message, exc))
                continue
            item = self.item_of(payload)
            try:
                work = self._admit(message, payload, item)
            except Exception as exc:
                failures.append(MessageFailure(message, exc))
                continue
            if work is not None:
                todo.append(work)
        if todo:
            future = asyncio.run_coroutine_threadsafe(self._process_safely(todo), self.ctx.loop)
            for work, error in future.result():
                if isinstance(error, PermanentItemError):
                    self._fail(work.item_id, work.job.job_id, str(error))
                    self.ctx.metrics.stage_messages.labels(self.name, "failed").inc()
                else:
                    failures.append(MessageFailure(work.message, error))
        self.ctx.metrics.stage_messages.labels(self.name, "processed").inc(len(messages) - len(failures))
        self.ctx.metrics.stage_latency.labels(self.name).observe(time.perf_counter() - started)
        return failures

    async def _process_safely(self, work: list[Work[M]]) -> list[tuple[Work[M], Exception]]:
        try:
            return await self.process(work)
        except Exception as exc:  # the whole batch failed (engine down): each message is retried on its own
            log.warning("%s batch of %d failed: %s", self.name, len(work), exc)
            return [(w, exc) for w in work]

    def _admit(self, message: InboundMessage, payload: M, item: pb.PromptItem) -> Work[M] | None:
        job = self.ctx.jobs.get(item.job_id)
        if not job.active or self.name not in job.stages:
            self.ctx.metrics.stage_messages.labels(self.name, "skipped").inc()
            return None
        row = self.ctx.store.get_item(item.item_id)
        if row is None or row["status"] in ("failed", "cancelled"):
            self.ctx.metrics.stage_messages.labels(self.name, "skipped").inc()
            return None
        stored = self.stored_output(row, payload)
        if stored is not None:
            # Already done by an earlier delivery: forward what was written, never recompute it.
            self.ctx.metrics.stage_messages.labels(self.name, "redelivered").inc()
            self.forward(job, item.item_id, stored)
            return None
        return Work(message, payload, item.item_id, job)

    def write_once_and_forward(self, work: Work[M], output: Message, write: Callable[[], bool]) -> None:
        """Write this stage's output (once per item) and forward it; if another delivery wrote first, what
        is stored is the result, and that is what goes on."""
        if write():
            self.forward(work.job, work.item_id, output)
            return
        row = self.ctx.store.get_item(work.item_id)
        stored = self.stored_output(row, work.payload) if row is not None else None
        if stored is not None:
            self.forward(work.job, work.item_id, stored)

    def forward(self, job: ResolvedJob, item_id: str, output: Message) -> None:
        self.ctx.publish(self.ctx.topic(OUTPUT_TOPIC[self.name]), item_id, output.SerializeToString())
        if job.is_last(self.name):
            self.ctx.store.finish_job_if_complete(job.job_id)

    def _fail(self, item_id: str, job_id: str, reason: str) -> None:
        if self.ctx.store.mark_failed(item_id, self.name, reason):
            self.ctx.metrics.items_failed.labels(self.name).inc()
        self.ctx.store.finish_job_if_complete(job_id)

    def on_dead_letter(self, message: InboundMessage, reason: str) -> None:
        try:
            item = self.item_of(self.message_type.FromString(message.value))
        except DecodeError:
            log.error(
                "undecodable message on %s[%d]@%d dead-lettered", message.topic, message.partition, message.offset
            )
            return
        self._fail(item.item_id, item.job_id, f"{self.name} failed after retries: {reason}")
