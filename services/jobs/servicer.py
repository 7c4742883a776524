"""JobsService: submit a corpus, watch it flow through the stages, cancel it, report on it, export it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from bpo.errors import InvalidConfigurationError, JobNotFoundError
from bpo.grpc_server import ServicerContext
from bpo.messages import STAGE_VALUES, from_json, prompt_hash, to_json
from bpo.pipeline.jobspec import endpoint_key, stages_of
from bpo.pipeline.report import build_report
from bpo.pipeline.runtime import Runtime
from bpo.store.repository import JobRow, NewItem
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc

STATE_VALUES = {
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "cancelled": pb.JOB_STATE_CANCELLED,
    "partially_failed": pb.JOB_STATE_PARTIALLY_FAILED,
    "failed": pb.JOB_STATE_FAILED,
}
SUBMIT_CHUNK = 256
WATCH_INTERVAL_S = 0.5


class JobsServicer(pb_grpc.JobsServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._store = runtime.store

    # -- helpers -----------------------------------------------------------------------------------------

    def _job_row(self, job_id: str) -> JobRow:
        row = self._store.get_job(job_id)
        if row is None:
            raise JobNotFoundError(f"job {job_id!r} not found")
        return row

    def _progress(self, row: JobRow) -> pb.JobProgress:
        total, stages, finished = self._store.stage_counts(row)
        return pb.JobProgress(
            job_id=row.job_id,
            state=STATE_VALUES[row.state],
            items=total,
            finished=finished,
            stages=[
                pb.StageProgress(stage=STAGE_VALUES[s.stage], total=s.total, done=s.done, failed=s.failed)
                for s in stages
            ],
        )

    def _job(self, row: JobRow) -> pb.Job:
        return pb.Job(
            job_id=row.job_id,
            spec=from_json(row.spec, pb.JobSpec),
            state=STATE_VALUES[row.state],
            created_at_unix_ms=row.created_at_ms,
            finished_at_unix_ms=row.finished_at_ms,
            progress=self._progress(row),
        )

    # -- RPCs --------------------------------------------------------------------------------------------

    async def SubmitJob(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.SubmitJobRequest], context: ServicerContext
    ) -> pb.SubmitJobResponse:
        spec: pb.JobSpec | None = None
        job_id = ""
        accepted = rejected = duplicates = 0
        chunk: list[pb.PromptItem] = []
        async for request in request_iterator:
            kind = request.WhichOneof("payload")
            if spec is None:
                if kind != "spec":
                    raise InvalidConfigurationError("the first message of SubmitJob must carry the job spec")
                spec = request.spec
                stages = stages_of(spec)
                platform = self._rt.settings.platform
                endpoint_key(spec.target, platform.target_engine, platform.target_model)
                endpoint_key(spec.judge, platform.judge_engine, platform.judge_model)
                job_id = await asyncio.to_thread(self._store.create_job, spec.name, to_json(spec), stages)
                self._rt.metrics.jobs.labels("submitted").inc()
                continue
            if kind == "rejected":
                rejected += 1
                await asyncio.to_thread(
                    self._store.add_rejected, job_id, request.rejected.line, request.rejected.reason
                )
            elif kind == "item":
                if not request.item.prompt.strip():
                    # Recorded as a failed line with its reason; the rest of the corpus goes on.
                    rejected += 1
                    await asyncio.to_thread(
                        self._store.add_rejected, job_id, request.item.line, "prompt is empty or only whitespace"
                    )
                    continue
                chunk.append(request.item)
                if len(chunk) >= SUBMIT_CHUNK:
                    inserted, dup = await asyncio.to_thread(self._add_and_publish, job_id, chunk)
                    accepted, duplicates, chunk = accepted + inserted, duplicates + dup, []
            else:
                raise InvalidConfigurationError("only the first message of SubmitJob may carry a spec")
        if spec is None:
            raise InvalidConfigurationError("SubmitJob received no job spec")
        if chunk:
            inserted, dup = await asyncio.to_thread(self._add_and_publish, job_id, chunk)
            accepted, duplicates = accepted + inserted, duplicates + dup
        await asyncio.to_thread(self._store.finish_job_if_complete, job_id)
        return pb.SubmitJobResponse(job_id=job_id, accepted=accepted, rejected=rejected, duplicates=duplicates)

    def _add_and_publish(self, job_id: str, chunk: list[pb.PromptItem]) -> tuple[int, int]:
        new_items = [
            NewItem(
                source_id=item.source_id or str(item.line),
                line=item.line,
                prompt=item.prompt,
                context=item.context or None,
                category=item.category or None,
                prompt_hash=prompt_hash(item.prompt, item.context or None),
            )
            for item in chunk
        ]
        inserted, duplicates = self._store.add_items(job_id, new_items)
        inserted_set = set(inserted)
        from bpo.store.repository import item_id_for

        for item in chunk:
            item_id = item_id_for(job_id, item.source_id or str(item.line))
            if item_id not in inserted_set:
                continue
            inserted_set.discard(item_id)  # a repeated source id inside the chunk publishes once
            message = pb.PromptItem()
            message.CopyFrom(item)
            message.item_id = item_id
            message.job_id = job_id
            message.source_id = item.source_id or str(item.line)
            self._rt.publish(self._rt.topic("prompts"), item_id, message.SerializeToString())
        return len(inserted), duplicates

    async def GetJob(  # noqa: N802 - gRPC method name
        self, request: pb.GetJobRequest, context: ServicerContext
    ) -> pb.GetJobResponse:
        row = await asyncio.to_thread(self._job_row, request.job_id)
        return pb.GetJobResponse(job=await asyncio.to_thread(self._job, row))

    async def WatchJob(  # noqa: N802 - gRPC method name
        self, request: pb.WatchJobRequest, context: ServicerContext
    ) -> AsyncIterator[pb.WatchJobResponse]:
        last: pb.JobProgress | None = None
        while True:
            row = await asyncio.to_thread(self._job_row, request.job_id)
            progress = await asyncio.to_thread(self._progress, row)
            if progress != last:
                yield pb.WatchJobResponse(progress=progress)
                last = progress
            if row.state != "running":
                return
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def CancelJob(  # noqa: N802 - gRPC method name
        self, request: pb.CancelJobRequest, context: ServicerContext
    ) -> pb.CancelJobResponse:
        await asyncio.to_thread(self._job_row, request.job_id)
        if await asyncio.to_thread(self._store.cancel_job, request.job_id):
            self._rt.metrics.jobs.labels("cancelled").inc()
        row = await asyncio.to_thread(self._job_row, request.job_id)
        return pb.CancelJobResponse(job=await asyncio.to_thread(self._job, row))

    async def GetJobReport(  # noqa: N802 - gRPC method name
        self, request: pb.GetJobReportRequest, context: ServicerContext
    ) -> pb.GetJobReportResponse:
        row = await asyncio.to_thread(self._job_row, request.job_id)
        job = await asyncio.to_thread(self._job, row)
        rows = await asyncio.to_thread(self._store.report_rows, request.job_id)
        return pb.GetJobReportResponse(report=build_report(job, rows))

    async def ExportJob(  # noqa: N802 - gRPC method name
        self, request: pb.ExportJobRequest, context: ServicerContext
    ) -> AsyncIterator[pb.ExportJobResponse]:
        await asyncio.to_thread(self._job_row, request.job_id)
        # Page by page, so a job of millions of items streams in bounded memory.
        after: tuple[int, str] | None = None
        while page := await asyncio.to_thread(self._store.items_page, request.job_id, after):
            for row in page:
                yield pb.ExportJobResponse(item_json=json.dumps(export_item(row), ensure_ascii=False))
            after = (page[-1]["line"], page[-1]["source_id"])


def export_item(row: dict[str, Any]) -> dict[str, Any]:
    def jsonable(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        return str(value) if value.__class__.__name__ == "UUID" else value

    return {key: jsonable(value) for key, value in row.items()}
