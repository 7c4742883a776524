"""JobsService: submit a corpus, watch it flow through the stages, cancel it, report on it, export it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from bpo.auth import Caller, current_caller
from bpo.endpoints import EndpointConfig
from bpo.errors import EngineUnavailableError, InvalidConfigurationError, JobNotFoundError
from bpo.grpc_server import ServicerContext
from bpo.messages import STAGE_VALUES, from_json, prompt_hash, to_json
from bpo.pipeline.admission import Admission
from bpo.pipeline.jobspec import endpoint_name, stages_of
from bpo.pipeline.quotas import QuotaGuard
from bpo.pipeline.report import build_report
from bpo.pipeline.runtime import Runtime
from bpo.store.repository import JobRow, NewItem, PipelineStore
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc

STATE_VALUES = {
    "submitting": pb.JOB_STATE_UNSPECIFIED,
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "cancelled": pb.JOB_STATE_CANCELLED,
    "partially_failed": pb.JOB_STATE_PARTIALLY_FAILED,
    "failed": pb.JOB_STATE_FAILED,
}
SUBMIT_CHUNK = 1000
MAX_REASON_CHARS = 2000
WATCH_INTERVAL_S = 0.5


class JobsServicer(pb_grpc.JobsServiceServicer):
    def __init__(self, runtime: Runtime, admission: Admission, on_submitted: Callable[[], None]) -> None:
        self._rt = runtime
        self._store = runtime.store
        self._admission = admission
        self._on_submitted = on_submitted

    # -- helpers -----------------------------------------------------------------------------------------

    def _job_row(self, job_id: str, caller: Caller) -> JobRow:
        """The job, as its team (or an admin) sees it; another team's job does not exist for this caller."""
        row = self._store.get_job(job_id)
        if row is None or row.state == "submitting" or not (caller.admin or row.team_id == caller.team_id):
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
            team=row.team,
        )

    # -- RPCs --------------------------------------------------------------------------------------------

    async def SubmitJob(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.SubmitJobRequest], context: ServicerContext
    ) -> pb.SubmitJobResponse:
        """Atomic: the job exists for the stages only once its whole corpus arrived. A stream that breaks off
        (a parse error in the client, a disconnect, ``bpo down``) leaves no job behind, and nobody has its id."""
        caller = current_caller()
        submission = _Submission(self._store, self._admission, caller, self._rt.quotas)
        try:
            async for request in request_iterator:
                await submission.take(request)
            reply = await submission.commit()
        except BaseException:
            await asyncio.shield(asyncio.to_thread(submission.abort))
            raise
        metrics = self._rt.metrics
        metrics.jobs.labels("submitted").inc()
        metrics.items_submitted.labels("accepted").inc(reply.accepted)
        metrics.items_submitted.labels("rejected").inc(reply.rejected)
        metrics.items_submitted.labels("duplicate").inc(reply.duplicates)
        # The sweep publishes the new job's items (and ends a job of rejected lines only) right away.
        self._on_submitted()
        return reply

    async def GetJob(  # noqa: N802 - gRPC method name
        self, request: pb.GetJobRequest, context: ServicerContext
    ) -> pb.GetJobResponse:
        row = await asyncio.to_thread(self._job_row, request.job_id, current_caller())
        return pb.GetJobResponse(job=await asyncio.to_thread(self._job, row))

    async def WatchJob(  # noqa: N802 - gRPC method name
        self, request: pb.WatchJobRequest, context: ServicerContext
    ) -> AsyncIterator[pb.WatchJobResponse]:
        last: pb.JobProgress | None = None
        caller = current_caller()
        while True:
            row = await asyncio.to_thread(self._job_row, request.job_id, caller)
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
        caller = current_caller()
        await asyncio.to_thread(self._job_row, request.job_id, caller)
        if await asyncio.to_thread(self._store.cancel_job, request.job_id):
            self._rt.metrics.jobs.labels("cancelled").inc()
        row = await asyncio.to_thread(self._job_row, request.job_id, caller)
        return pb.CancelJobResponse(job=await asyncio.to_thread(self._job, row))

    async def GetJobReport(  # noqa: N802 - gRPC method name
        self, request: pb.GetJobReportRequest, context: ServicerContext
    ) -> pb.GetJobReportResponse:
        row = await asyncio.to_thread(self._job_row, request.job_id, current_caller())
        job = await asyncio.to_thread(self._job, row)
        rows = await asyncio.to_thread(self._store.report_rows, request.job_id)
        return pb.GetJobReportResponse(report=build_report(job, rows, self._prices(job.spec)))

    def _prices(self, spec: pb.JobSpec) -> dict[str, EndpointConfig]:
        """The declared endpoints whose prices the report's costs are computed at, by role."""
        platform = self._rt.settings.platform
        names = {
            "rewrite": spec.optimizer_model or platform.optimizer_model,
            "target": endpoint_name(spec.target, platform.target_model),
            "judge": endpoint_name(spec.judge, platform.judge_model),
        }
        declared = set(self._rt.endpoints.names())
        return {role: self._rt.endpoints.get(name) for role, name in names.items() if name in declared}

    async def ExportJob(  # noqa: N802 - gRPC method name
        self, request: pb.ExportJobRequest, context: ServicerContext
    ) -> AsyncIterator[pb.ExportJobResponse]:
        await asyncio.to_thread(self._job_row, request.job_id, current_caller())
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


class _Submission:
    """One SubmitJob stream: the spec, then items and rejected lines stored in chunks under a job that stays
    ``submitting`` (invisible, heartbeating) until ``commit``."""

    def __init__(self, store: PipelineStore, admission: Admission, caller: Caller, quotas: QuotaGuard) -> None:
        self._store = store
        self._admission = admission
        self._caller = caller
        self._quotas = quotas
        self.spec: pb.JobSpec | None = None
        self.job_id = ""
        self._items: list[NewItem] = []
        self._rejected: list[tuple[int, str]] = []
        self.accepted = self.rejected = self.duplicates = 0

    async def take(self, request: pb.SubmitJobRequest) -> None:
        kind = request.WhichOneof("payload")
        if self.spec is None:
            if kind != "spec":
                raise InvalidConfigurationError("the first message of SubmitJob must carry the job spec")
            spec = request.spec
            await asyncio.to_thread(self._admission.check_job_spec, spec, self._caller.team)
            await asyncio.to_thread(self._check_quotas, spec)
            self.job_id = await asyncio.to_thread(
                self._store.begin_job, spec.name, to_json(spec), stages_of(spec), self._caller.team_id
            )
            self.spec = spec
            return
        if kind == "rejected":
            self._rejected.append((request.rejected.line, request.rejected.reason[:MAX_REASON_CHARS]))
        elif kind == "item":
            item = request.item
            problem = self._admission.check_item(item.prompt, item.context)
            if problem is not None:
                # Recorded as a failed line with its reason; the rest of the corpus goes on.
                self._rejected.append((item.line, problem))
            else:
                self._items.append(
                    NewItem(
                        source_id=item.source_id or str(item.line),
                        line=item.line,
                        prompt=item.prompt,
                        context=item.context or None,
                        category=item.category or None,
                        prompt_hash=prompt_hash(item.prompt, item.context or None),
                    )
                )
        else:
            raise InvalidConfigurationError("only the first message of SubmitJob may carry a spec")
        if len(self._items) + len(self._rejected) >= SUBMIT_CHUNK:
            await asyncio.to_thread(self._flush)

    def _check_quotas(self, spec: pb.JobSpec) -> None:
        self._quotas.check_running_jobs(self._caller)
        self._quotas.check_items(self._caller, 0)
        roles = {"rewrite": "optimizer", "generate": "target", "judge": "judge"}
        self._quotas.check_tokens(self._caller, *(roles[stage] for stage in stages_of(spec)))

    def _flush(self) -> None:
        if self._items:
            # A submission over the team's daily items quota is refused as it crosses it, and discarded.
            self._quotas.check_items(self._caller, self.accepted + len(self._items))
            inserted, duplicates = self._store.add_items(self.job_id, self._items)
            self.accepted += len(inserted)
            self.duplicates += duplicates
        if self._rejected:
            self._store.add_rejected_lines(self.job_id, self._rejected)
            self.rejected += len(self._rejected)
        self._items, self._rejected = [], []
        self._store.heartbeat_job(self.job_id)

    async def commit(self) -> pb.SubmitJobResponse:
        if self.spec is None:
            raise InvalidConfigurationError("SubmitJob received no job spec")
        await asyncio.to_thread(self._flush)
        if self.accepted == 0 and self.rejected == 0:
            raise InvalidConfigurationError("the corpus holds no prompts")
        if not await asyncio.to_thread(self._store.start_job, self.job_id):
            raise EngineUnavailableError("the submission went silent for too long and was discarded; submit again")
        await asyncio.to_thread(self._store.add_usage, self._caller.team_id, "submitted", items=self.accepted)
        if self.accepted == 0:
            # Only rejected lines: nothing to process, and the job ends now (failed), not at the next sweep.
            await asyncio.to_thread(self._store.finish_jobs_if_complete, [self.job_id])
        return pb.SubmitJobResponse(
            job_id=self.job_id, accepted=self.accepted, rejected=self.rejected, duplicates=self.duplicates
        )

    def abort(self) -> None:
        if self.job_id:
            self._store.abort_job(self.job_id)
