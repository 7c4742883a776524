"""The jobs service's sweep: nothing waits forever for a message that is not coming.

Postgres is the source of truth and Kafka only the transport: the embedded broker keeps nothing across a
restart, an external cluster deletes after its retention, and a stage may have parked an item for a retry. Every
``interval_s`` (and at once when woken, e.g. by a finished submission) the sweep hands to its next stage's topic
every unfinished item of a running job that is

* **unpublished**: a submission just completed, or an earlier publish failed;
* **parked** and due: its stage hit a transient error and its back-off has passed;
* **idle**: published longer than ``idle_s`` ago and not done since, in a job that has made no progress for
  ``idle_s`` either (its message was lost; in a job still moving it is queued behind others, and a
  million-item backlog must not be published again every ``idle_s``).

It also deletes submissions whose stream went silent (nobody got their job id) and ends running jobs with nothing
left to do. At start, a first pass re-publishes every unfinished item (the broker may have lost them all).
Stages are idempotent per (item, stage), so an item published twice is processed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bpo.messages import from_json
from bpo.metrics import FailureReason
from bpo.pipeline.runtime import Runtime
from bpo.pipeline.stage import INPUT_TOPIC
from bpo.store.repository import ResumeItem
from bpo.streaming.kafka import OutboundMessage, PublishError
from bpo.v1 import bpo_pb2 as pb

log = logging.getLogger(__name__)


def prompt_item(row: dict[str, Any]) -> pb.PromptItem:
    return pb.PromptItem(
        item_id=str(row["item_id"]),
        job_id=str(row["job_id"]),
        source_id=row["source_id"],
        prompt=row["prompt"],
        context=row["context"] or "",
        category=row["category"] or "",
        line=row["line"],
    )


def message_for(row: dict[str, Any], stage: str) -> bytes:
    if stage == "rewrite":
        return prompt_item(row).SerializeToString()
    if stage == "generate":
        return from_json(row["rewrite"], pb.Rewrite).SerializeToString()
    return from_json(row["answers"], pb.AnswerPair).SerializeToString()


@dataclass(frozen=True, slots=True)
class SweepReport:
    published: Counter[str]
    failed: int
    deleted_submissions: int
    finished_jobs: int


class Sweeper:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        platform = runtime.settings.platform
        self.interval_s = platform.sweep_interval_s
        self.idle_s = platform.sweep_idle_s
        self.batch = platform.sweep_batch
        self.submission_timeout_s = platform.submission_timeout_s
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Sweep now rather than at the next interval (safe from the event loop's thread only)."""
        self._wake.set()

    async def run(self) -> None:
        """Sweep forever: first everything unfinished (the broker may have lost it all), then what is due."""
        started = datetime.now(UTC)
        first = True
        while True:
            try:
                report = await asyncio.to_thread(self.sweep_once, 0.0 if first else self.idle_s, started)
                first = False
                if report.published or report.failed or report.deleted_submissions:
                    log.info(
                        "sweep: published %s, failed %d, deleted %d stale submissions, ended %d jobs",
                        dict(report.published), report.failed, report.deleted_submissions, report.finished_jobs,
                    )  # fmt: skip
            except Exception as exc:
                # Postgres or the broker away: the next pass tries again; nothing is lost meanwhile.
                log.warning("sweep failed: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
            self._wake.clear()

    def sweep_once(self, idle_s: float, not_after: datetime) -> SweepReport:
        store = self._rt.store
        deleted = store.delete_stale_submissions(self.submission_timeout_s)
        published: Counter[str] = Counter()
        failed = 0
        cutoff = max(not_after, datetime.now(UTC)) if idle_s > 0 else not_after
        # Bounded: each pass claims at most ``batch`` items, and a pass never claims its own items again.
        while due := store.claim_due_items(idle_s, self.batch, cutoff):
            sent, refused = self._publish(due)
            published.update(item.reason for item in sent)
            failed += refused
            if len(due) < self.batch:
                break
        running = [job.job_id for job in store.running_jobs()]
        finished = store.finish_jobs_if_complete(running) if running else []
        # Keeps reading a job's progress a sum of a few rows, however many batches counted into it.
        store.fold_progress()
        metrics = self._rt.metrics
        for reason, count in published.items():
            metrics.items_republished.labels(reason).inc(count)
        metrics.jobs_running.set(len(running) - len(finished))
        metrics.oldest_pending_item_age.set(store.oldest_unfinished_item_age_s())
        return SweepReport(published, failed, len(deleted), len(finished))

    def _publish(self, due: list[ResumeItem]) -> tuple[list[ResumeItem], int]:
        results = self._rt.publish_many(
            [
                OutboundMessage(
                    self._rt.topic(INPUT_TOPIC[item.next_stage]),
                    str(item.item["item_id"]),
                    message_for(item.item, item.next_stage),
                )
                for item in due
            ]
        )
        sent: list[ResumeItem] = []
        too_large: dict[str, list[tuple[str, str]]] = {}
        unpublished: list[str] = []
        for item, result in zip(due, results, strict=True):
            item_id = str(item.item["item_id"])
            if not isinstance(result, PublishError):
                sent.append(item)
            elif result.too_large:
                reason = f"its message is larger than the broker accepts: {result}"
                too_large.setdefault(item.next_stage, []).append((item_id, reason))
            else:
                unpublished.append(item_id)
        store = self._rt.store
        failed = 0
        for stage, items in too_large.items():
            count = len(store.fail_items(stage, items))
            self._rt.metrics.items_failed.labels(stage, FailureReason.TOO_LARGE).inc(count)
            failed += count
        if unpublished:
            store.unmark_published(unpublished)
            raise PublishError(f"{len(unpublished)} of {len(due)} items could not be published; retrying later")
        return sent, failed
