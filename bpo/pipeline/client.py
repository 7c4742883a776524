"""A client of the Jobs service: submit a corpus, wait for jobs, read their reports and items.

``bpo submit``, ``bpo eval`` and ``bpo augment`` all drive the platform through this one class, so a corpus is
streamed, a malformed line is reported and an RPC error is translated the same way everywhere.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import grpc

from bpo.corpus.formats import CorpusError, CorpusRecord, read_corpus
from bpo.errors import BpoError, error_for_status
from bpo.grpc_server import message_size_options
from bpo.settings import BpoSettings
from bpo.tls import channel_credentials
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


ADMIN_TOKEN_FILE = "admin.token"


def admin_token_path(settings: BpoSettings) -> Path:
    """Where ``bpo up`` keeps the token of its admin team (mode 0600)."""
    return settings.state_dir / "stack" / ADMIN_TOKEN_FILE


def client_token(settings: BpoSettings) -> str | None:
    """The caller's token: ``BPO_CLIENT__TOKEN``, else ``BPO_CLIENT__TOKEN_FILE``, else the admin token of the
    platform ``bpo up`` runs on this machine."""
    client = settings.client
    if client.token is not None:
        return client.token.get_secret_value()
    for path in (client.token_file, admin_token_path(settings)):
        if path is not None and path.is_file():
            return path.read_text(encoding="utf-8").strip() or None
    return None


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (also over plaintext, which call credentials refuse)."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._metadata]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)  # fmt: skip

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


def open_channel(address: str, settings: BpoSettings, *, with_token: bool = True) -> grpc.Channel:
    """A channel to one of the platform's services as this client's caller: the platform's message size limit
    both ways, TLS when a CA bundle or client certificate is configured, and the caller's bearer token."""
    options: list[tuple[str, Any]] = list(message_size_options(settings.platform.grpc_max_message_bytes))
    if settings.client.server_name:
        options.append(("grpc.ssl_target_name_override", settings.client.server_name))
    credentials = channel_credentials(settings.client)
    if credentials is not None:
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    token = client_token(settings) if with_token else None
    return with_bearer_token(channel, token) if token else channel


def with_bearer_token(channel: grpc.Channel, token: str) -> grpc.Channel:
    """``channel`` with the caller's ``authorization: Bearer`` metadata on every call."""
    return grpc.intercept_channel(channel, _BearerToken(token))


class JobsClient:
    def __init__(self, address: str, settings: BpoSettings, *, poll_s: float = 2.0) -> None:
        self.address = address
        self._channel = open_channel(address, settings)
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
