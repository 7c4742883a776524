"""On start, re-publish every unfinished item of every running job to the topic of the stage it needs next.

Postgres is the source of truth and Kafka only the transport: the embedded broker keeps nothing across a
restart, and even a real cluster may have lost in-flight work to a crash. Stages are idempotent per
(item, stage), so an item published twice is processed once.
"""

from __future__ import annotations

import logging
from typing import Any

from bpo.messages import from_json
from bpo.pipeline.runtime import Runtime
from bpo.pipeline.stage import INPUT_TOPIC
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


def republish_unfinished(runtime: Runtime) -> int:
    published = 0
    for job in runtime.store.running_jobs():
        for resume in runtime.store.unfinished_items(job):
            runtime.publish(
                runtime.topic(INPUT_TOPIC[resume.next_stage]),
                str(resume.item["item_id"]),
                message_for(resume.item, resume.next_stage),
            )
            published += 1
        runtime.store.finish_job_if_complete(job.job_id)
    if published:
        log.info("re-published %d unfinished items", published)
        runtime.metrics.jobs.labels("resumed_items").inc(published)
    return published
