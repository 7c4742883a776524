"""A client of the Jobs service: submit a corpus, wait for jobs, read their reports and items.

``bpo submit``, ``bpo eval`` and ``bpo augment`` all drive the platform through this one class, so a corpus is
streamed, a malformed line is reported and an RPC error is translated the same way everywhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import grpc

from bpo.corpus.formats import CorpusError, CorpusRecord, read_corpus
from bpo.errors import BpoError, error_for_status
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc

FINISHED_STATES = (
    pb.JOB_STATE_SUCCEEDED,
    pb.JOB_STATE_PARTIALLY_FAILED,
    pb.JOB_STATE_FAILED,
    pb.JOB_STATE_CANCELLED,
)


def rpc_error(exc: grpc.RpcError) -> BpoError:
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    if code == "UNAVAILABLE":
        details = f"{details} (is the platform up? `bpo up`)"
    return error_for_status(code, details)


def corpus_entries(
    corpus: Path, field: str | None = None, limit: int | None = None
) -> Iterator[CorpusRecord | CorpusError]:
    return islice(read_corpus(corpus, field), limit)


def submit_requests(
    spec: pb.JobSpec,
    entries: Iterable[CorpusRecord | CorpusError],
    on_bad_line: Callable[[CorpusError], None] | None = None,
) -> Iterator[pb.SubmitJobRequest]:
    """The SubmitJob stream: the spec, then one message per record; a bad line travels as a rejection."""
    yield pb.SubmitJobRequest(spec=spec)
    for entry in entries:
        if isinstance(entry, CorpusError):
            if on_bad_line is not None:
                on_bad_line(entry)
            yield pb.SubmitJobRequest(rejected=pb.RejectedLine(line=entry.line, reason=entry.reason))
        else:
            yield pb.SubmitJobRequest(
                item=pb.PromptItem(
                    source_id=entry.id, prompt=entry.prompt, context=entry.context or "",
                    category=entry.category or "", line=entry.line,
                )
            )  # fmt: skip


def _unary(method: Callable[[Any], Any], request: Any) -> Any:
    """One RPC, its failure translated into the platform's error for that status."""
    try:
        return method(request)
    except grpc.RpcError as exc:
        raise rpc_error(exc) from None


class JobsClient:
    def __init__(self, address: str, *, poll_s: float = 2.0) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.JobsServiceStub(self._channel)
        self._poll_s = poll_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self,
        spec: pb.JobSpec,
        entries: Iterable[CorpusRecord | CorpusError],
        on_bad_line: Callable[[CorpusError], None] | None = None,
    ) -> pb.SubmitJobResponse:
        reply: pb.SubmitJobResponse = _unary(self.stub.SubmitJob, submit_requests(spec, entries, on_bad_line))
        return reply

    def get(self, job_id: str) -> pb.Job:
        job: pb.Job = _unary(self.stub.GetJob, pb.GetJobRequest(job_id=job_id)).job
        return job

    def report(self, job_id: str) -> pb.JobReport:
        report: pb.JobReport = _unary(self.stub.GetJobReport, pb.GetJobReportRequest(job_id=job_id)).report
        return report

    def export(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Every item of the job, with each stage's stored output, in corpus order."""
        try:
            for chunk in self.stub.ExportJob(pb.ExportJobRequest(job_id=job_id)):
                yield json.loads(chunk.item_json)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    def wait(
        self,
        job_ids: Sequence[str],
        on_progress: Callable[[list[pb.Job]], None] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> list[pb.Job]:
        """Poll until every job has finished (in any of ``FINISHED_STATES``); returns their final state."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            jobs = [self.get(job_id) for job_id in job_ids]
            if on_progress is not None:
                on_progress(jobs)
            if all(job.state in FINISHED_STATES for job in jobs):
                return jobs
            if deadline is not None and time.monotonic() > deadline:
                waiting = [job.job_id for job in jobs if job.state not in FINISHED_STATES]
                raise TimeoutError(f"jobs still running after {timeout_s:.0f} s: {', '.join(waiting)}")
            time.sleep(self._poll_s)
