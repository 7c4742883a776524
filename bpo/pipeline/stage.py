"""What every pipeline stage shares: decode a batch from its topic, skip what is already done or no longer
wanted, do the work on the service's event loop under a deadline, settle every item, forward the outputs.

Each item of a batch ends the batch in one of four ways, and never takes another job's items with it:

* **done**: its output is written once (one statement for the batch) and forwarded to the next topic;
* **failed**: bad input (``INVALID_ARGUMENT`` and its kind) fails the item now, with the reason;
* **parked**: a transient error of the item's own endpoint, worker or model (unavailable, rate-limited, past
  the batch deadline) parks it with exponential back-off; the jobs service's sweep re-publishes it when due,
  and after its last attempt it fails with the reason. Its partition moves on meanwhile;
* **poison**: a message that cannot be read or names no existing job and item is dead-lettered.

Work is grouped by what it needs (a job's endpoint, model and settings) and the groups run concurrently, each
bounded by the batch deadline, so one slow or hung endpoint delays only its own items. A failure of the platform
itself (Postgres or the broker unreachable) raises out of ``handle``: the Kafka loop pauses and retries the
same batch, which is safe because every write happens once and a redelivered item forwards its stored output.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from bpo.endpoints import Endpoints
from bpo.errors import BpoError
from bpo.metrics import FailureReason, PlatformMetrics
from bpo.pipeline.jobspec import JobLookup, ResolvedJob
from bpo.store.repository import PipelineStore, RetryPolicy, StageWrite, is_uuid
from bpo.store.teams import next_utc_midnight
from bpo.streaming.kafka import InboundMessage, MessageFailure, OutboundMessage, PublishedRecord, PublishError
from bpo.v1 import bpo_pb2 as pb

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

PublishMany = Callable[[Sequence[OutboundMessage]], list[PublishedRecord | PublishError]]
# Topic names by the stage that consumes them.
INPUT_TOPIC = {"rewrite": "prompts", "generate": "rewrites", "judge": "answers"}
OUTPUT_TOPIC = {"rewrite": "rewrites", "generate": "answers", "judge": "verdicts"}
# Errors of the input itself: another attempt would fail the same way.
PERMANENT_STATUS_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE"})
_MAX_REASON_CHARS = 2000


class PermanentItemError(BpoError):
    """This item can never succeed (bad input): fail it now instead of retrying it."""

    status_code = "INVALID_ARGUMENT"


class PoisonMessageError(BpoError):
    """A message no stage can act on: undecodable, or naming no existing job and item."""

    status_code = "INVALID_ARGUMENT"


@dataclass(frozen=True, slots=True)
class Done:
    output: Message
    write: StageWrite


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


@dataclass(frozen=True, slots=True)
class Retry:
    reason: str


Outcome = Done | Failed | Retry


def outcome_of(error: BaseException) -> Failed | Retry:
    """Bad input fails the item; anything else (an endpoint or worker down, a deadline, a bug) is retried,
    a bounded number of times."""
    reason = f"{type(error).__name__}: {error}"[:_MAX_REASON_CHARS]
    if isinstance(error, BpoError) and error.status_code in PERMANENT_STATUS_CODES:
        return Failed(reason)
    return Retry(reason)


@dataclass(frozen=True, slots=True)
class StageContext:
    store: PipelineStore
    jobs: JobLookup
    publish_many: PublishMany
    topic: Callable[[str], str]
    metrics: PlatformMetrics
    loop: asyncio.AbstractEventLoop
    retry: RetryPolicy
    batch_deadline_s: float
    # The declared endpoints, for the prices that cost each team's tokens (None: nothing is priced).
    endpoints: Endpoints | None = None


@dataclass(slots=True)
class Work(Generic[M]):
    message: InboundMessage
    payload: M
    item_id: str
    job: ResolvedJob


@dataclass(frozen=True, slots=True)
class _Forward:
    job: ResolvedJob
    item_id: str
    output: Message


class Stage(abc.ABC, Generic[M]):
    name: str
    message_type: type[M]
    # The role whose endpoint the stage calls: what its tokens count against (team quotas, cost).
    role: str

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        ctx.metrics.declare_stage(self.name)

    @abc.abstractmethod
    def item_of(self, payload: M) -> pb.PromptItem: ...

    @abc.abstractmethod
    def stored_output(self, row: dict[str, object], payload: M) -> Message | None:
        """The output already written for this item (a redelivery), to forward instead of redoing the work."""

    @abc.abstractmethod
    def endpoint_of(self, job: ResolvedJob) -> str:
        """The declared endpoint (or served optimizer) this stage calls for ``job``."""

    @abc.abstractmethod
    def group_key(self, work: Work[M]) -> Hashable:
        """Items with the same key are done together (same endpoint, model and settings)."""

    @abc.abstractmethod
    async def run_group(self, members: Sequence[Work[M]]) -> list[Outcome]:
        """Do the work of one group; one outcome per member, in order. Raising settles the whole group by the
        error's kind (bad input fails it, anything else parks it)."""

    # -- called from the Kafka thread --------------------------------------------------------------------

    def handle(self, messages: list[InboundMessage]) -> list[MessageFailure]:
        started = time.perf_counter()
        metrics = self.ctx.metrics
        metrics.stage_batch_size.labels(self.name).observe(len(messages))
        poison: list[MessageFailure] = []
        decoded: list[tuple[InboundMessage, M, pb.PromptItem]] = []
        for message in messages:
            try:
                payload = self.message_type.FromString(message.value)
            except DecodeError as exc:
                poison.append(MessageFailure(message, PoisonMessageError(f"not a {self.message_type.__name__}: {exc}")))
                continue
            item = self.item_of(payload)
            if not (is_uuid(item.item_id) and is_uuid(item.job_id)):
                poison.append(MessageFailure(message, PoisonMessageError("item_id and job_id must be UUIDs")))
                continue
            decoded.append((message, payload, item))
        jobs = self.ctx.jobs.get_many([item.job_id for _, _, item in decoded])
        rows = self.ctx.store.items_by_ids([item.item_id for _, _, item in decoded])
        work: list[Work[M]] = []
        redelivered: list[_Forward] = []
        unresolvable: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        for message, payload, item in decoded:
            job, row = jobs.get(item.job_id), rows.get(item.item_id)
            if job is None or row is None or str(row["job_id"]) != item.job_id:
                what = "job" if job is None else "item"
                poison.append(
                    MessageFailure(message, PoisonMessageError(f"no such {what} ({item.job_id}/{item.item_id})"))
                )
                continue
            if item.item_id in seen:
                metrics.stage_messages.labels(self.name, "duplicate").inc()
                continue
            seen.add(item.item_id)
            if isinstance(job, BpoError):
                unresolvable.append((item.job_id, item.item_id, f"the job's spec cannot be used: {job}"))
                continue
            if not job.active or self.name not in job.stages or row["status"] in ("failed", "cancelled"):
                metrics.stage_messages.labels(self.name, "skipped").inc()
                continue
            stored = self.stored_output(row, payload)
            if stored is not None:
                # Already done by an earlier delivery: forward what was written, never recompute it.
                metrics.stage_messages.labels(self.name, "redelivered").inc()
                redelivered.append(_Forward(job, item.item_id, stored))
                continue
            work.append(Work(message, payload, item.item_id, job))
        work = self._defer_over_quota(work)
        outcomes: list[Outcome] = []
        if work:
            outcomes = asyncio.run_coroutine_threadsafe(self._process(work), self.ctx.loop).result()
        self._settle(work, outcomes, redelivered, unresolvable)
        metrics.stage_messages.labels(self.name, "poison").inc(len(poison))
        metrics.stage_latency.labels(self.name).observe(time.perf_counter() - started)
        return poison

    def _defer_over_quota(self, work: list[Work[M]]) -> list[Work[M]]:
        """Items of a team whose daily token quota for this stage's role is used up wait for the next UTC day
        (without counting an attempt); everyone else's go on."""
        teams = {w.job.team_id for w in work if w.job.team_id}
        over = self.ctx.store.teams_over_token_quota(self.role, sorted(t for t in teams if t)) if teams else set()
        if not over:
            return work
        until = next_utc_midnight()
        held: dict[str, list[Work[M]]] = {}
        for w in work:
            if w.job.team_id in over:
                held.setdefault(w.job.team, []).append(w)
        for team, members in held.items():
            reason = f"quota tokens_per_day.{self.role} of team {team!r} is used up until {until.isoformat()}"
            self.ctx.store.defer_items([w.item_id for w in members], until, reason)
            self.ctx.metrics.stage_messages.labels(self.name, "deferred").inc(len(members))
        return [w for w in work if w.job.team_id not in over]

    async def _process(self, work: list[Work[M]]) -> list[Outcome]:
        groups: dict[Hashable, list[int]] = {}
        for index, member in enumerate(work):
            groups.setdefault(self.group_key(member), []).append(index)
        outcomes: list[Outcome] = [Retry("not processed")] * len(work)
        deadline = self.ctx.batch_deadline_s

        async def run(indices: list[int]) -> None:
            members = [work[i] for i in indices]
            try:
                results = await asyncio.wait_for(self.run_group(members), deadline)
                if len(results) != len(members):
                    raise BpoError(f"{self.name} returned {len(results)} outcomes for {len(members)} items")
            except TimeoutError:
                results = [Retry(f"no result within the {deadline:g}s batch deadline")] * len(members)
            except Exception as exc:
                log.warning("%s: a group of %d items failed: %s: %s", self.name, len(members), type(exc).__name__, exc)
                results = [outcome_of(exc)] * len(members)
            for index, outcome in zip(indices, results, strict=True):
                outcomes[index] = outcome

        await asyncio.gather(*(run(indices) for indices in groups.values()))
        return outcomes

    def _settle(
        self,
        work: Sequence[Work[M]],
        outcomes: Sequence[Outcome],
        redelivered: list[_Forward],
        unresolvable: list[tuple[str, str, str]],
    ) -> None:
        store, metrics = self.ctx.store, self.ctx.metrics
        done = [(w, o) for w, o in zip(work, outcomes, strict=True) if isinstance(o, Done)]
        written = store.record_outputs(self.name, [o.write for _, o in done])
        forwards = [*redelivered, *(_Forward(w.job, w.item_id, o.output) for w, o in done if w.item_id in written)]
        raced = [w for w, _ in done if w.item_id not in written]
        if raced:
            # Another delivery wrote first (or the item failed meanwhile): what is stored is the result.
            rows = store.items_by_ids([w.item_id for w in raced])
            for w in raced:
                row = rows.get(w.item_id)
                stored = self.stored_output(row, w.payload) if row is not None else None
                if stored is not None:
                    forwards.append(_Forward(w.job, w.item_id, stored))
        failures = [(w.item_id, o.reason) for w, o in zip(work, outcomes, strict=True) if isinstance(o, Failed)]
        reason_of = dict.fromkeys((item_id for item_id, _ in failures), FailureReason.REJECTED)
        failures += [(item_id, reason) for _, item_id, reason in unresolvable]
        reason_of |= dict.fromkeys((item_id for _, item_id, _ in unresolvable), FailureReason.UNUSABLE_JOB)
        refused = self._forward(forwards)
        failures += refused
        reason_of |= dict.fromkeys((item_id for item_id, _ in refused), FailureReason.TOO_LARGE)
        failed_now = store.fail_items(self.name, failures)
        retries = [(w.item_id, o.reason) for w, o in zip(work, outcomes, strict=True) if isinstance(o, Retry)]
        parked = store.park_items(self.name, retries, self.ctx.retry)
        metrics.stage_messages.labels(self.name, "done").inc(len(written))
        self._count_spend([(w, o) for w, o in done if w.item_id in written])
        self.on_written([(w, o) for w, o in done if w.item_id in written])
        metrics.stage_messages.labels(self.name, "failed").inc(len(failed_now) + len(parked.gave_up))
        metrics.stage_messages.labels(self.name, "parked").inc(len(parked.parked))
        for failure_class, count in Counter(reason_of[item_id] for item_id in failed_now).items():
            metrics.items_failed.labels(self.name, failure_class).inc(count)
        metrics.items_failed.labels(self.name, FailureReason.RETRIES_EXHAUSTED).inc(len(parked.gave_up))
        for item_id, reason in retries:
            if item_id in parked.parked:
                log.info("%s: item %s parked for a retry: %s", self.name, item_id, reason)
        ended = {f.job.job_id for f in forwards if f.job.is_last(self.name)}
        by_item = {w.item_id: w.job.job_id for w in work} | {item_id: job_id for job_id, item_id, _ in unresolvable}
        ended |= {by_item[item_id] for item_id in (*failed_now, *parked.gave_up) if item_id in by_item}
        if ended:
            store.finish_jobs_if_complete(sorted(ended))

    def _count_spend(self, written: Sequence[tuple[Work[M], Done]]) -> None:
        metrics, endpoints = self.ctx.metrics, self.ctx.endpoints
        for work, done in written:
            team = work.job.team or "-"
            metrics.team_tokens.labels(team, self.role, "in").inc(done.write.tokens_in)
            metrics.team_tokens.labels(team, self.role, "out").inc(done.write.tokens_out)
            name = self.endpoint_of(work.job)
            if endpoints is not None and name in endpoints.names():
                cost = endpoints.get(name).cost_usd(done.write.tokens_in, done.write.tokens_out)
                metrics.team_cost.labels(team, self.role).inc(cost)

    def on_written(self, written: Sequence[tuple[Work[M], Done]]) -> None:
        """Called with the items whose output this batch wrote, once per item (a redelivery writes nothing): for
        what a stage counts of its outputs."""

    def _forward(self, forwards: Sequence[_Forward]) -> list[tuple[str, str]]:
        """Publish every output with one wait for all acknowledgements. An output the broker refuses as too
        large fails its item (it would be refused on any retry); any other refusal is the broker's condition
        and raises, so that the loop retries the batch."""
        if not forwards:
            return []
        topic = self.ctx.topic(OUTPUT_TOPIC[self.name])
        results = self.ctx.publish_many(
            [OutboundMessage(topic, f.item_id, f.output.SerializeToString()) for f in forwards]
        )
        refused: list[tuple[str, str]] = []
        for forward, result in zip(forwards, results, strict=True):
            if isinstance(result, PublishError):
                if not result.too_large:
                    raise result
                refused.append((forward.item_id, f"its {self.name} output is larger than the broker accepts: {result}"))
        return refused

    def on_dead_letter(self, message: InboundMessage, reason: str) -> None:
        """A dead-lettered message that names an existing item fails that item, with the reason."""
        self.ctx.metrics.dead_letters.labels(self.name).inc()
        try:
            item = self.item_of(self.message_type.FromString(message.value))
        except DecodeError:
            return
        if not (is_uuid(item.item_id) and is_uuid(item.job_id)):
            return
        if self.ctx.store.fail_items(self.name, [(item.item_id, f"dead-lettered: {reason}")]):
            self.ctx.metrics.items_failed.labels(self.name, FailureReason.DEAD_LETTERED).inc()
            self.ctx.store.finish_jobs_if_complete([item.job_id])
