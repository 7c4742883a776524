"""The Optimizer and Jobs services over real gRPC on loopback, behind the platform's error-and-metrics
interceptor. The optimizer workers are replaced by a scripted rewriter (no Celery); the Jobs service runs on a
fresh database and a recording publisher (no Kafka). The full platform test covers the real workers."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from bpo.auth import Authenticator, AuthInterceptor
from bpo.endpoints import Endpoints, Secrets, default_declarations
from bpo.grpc_server import ErrorAndMetricsInterceptor
from bpo.messages import params_to_proto, to_json
from bpo.metrics import PlatformMetrics
from bpo.models.catalogue import ModelCatalogue
from bpo.optimizer.optimizer import OptimizeParams, RewriteFailure
from bpo.pipeline.admission import Admission
from bpo.pipeline.optimizer_models import OptimizerModels
from bpo.pipeline.quotas import QuotaGuard
from bpo.pipeline.rewriting import CachedRewriter, RewriteOutcome
from bpo.pipeline.runtime import Runtime
from bpo.settings import BpoSettings, EngineSettings, PlatformSettings
from bpo.store.db import migrate, open_pool
from bpo.store.repository import NewItem, PipelineStore, item_id_for
from bpo.streaming.kafka import KafkaSettings, OutboundMessage, PublishedRecord, PublishError
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc
from services.jobs.servicer import JobsServicer
from services.jobs.sweep import Sweeper
from services.rewriter.servicer import OptimizerServicer
from tests.integration.services import fresh_database

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DEFAULTS = OptimizeParams(temperature=0.6, top_p=0.9, max_new_tokens=256, seed=11, rounds=1)


class _Bearer:
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), ("authorization", f"Bearer {self._token}"))
        return details._replace(metadata=metadata)


class _UnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def bearer_token(token: str) -> list[Any]:
    """The caller's ``authorization`` metadata on every call of an asyncio channel (an asyncio channel files each
    interceptor under one kind of call only, so there is one per kind)."""
    return [kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


@dataclass(frozen=True)
class Access:
    """The store the services authenticate against, and the tokens of two teams on it."""

    store: PipelineStore
    token: str
    other_token: str


@asynccontextmanager
async def serving(
    register: Callable[[grpc.aio.Server], None], service: str, access: Access
) -> AsyncIterator[tuple[grpc.aio.Channel, PlatformMetrics, str]]:
    """The service behind the platform's interceptors (errors and metrics outside, authentication inside) and
    a channel to it as the first team."""
    metrics = PlatformMetrics()
    authenticate = AuthInterceptor(Authenticator(access.store.team_for_token))
    server = grpc.aio.server(interceptors=[ErrorAndMetricsInterceptor(metrics, service), authenticate])
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address, interceptors=bearer_token(access.token))
    try:
        yield channel, metrics, address
    finally:
        await channel.close()
        await server.stop(None)


def calls(metrics: PlatformMetrics, service: str, method: str, code: str) -> float:
    labels = {"service": service, "method": method, "code": code}
    return metrics.registry.get_sample_value("bpo_grpc_requests_total", labels) or 0.0


async def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- OptimizerService ---------------------------------------------------------------------------------------


class ScriptedRewriter(CachedRewriter):
    """Stands in for the rewriter and its workers: rewrites at once, or waits for ``release`` when ``hold``;
    prompts in ``failures`` come back as per-item failures with that status code."""

    def __init__(self, *, hold: bool = False, failures: dict[str, str] | None = None) -> None:  # no store, no workers
        self.hold = hold
        self.release = asyncio.Event()
        self.failures = failures or {}
        self.batches: list[tuple[str, OptimizeParams, list[str]]] = []
        self.running = 0
        self.cancelled = 0

    async def rewrite(self, items: Sequence[pb.PromptItem], model: str, params: OptimizeParams) -> list[RewriteOutcome]:
        self.batches.append((model, params, [i.prompt for i in items]))
        self.running += 1
        try:
            if self.hold:
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        return [
            RewriteOutcome(None, RewriteFailure(i.prompt, f"cannot rewrite {i.prompt!r}", self.failures[i.prompt]))
            if i.prompt in self.failures
            else RewriteOutcome(
                pb.Rewrite(item=i, optimized=f"Better: {i.prompt}", model=model, params=params_to_proto(params)),
                None,
            )
            for i in items
        ]


class LiveWorkers:
    """Which models live workers serve, as the workers' heartbeats would say."""

    def __init__(self, *models: str) -> None:
        self.models = {model: 1 for model in models}

    def live(self, *, fresh: bool = False) -> dict[str, int]:
        return dict(self.models)


def admission(*served: str, live: LiveWorkers | None = None) -> Admission:
    platform = PlatformSettings(optimizer_model="opt", max_item_bytes=64 * 1024)
    endpoints = Endpoints(default_declarations(EngineSettings()), EngineSettings(), Secrets(None, {}))
    return Admission(platform, OptimizerModels(served, live or LiveWorkers(*served), ModelCatalogue()), endpoints)


@pytest.fixture(scope="module")
def jobs_store(postgres_admin_url: str) -> Iterator[PipelineStore]:
    with fresh_database(postgres_admin_url, "bpo_grpc") as url:
        pool = open_pool(url, min_size=1, max_size=4)
        try:
            migrate(pool)
            yield PipelineStore(pool)
        finally:
            pool.close()


@pytest.fixture(scope="module")
def access(jobs_store: PipelineStore) -> Access:
    for team in ("alpha", "beta"):
        jobs_store.create_team(team)
    return Access(jobs_store, jobs_store.create_token("alpha")[1], jobs_store.create_token("beta")[1])


@asynccontextmanager
async def optimizer(
    access: Access,
    rewriter: ScriptedRewriter,
    *,
    batch_size: int = 8,
    max_in_flight: int = 64,
    live: LiveWorkers | None = None,
) -> AsyncIterator[tuple[pb_grpc.OptimizerServiceAsyncStub, PlatformMetrics]]:
    servicer = OptimizerServicer(
        rewriter,
        admission("opt", "m2", "other", live=live),
        QuotaGuard(access.store),
        DEFAULTS,
        batch_size=batch_size,
        max_in_flight=max_in_flight,
    )
    async with serving(lambda s: pb_grpc.add_OptimizerServiceServicer_to_server(servicer, s), "optimizer", access) as (
        channel,
        metrics,
        _,
    ):
        yield pb_grpc.OptimizerServiceStub(channel), metrics


async def test_optimize_and_its_error_codes(access: Access) -> None:
    rewriter = ScriptedRewriter(failures={"too long": "INVALID_ARGUMENT", "engine down": "UNAVAILABLE"})
    async with optimizer(access, rewriter) as (stub, metrics):
        reply = await stub.Optimize(pb.OptimizeRequest(prompt="Tell me about tides.", context="the Moon"))
        assert reply.rewrite.optimized == "Better: Tell me about tides."
        assert (reply.rewrite.item.prompt, reply.rewrite.item.context, reply.rewrite.model) == (
            "Tell me about tides.",
            "the Moon",
            "opt",
        )
        assert rewriter.batches[-1][1] == DEFAULTS
        await stub.Optimize(pb.OptimizeRequest(prompt="x", model="other", params=pb.OptimizeParams(rounds=3)))
        assert rewriter.batches[-1][:2] == ("other", OptimizeParams(0.6, 0.9, 256, 11, 3))

        for prompt, code, details in [
            ("   ", grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty or only whitespace"),
            ("too long", grpc.StatusCode.INVALID_ARGUMENT, "cannot rewrite 'too long'"),
            ("engine down", grpc.StatusCode.UNAVAILABLE, "cannot rewrite 'engine down'"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Optimize(pb.OptimizeRequest(prompt=prompt))
            assert (caught.value.code(), caught.value.details()) == (code, details)
        assert len(rewriter.batches) == 4  # the empty prompt never reached the rewriter

        # Admission: what the platform cannot serve is refused before any work, naming the field.
        for request, code, details in [
            (pb.OptimizeRequest(prompt="x", model="no-such-model"), grpc.StatusCode.INVALID_ARGUMENT,
             "model: 'no-such-model' is not served by this platform's optimizer workers; served: m2, opt, other"),
            (pb.OptimizeRequest(prompt="x", params=pb.OptimizeParams(temperature=-1)),
             grpc.StatusCode.INVALID_ARGUMENT, "params.temperature: must be a finite number >= 0"),
            (pb.OptimizeRequest(prompt="x", params=pb.OptimizeParams(rounds=99)), grpc.StatusCode.INVALID_ARGUMENT,
             "params.rounds: must be within 1..10"),
            (pb.OptimizeRequest(prompt="x" * (70 * 1024)), grpc.StatusCode.INVALID_ARGUMENT,
             "at most 65536 are accepted"),
        ]:  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Optimize(request)
            assert caught.value.code() == code and details in (caught.value.details() or ""), caught.value.details()
        assert len(rewriter.batches) == 4

        assert calls(metrics, "optimizer", "Optimize", "OK") == 2
        assert calls(metrics, "optimizer", "Optimize", "INVALID_ARGUMENT") == 6
        assert calls(metrics, "optimizer", "Optimize", "UNAVAILABLE") == 1
        assert metrics.registry.get_sample_value(
            "bpo_grpc_latency_seconds_count", {"service": "optimizer", "method": "Optimize"}
        ) == pytest.approx(9)


async def test_a_served_model_without_a_live_worker_is_unavailable_at_once(access: Access) -> None:
    rewriter = ScriptedRewriter()
    live = LiveWorkers("opt")
    async with optimizer(access, rewriter, live=live) as (stub, _):
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Optimize(pb.OptimizeRequest(prompt="x", model="m2"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no optimizer worker is serving 'm2' right now" in (caught.value.details() or "")
        assert time.monotonic() - started < 5 and rewriter.batches == []


async def test_resource_exhausted_beyond_max_in_flight(access: Access) -> None:
    rewriter = ScriptedRewriter(hold=True)
    async with optimizer(access, rewriter, max_in_flight=2) as (stub, metrics):
        held = [stub.Optimize(pb.OptimizeRequest(prompt=f"p{n}")) for n in range(2)]  # started at once
        await eventually(lambda: rewriter.running == 2)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Optimize(pb.OptimizeRequest(prompt="one too many"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at capacity" in (caught.value.details() or "")
        # In a batch stream, the requests beyond it are refused the same way, each in its own response; the
        # stream itself goes on.
        stream = stub.OptimizeBatch(iter([pb.OptimizeBatchRequest(request_id="r", prompt="q")]), timeout=10)
        (refused,) = [response async for response in stream]
        assert (refused.request_id, refused.error_code) == ("r", "RESOURCE_EXHAUSTED")
        assert "at capacity" in refused.error

        rewriter.release.set()
        assert [r.rewrite.optimized for r in await asyncio.gather(*held)] == ["Better: p0", "Better: p1"]
        # The slots are free again.
        assert (await stub.Optimize(pb.OptimizeRequest(prompt="now fine"))).rewrite.optimized == "Better: now fine"
        assert calls(metrics, "optimizer", "Optimize", "RESOURCE_EXHAUSTED") == 1
        assert calls(metrics, "optimizer", "OptimizeBatch", "OK") == 1
        assert calls(metrics, "optimizer", "Optimize", "OK") == 3


async def test_deadline_exceeded_is_honoured(access: Access) -> None:
    rewriter = ScriptedRewriter(hold=True)
    async with optimizer(access, rewriter, max_in_flight=1) as (stub, metrics):
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Optimize(pb.OptimizeRequest(prompt="slow"), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
        # The server gave up too: the rewrite was cancelled and its in-flight slot released.
        await eventually(lambda: rewriter.cancelled == 1 and rewriter.running == 0)
        await eventually(
            lambda: (
                calls(metrics, "optimizer", "Optimize", "DEADLINE_EXCEEDED")
                + calls(metrics, "optimizer", "Optimize", "CANCELLED")
                == 1
            )
        )
        rewriter.release.set()
        reply = await stub.Optimize(pb.OptimizeRequest(prompt="fast"), timeout=10)
        assert reply.rewrite.optimized == "Better: fast"


async def test_optimize_batch_streams_one_response_per_request_in_batches(access: Access) -> None:
    rewriter = ScriptedRewriter(failures={"too long": "INVALID_ARGUMENT"})
    async with optimizer(access, rewriter, batch_size=3) as (stub, metrics):
        call = stub.OptimizeBatch()
        for n in range(3):
            await call.write(pb.OptimizeBatchRequest(request_id=f"r{n}", prompt=f"prompt {n}"))
        # A full batch comes back while the stream is still open.
        first = [await asyncio.wait_for(call.read(), timeout=10) for _ in range(3)]
        assert all(isinstance(r, pb.OptimizeBatchResponse) for r in first)
        assert [(r.request_id, r.rewrite.optimized) for r in first if isinstance(r, pb.OptimizeBatchResponse)] == [
            (f"r{n}", f"Better: prompt {n}") for n in range(3)
        ]
        rest = [
            pb.OptimizeBatchRequest(request_id="empty", prompt="  "),
            pb.OptimizeBatchRequest(request_id="failing", prompt="too long"),
            pb.OptimizeBatchRequest(
                request_id="other-model", prompt="p", model="m2", params=pb.OptimizeParams(rounds=2)
            ),
            pb.OptimizeBatchRequest(request_id="last", prompt="last one", context="ctx"),
        ]
        for request in rest:
            await call.write(request)
        await call.done_writing()
        responses: dict[str, pb.OptimizeBatchResponse] = {}
        while (response := await asyncio.wait_for(call.read(), timeout=10)) is not grpc.aio.EOF:
            assert isinstance(response, pb.OptimizeBatchResponse)
            assert response.request_id not in responses
            responses[response.request_id] = response
        assert await call.code() == grpc.StatusCode.OK

    assert set(responses) == {"empty", "failing", "other-model", "last"}
    assert (responses["empty"].error_code, responses["empty"].error) == (
        "INVALID_ARGUMENT",
        "prompt is empty or only whitespace",
    )
    assert (responses["failing"].error_code, responses["failing"].error) == (
        "INVALID_ARGUMENT",
        "cannot rewrite 'too long'",
    )
    assert not responses["failing"].HasField("rewrite")
    assert responses["other-model"].rewrite.model == "m2" and responses["other-model"].rewrite.params.rounds == 2
    assert responses["last"].rewrite.item.context == "ctx" and responses["last"].error == ""
    # Batches of at most three, each one model with one set of parameters; the empty prompt went nowhere.
    assert [(model, prompts) for model, _, prompts in rewriter.batches] == [
        ("opt", ["prompt 0", "prompt 1", "prompt 2"]),
        ("opt", ["too long"]),
        ("m2", ["p"]),
        ("opt", ["last one"]),
    ]
    assert calls(metrics, "optimizer", "OptimizeBatch", "OK") == 1


# -- JobsService --------------------------------------------------------------------------------------------


@dataclass
class Jobs:
    stub: pb_grpc.JobsServiceAsyncStub
    store: PipelineStore
    runtime: Runtime
    metrics: PlatformMetrics
    sweeper: Sweeper
    address: str
    other_token: str
    published: list[tuple[str, str, bytes]] = field(default_factory=list)

    @asynccontextmanager
    async def stub_as(self, token: str | None) -> AsyncIterator[pb_grpc.JobsServiceAsyncStub]:
        """A stub calling with ``token`` (None: no authorization metadata at all)."""
        interceptors = bearer_token(token) if token is not None else []
        async with grpc.aio.insecure_channel(self.address, interceptors=interceptors) as channel:
            yield pb_grpc.JobsServiceStub(channel)

    def take_published(self) -> list[tuple[str, str, bytes]]:
        taken, self.published[:] = list(self.published), []
        return taken

    def sweep(self, idle_s: float = 0.0) -> None:
        """One pass of the jobs service's sweep (as it runs at start with ``idle_s`` 0)."""
        self.sweeper.sweep_once(idle_s, datetime.now(UTC))


@pytest.fixture
async def jobs(access: Access) -> AsyncIterator[Jobs]:
    jobs_store = access.store
    published: list[tuple[str, str, bytes]] = []

    def publish_many(messages: Sequence[OutboundMessage]) -> list[PublishedRecord | PublishError]:
        published.extend((m.topic, m.key or "", m.value) for m in messages)
        return [PublishedRecord(m.topic, 0, n) for n, m in enumerate(messages)]

    metrics = PlatformMetrics()
    runtime = Runtime(
        settings=BpoSettings(platform=PlatformSettings(optimizer_model="opt")),
        store=jobs_store,
        kafka=KafkaSettings(bootstrap_servers="unused:9092", topic_prefix="t"),
        metrics=metrics,
        publish_many=publish_many,
        loop=asyncio.get_running_loop(),
        endpoints=admission("opt").endpoints,
    )
    sweeper = Sweeper(runtime)
    servicer = JobsServicer(runtime, admission("opt"), lambda: None)
    async with serving(lambda s: pb_grpc.add_JobsServiceServicer_to_server(servicer, s), "jobs", access) as (
        channel,
        grpc_metrics,
        address,
    ):
        yield Jobs(
            pb_grpc.JobsServiceStub(channel), jobs_store, runtime, grpc_metrics, sweeper, address, access.other_token,
            published,
        )  # fmt: skip


def spec_request(*stages: pb.Stage.ValueType, **fields: object) -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(spec=pb.JobSpec(name="corpus", stages=list(stages), **fields))  # type: ignore[arg-type]


def item_request(source_id: str, line: int, prompt: str = "", **fields: str) -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(
        item=pb.PromptItem(source_id=source_id, line=line, prompt=prompt or f"prompt {source_id}", **fields)
    )


async def test_submit_get_report_and_export(jobs: Jobs) -> None:
    reply = await jobs.stub.SubmitJob(
        iter(
            [
                spec_request(pb.STAGE_REWRITE, pb.STAGE_GENERATE),
                item_request("a", 1),
                item_request("b", 2, context="passage", category="math"),
                item_request("a", 3, prompt="a repeat of a"),
                item_request("blank", 4, prompt="   "),
                pb.SubmitJobRequest(rejected=pb.RejectedLine(line=5, reason="not JSON")),
            ]
        )
    )
    job_id = reply.job_id
    assert (reply.accepted, reply.rejected, reply.duplicates) == (2, 2, 1)
    a, b = item_id_for(job_id, "a"), item_id_for(job_id, "b")
    # The sweep hands the new job's items to the first stage (the service wakes it on every submission).
    assert jobs.published == []
    jobs.sweep(idle_s=900)
    published = jobs.take_published()
    assert [(topic, key) for topic, key, _ in published] == [("t.prompts", a), ("t.prompts", b)]
    message = pb.PromptItem.FromString(published[1][2])
    assert (message.item_id, message.job_id, message.source_id, message.context, message.category, message.line) == (
        b,
        job_id,
        "b",
        "passage",
        "math",
        2,
    )

    job = (await jobs.stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert (job.state, job.spec.name, list(job.spec.stages)) == (
        pb.JOB_STATE_RUNNING,
        "corpus",
        [pb.STAGE_REWRITE, pb.STAGE_GENERATE],
    )
    assert (job.progress.items, job.progress.finished) == (4, 2)  # two items and two rejected lines
    assert [(s.stage, s.total, s.done, s.failed) for s in job.progress.stages] == [
        (pb.STAGE_REWRITE, 2, 0, 0),
        (pb.STAGE_GENERATE, 2, 0, 0),
    ]

    # The stages' work, written as they write it.
    store = jobs.store
    for item_id in (a, b):
        assert store.record_rewrite(
            item_id, {"optimized": "o"}, tokens_in=3, tokens_out=4, cache_hit=False, fallback_reason=None, final=False
        )
    assert store.record_answers(a, {"original_answer": "x"}, tokens_in=5, tokens_out=6, final=True)
    assert store.mark_failed(b, "generate", "target down")
    assert store.finish_job_if_complete(job_id)

    report = (await jobs.stub.GetJobReport(pb.GetJobReportRequest(job_id=job_id))).report
    assert (report.job.state, report.items, report.rewritten, report.failed, report.judged) == (
        pb.JOB_STATE_PARTIALLY_FAILED,
        2,
        2,
        3,
        0,
    )
    assert [(f.line, f.stage, f.reason) for f in report.failures] == [
        (2, pb.STAGE_GENERATE, "target down"),
        (4, pb.STAGE_UNSPECIFIED, "prompt is empty or only whitespace"),
        (5, pb.STAGE_UNSPECIFIED, "not JSON"),
    ]
    assert [(t.role, t.tokens_in, t.tokens_out) for t in report.tokens] == [
        ("rewrite", 6, 8),
        ("target", 5, 6),
        ("judge", 0, 0),
    ]

    exported = [json.loads(r.item_json) async for r in jobs.stub.ExportJob(pb.ExportJobRequest(job_id=job_id))]
    assert [(e["item_id"], e["status"], e["job_id"]) for e in exported] == [(a, "done", job_id), (b, "failed", job_id)]
    assert exported[0]["rewrite"] == {"optimized": "o"} and isinstance(exported[0]["created_at"], str)

    # Watching a finished job gives its progress once and ends.
    updates = [u.progress async for u in jobs.stub.WatchJob(pb.WatchJobRequest(job_id=job_id))]
    assert [(u.state, u.finished) for u in updates] == [(pb.JOB_STATE_PARTIALLY_FAILED, 4)]
    assert calls(jobs.metrics, "jobs", "SubmitJob", "OK") == 1


async def test_watch_follows_a_job_until_it_finishes(jobs: Jobs) -> None:
    reply = await jobs.stub.SubmitJob(iter([spec_request(pb.STAGE_REWRITE), item_request("only", 1)]))
    watch = jobs.stub.WatchJob(pb.WatchJobRequest(job_id=reply.job_id))
    first = await asyncio.wait_for(watch.read(), timeout=10)
    assert isinstance(first, pb.WatchJobResponse) and first.progress.state == pb.JOB_STATE_RUNNING
    item_id = item_id_for(reply.job_id, "only")
    await asyncio.to_thread(
        jobs.store.record_rewrite,
        item_id,
        {"optimized": "o"},
        tokens_in=1,
        tokens_out=1,
        cache_hit=False,
        fallback_reason=None,
        final=True,
    )
    await asyncio.to_thread(jobs.store.finish_job_if_complete, reply.job_id)
    last = first
    while (update := await asyncio.wait_for(watch.read(), timeout=10)) is not grpc.aio.EOF:
        assert isinstance(update, pb.WatchJobResponse)
        last = update
    assert last.progress.state == pb.JOB_STATE_SUCCEEDED
    assert [(s.stage, s.done) for s in last.progress.stages] == [(pb.STAGE_REWRITE, 1)]


async def test_cancel_job(jobs: Jobs) -> None:
    reply = await jobs.stub.SubmitJob(iter([spec_request(), item_request("x", 1), item_request("y", 2)]))
    cancelled = (await jobs.stub.CancelJob(pb.CancelJobRequest(job_id=reply.job_id))).job
    assert (cancelled.state, cancelled.progress.finished) == (pb.JOB_STATE_CANCELLED, 2)
    assert cancelled.finished_at_unix_ms >= cancelled.created_at_unix_ms > 0
    assert {r["status"] for r in jobs.store.items_of(reply.job_id)} == {"cancelled"}
    again = (await jobs.stub.CancelJob(pb.CancelJobRequest(job_id=reply.job_id))).job
    assert again.state == pb.JOB_STATE_CANCELLED
    assert jobs.runtime.metrics.registry.get_sample_value("bpo_jobs_total", {"event": "cancelled"}) == 1


async def test_a_corpus_of_rejected_lines_finishes_at_once(jobs: Jobs) -> None:
    reply = await jobs.stub.SubmitJob(
        iter([spec_request(), pb.SubmitJobRequest(rejected=pb.RejectedLine(line=1, reason="not JSON"))])
    )
    assert (reply.accepted, reply.rejected) == (0, 1)
    job = (await jobs.stub.GetJob(pb.GetJobRequest(job_id=reply.job_id))).job
    assert (job.state, job.progress.items, job.progress.finished) == (pb.JOB_STATE_FAILED, 1, 1)


@pytest.mark.parametrize(
    ("requests", "details"),
    [
        ([], "SubmitJob received no job spec"),
        ([item_request("a", 1)], "the first message of SubmitJob must carry the job spec"),
        ([spec_request(pb.STAGE_GENERATE)], "skip a stage"),
        ([spec_request(pb.STAGE_REWRITE, pb.STAGE_REWRITE)], "each at most once"),
        ([spec_request(optimizer_model="no-such-model")], "spec.optimizer_model: 'no-such-model' is not served"),
        ([spec_request(params=pb.OptimizeParams(top_p=2))], "spec.params.top_p"),
        ([spec_request(target=pb.ModelEndpoint(max_new_tokens=10**6))], "spec.target.max_new_tokens"),
        ([spec_request(judge_template="vibes")], "spec.judge_template"),
        ([spec_request()], "the corpus holds no prompts"),
        ([spec_request(), spec_request()], "only the first message of SubmitJob may carry a spec"),
    ],
)
async def test_submit_job_refuses_bad_streams(jobs: Jobs, requests: list[pb.SubmitJobRequest], details: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs.stub.SubmitJob(iter(requests))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details in (caught.value.details() or "")
    jobs.sweep()
    assert jobs.published == []


@pytest.mark.parametrize(
    "name",
    ["http://169.254.169.254/latest/meta-data", "file:///etc/passwd", "/etc/passwd", "../models/x", "$(id)", "gpt-4"],
)
async def test_a_target_is_a_declared_name_never_a_url_or_path(jobs: Jobs, name: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs.stub.SubmitJob(iter([spec_request(target=pb.ModelEndpoint(model=name)), item_request("a", 1)]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"spec.target.model: no endpoint named {name!r} is declared" in (caught.value.details() or "")
    jobs.sweep()
    assert jobs.published == []


async def every_job_rpc(stub: pb_grpc.JobsServiceAsyncStub, job_id: str) -> dict[str, grpc.StatusCode]:
    """The status each Jobs RPC that names a job answers for ``job_id``."""
    codes: dict[str, grpc.StatusCode] = {}
    unary: dict[str, Callable[[], Awaitable[Message]]] = {
        "GetJob": lambda: stub.GetJob(pb.GetJobRequest(job_id=job_id)),
        "GetJobReport": lambda: stub.GetJobReport(pb.GetJobReportRequest(job_id=job_id)),
        "CancelJob": lambda: stub.CancelJob(pb.CancelJobRequest(job_id=job_id)),
    }
    streams: dict[str, Callable[[], Any]] = {
        "WatchJob": lambda: stub.WatchJob(pb.WatchJobRequest(job_id=job_id)),
        "ExportJob": lambda: stub.ExportJob(pb.ExportJobRequest(job_id=job_id)),
    }
    for name, stream in streams.items():
        try:
            async for _ in stream():
                break
            codes[name] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            codes[name] = exc.code()
    for name, call in unary.items():  # CancelJob last: it ends the job
        try:
            await call()
            codes[name] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            codes[name] = exc.code()
    return codes


async def test_a_team_sees_only_its_own_jobs(jobs: Jobs) -> None:
    reply = await jobs.stub.SubmitJob(iter([spec_request(pb.STAGE_REWRITE), item_request("a", 1)]))
    job = (await jobs.stub.GetJob(pb.GetJobRequest(job_id=reply.job_id))).job
    assert job.team == "alpha"
    async with jobs.stub_as(jobs.other_token) as beta:
        # Another team's job is indistinguishable from one that does not exist, on every RPC that names it.
        codes = await every_job_rpc(beta, reply.job_id)
        assert set(codes.values()) == {grpc.StatusCode.NOT_FOUND}, codes
        assert len(codes) == 5
    assert (await jobs.stub.GetJob(pb.GetJobRequest(job_id=reply.job_id))).job.state == pb.JOB_STATE_RUNNING
    admin_team = jobs.store.create_team(f"ops-{uuid.uuid4().hex[:6]}", admin=True)
    async with jobs.stub_as(jobs.store.create_token(admin_team.name)[1]) as admin:
        assert (await admin.GetJob(pb.GetJobRequest(job_id=reply.job_id))).job.team == "alpha"
    await jobs.stub.CancelJob(pb.CancelJobRequest(job_id=reply.job_id))  # leaves nothing for later sweeps


async def test_calls_without_a_valid_token_are_refused(jobs: Jobs) -> None:
    reply = await jobs.stub.SubmitJob(iter([spec_request(pb.STAGE_REWRITE), item_request("a", 1)]))
    team = jobs.store.create_team(f"gone-{uuid.uuid4().hex[:6]}")
    revoked_info, revoked = jobs.store.create_token(team.name)
    assert jobs.store.revoke_token(revoked_info.token_id)
    disabled_team = jobs.store.create_team(f"off-{uuid.uuid4().hex[:6]}")
    disabled = jobs.store.create_token(disabled_team.name)[1]
    jobs.store.set_team_disabled(disabled_team.name, True)
    cases = {
        None: grpc.StatusCode.UNAUTHENTICATED,
        "": grpc.StatusCode.UNAUTHENTICATED,
        "not-a-bpo-token": grpc.StatusCode.UNAUTHENTICATED,
        "bpo_" + "x" * 40: grpc.StatusCode.UNAUTHENTICATED,
        "bpo_" + "y" * 1000: grpc.StatusCode.UNAUTHENTICATED,
        revoked: grpc.StatusCode.UNAUTHENTICATED,
        disabled: grpc.StatusCode.PERMISSION_DENIED,
    }
    for token, expected in cases.items():
        async with jobs.stub_as(token) as stub:
            codes = await every_job_rpc(stub, reply.job_id)
            with pytest.raises(grpc.aio.AioRpcError) as submitting:
                await stub.SubmitJob(iter([spec_request(pb.STAGE_REWRITE), item_request("b", 1)]))
            codes["SubmitJob"] = submitting.value.code()
        assert set(codes.values()) == {expected}, (token and token[:12], codes)
    assert calls(jobs.metrics, "jobs", "GetJob", "UNAUTHENTICATED") == 6
    assert (await jobs.stub.GetJob(pb.GetJobRequest(job_id=reply.job_id))).job.state == pb.JOB_STATE_RUNNING
    await jobs.stub.CancelJob(pb.CancelJobRequest(job_id=reply.job_id))


@pytest.mark.parametrize("job_id", ["not-a-uuid", "00000000-0000-0000-0000-000000000000"])
async def test_unknown_jobs_are_not_found(jobs: Jobs, job_id: str) -> None:
    attempts: list[Callable[[], Awaitable[Message]]] = [
        lambda: jobs.stub.GetJob(pb.GetJobRequest(job_id=job_id)),
        lambda: jobs.stub.CancelJob(pb.CancelJobRequest(job_id=job_id)),
        lambda: jobs.stub.GetJobReport(pb.GetJobReportRequest(job_id=job_id)),
    ]
    for attempt in attempts:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await attempt()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    for stream in (
        jobs.stub.WatchJob(pb.WatchJobRequest(job_id=job_id)),
        jobs.stub.ExportJob(pb.ExportJobRequest(job_id=job_id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream:
                pass
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert calls(jobs.metrics, "jobs", "GetJob", "NOT_FOUND") == 1
    assert calls(jobs.metrics, "jobs", "WatchJob", "NOT_FOUND") == 1


async def test_the_sweep_republishes_unfinished_items_to_the_stage_each_needs(jobs: Jobs) -> None:
    store = jobs.store
    job_id = store.create_job("resume", to_json(pb.JobSpec(name="resume")), ("rewrite", "generate", "judge"))
    sources = ["pending", "rewritten", "answered", "done"]
    ids, _ = store.add_items(
        job_id,
        [NewItem(s, n, f"prompt {s}", "ctx" if s == "pending" else None, "cat", "h") for n, s in enumerate(sources, 1)],
    )
    rewrite = pb.Rewrite(item=pb.PromptItem(item_id=ids[1], job_id=job_id, prompt="prompt rewritten"), optimized="o1")
    answers = pb.AnswerPair(rewrite=rewrite, original_answer="a0", optimized_answer="a1")
    for item_id in ids[1:]:
        assert store.record_rewrite(
            item_id, to_json(rewrite), tokens_in=1, tokens_out=1, cache_hit=False, fallback_reason=None, final=False
        )
    for item_id in ids[2:]:
        assert store.record_answers(item_id, to_json(answers), tokens_in=1, tokens_out=1, final=False)
    assert store.record_verdict(ids[3], {"winner": "tie"}, winner="tie", tokens_in=1, tokens_out=1)
    # A running job whose items are all finished (its last forward was lost) is closed on the way.
    stale = store.create_job("stale", {}, ("rewrite",))
    (stale_item,), _ = store.add_items(stale, [NewItem("s", 1, "p", None, None, "h")])
    assert store.record_rewrite(
        stale_item, {}, tokens_in=0, tokens_out=0, cache_hit=False, fallback_reason=None, final=True
    )
    cancelled = store.create_job("cancelled", {}, ("rewrite",))
    store.add_items(cancelled, [NewItem("c", 1, "p", None, None, "h")])
    store.cancel_job(cancelled)

    jobs.sweep(idle_s=0)  # the pass at start: every unfinished item, whatever the broker still holds
    everything = jobs.take_published()
    assert cancelled not in {pb.PromptItem.FromString(v).job_id for t, _, v in everything if t == "t.prompts"}
    mine = [(topic, key, value) for topic, key, value in everything if key in ids]
    assert [(topic, key) for topic, key, _ in mine] == [
        ("t.prompts", ids[0]),
        ("t.rewrites", ids[1]),
        ("t.answers", ids[2]),
    ]
    prompt = pb.PromptItem.FromString(mine[0][2])
    assert (prompt.item_id, prompt.job_id, prompt.source_id, prompt.context, prompt.category, prompt.line) == (
        ids[0],
        job_id,
        "pending",
        "ctx",
        "cat",
        1,
    )
    assert pb.Rewrite.FromString(mine[1][2]) == rewrite
    assert pb.AnswerPair.FromString(mine[2][2]) == answers
    stale_job = store.get_job(stale)
    assert stale_job is not None and stale_job.state == "succeeded"


async def test_a_submission_that_breaks_off_leaves_no_job(jobs: Jobs, jobs_store: PipelineStore) -> None:
    """The client's corpus fails to parse half-way (or it disconnects): nothing of it runs, nobody has its id."""

    async def broken_stream() -> AsyncIterator[pb.SubmitJobRequest]:
        yield pb.SubmitJobRequest(spec=pb.JobSpec(name="half a corpus"))
        for n in range(1500):  # more than one stored chunk
            yield item_request(f"s{n}", n)
        # The first chunk is stored, under a job nobody can see yet.
        await eventually(lambda: _jobs_named(jobs_store, "half a corpus", "submitting") == 1)
        raise RuntimeError("the client's reader failed")

    # The client cancels the call when its stream raises: the call ends with an error, never with a job id.
    with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
        await jobs.stub.SubmitJob(broken_stream())
    await eventually(lambda: _jobs_named(jobs_store, "half a corpus") == 0)
    jobs.sweep()  # (other tests' unfinished jobs are republished too: only this one's items must not be)
    sources = {pb.PromptItem.FromString(value).source_id for topic, _, value in jobs.published if topic == "t.prompts"}
    assert not {f"s{n}" for n in range(1500)} & sources


def _jobs_named(store: PipelineStore, name: str, state: str | None = None) -> int:
    with store._pool.connection() as conn:
        row = conn.execute(
            "SELECT count(*) AS n FROM jobs WHERE name = %s AND (%s::text IS NULL OR state = %s)", (name, state, state)
        ).fetchone()
    assert row is not None
    return int(row["n"])
