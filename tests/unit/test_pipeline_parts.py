"""The pipeline's pure parts without Postgres, Kafka or Celery: message conversions, job specs, reports, the
cached rewriter and the shared stage logic, against in-memory stand-ins for the store and the workers."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf.message import Message

from bpo.errors import BpoError, EngineUnavailableError, InvalidConfigurationError, JobNotFoundError
from bpo.messages import (
    from_json,
    params_from_proto,
    params_hash,
    params_to_proto,
    prompt_hash,
    rewrite_from_result,
    to_json,
)
from bpo.metrics import PlatformMetrics
from bpo.optimizer.optimizer import OptimizeParams, PromptInput, RewriteFailure, RewriteResult
from bpo.pipeline.jobspec import JobLookup, ResolvedJob, endpoint_name, resolve, stages_of
from bpo.pipeline.report import build_report
from bpo.pipeline.rewriting import CachedRewriter, ModelVersion, ModelVersions
from bpo.pipeline.stage import (
    Done,
    Outcome,
    PermanentItemError,
    PoisonMessageError,
    Stage,
    StageContext,
    Work,
)
from bpo.settings import PlatformSettings
from bpo.store.repository import JobRow, Parked, PipelineStore, RetryPolicy, StageWrite
from bpo.streaming.kafka import InboundMessage, OutboundMessage, PublishedRecord, PublishError
from bpo.v1 import bpo_pb2 as pb

pytestmark = pytest.mark.unit

ALL = ("rewrite", "generate", "judge")
JOB_ID = "11111111-1111-1111-1111-111111111111"
CANCELLED_JOB_ID = "22222222-2222-2222-2222-222222222222"


# -- messages -----------------------------------------------------------------------------------------------


def test_params_from_proto_zero_means_default() -> None:
    assert params_from_proto(pb.OptimizeParams()) == OptimizeParams()
    defaults = OptimizeParams(temperature=0.3, top_p=0.5, max_new_tokens=64, seed=7, rounds=2)
    assert params_from_proto(pb.OptimizeParams(), defaults) == defaults
    given = pb.OptimizeParams(temperature=0.8, top_p=0.95, max_new_tokens=100, rounds=3)
    assert params_from_proto(given, defaults) == OptimizeParams(0.8, 0.95, 100, 7, 3)


def test_params_from_proto_seed_presence() -> None:
    defaults = OptimizeParams(seed=7)
    zero_seed = pb.OptimizeParams()
    zero_seed.seed = 0  # present, so a real seed, not "the default"
    assert params_from_proto(zero_seed, defaults).seed == 0
    assert params_from_proto(pb.OptimizeParams(), defaults).seed == 7
    assert params_from_proto(pb.OptimizeParams()).seed is None
    assert not params_to_proto(OptimizeParams()).HasField("seed")
    assert params_to_proto(OptimizeParams(seed=0)).HasField("seed")


@pytest.mark.parametrize("temperature", [0.6, 0.7, 1.0, 0.05])
@pytest.mark.parametrize("top_p", [0.9, 0.95, 1.0])
def test_params_survive_the_proto_and_its_json(temperature: float, top_p: float) -> None:
    """proto floats are 32-bit: an explicit 0.6 must still be the 0.6 of the defaults, the same cache key."""
    params = OptimizeParams(temperature=temperature, top_p=top_p, max_new_tokens=512, seed=3, rounds=2)
    through_proto = params_from_proto(params_to_proto(params))
    through_json = params_from_proto(from_json(to_json(params_to_proto(params)), pb.OptimizeParams))
    assert through_proto == params
    assert through_json == params
    assert params_hash(through_proto) == params_hash(params)


def test_params_hash_is_stable_and_discriminating() -> None:
    base = OptimizeParams()
    assert params_hash(base) == params_hash(OptimizeParams(0.6, 0.9, 1024, None, 1))
    # A changed canonical form would silently invalidate every cached rewrite: pin it.
    canonical = b'{"max_new_tokens":1024,"rounds":1,"seed":null,"temperature":0.6,"top_p":0.9}'
    assert params_hash(base) == hashlib.sha256(canonical).hexdigest()[:32] == "4f4a8b3d4d2dde34bd202290895aa20f"
    variants = [
        OptimizeParams(temperature=0.7),
        OptimizeParams(top_p=0.8),
        OptimizeParams(max_new_tokens=512),
        OptimizeParams(seed=0),
        OptimizeParams(rounds=2),
    ]
    hashes = {params_hash(v) for v in variants} | {params_hash(base)}
    assert len(hashes) == len(variants) + 1
    assert all(len(h) == 32 and int(h, 16) >= 0 for h in hashes)


def test_prompt_hash_includes_the_context() -> None:
    assert prompt_hash("Summarize.", None) == prompt_hash("Summarize.", "")
    assert prompt_hash("Summarize.", "text A") != prompt_hash("Summarize.", "text B")
    assert prompt_hash("Summarize.", "text A") != prompt_hash("Summarize.", None)
    assert prompt_hash("ab", "c") != prompt_hash("a", "bc")  # the boundary is part of the key
    assert len(prompt_hash("x", None)) == 64


def result_for(prompt: str, context: str | None = None, **overrides: Any) -> RewriteResult:
    fields: dict[str, Any] = {
        "original": prompt,
        "context": context,
        "optimized": f"Please explain: {prompt}",
        "model": "opt",
        "model_version": "opt@1",
        "engine": "fake",
        "params": OptimizeParams(seed=5).as_dict(),
        "rounds_done": 1,
        "tokens_in": 40,
        "tokens_out": 12,
        "latency_s": 0.25,
    }
    fields.update(overrides)
    return RewriteResult(**fields)


def test_rewrite_from_result() -> None:
    item = pb.PromptItem(item_id="i1", job_id=JOB_ID, prompt="Why is the sky blue?", line=3)
    result = result_for(item.prompt, params={**OptimizeParams(seed=5).as_dict(), "not_a_param": 1})
    rewrite = rewrite_from_result(item, result)
    assert rewrite.item == item
    assert (rewrite.optimized, rewrite.model, rewrite.model_version, rewrite.engine) == (
        "Please explain: Why is the sky blue?",
        "opt",
        "opt@1",
        "fake",
    )
    assert (rewrite.tokens_in, rewrite.tokens_out, rewrite.rounds_done, rewrite.cache_hit) == (40, 12, 1, False)
    assert rewrite.latency_s == pytest.approx(0.25)
    assert rewrite.fallback_reason == "" and rewrite.stop_reason == "rounds_completed"
    assert params_from_proto(rewrite.params) == OptimizeParams(seed=5)
    kept = rewrite_from_result(item, result_for(item.prompt, fallback_reason="refusal"), cache_hit=True)
    assert (kept.fallback_reason, kept.cache_hit) == ("refusal", True)
    assert from_json(to_json(kept), pb.Rewrite) == kept
    assert from_json({**to_json(kept), "from_a_newer_version": 1}, pb.Rewrite) == kept


# -- job specs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        ([], ALL),
        ([pb.STAGE_REWRITE], ("rewrite",)),
        ([pb.STAGE_REWRITE, pb.STAGE_GENERATE], ("rewrite", "generate")),
        ([pb.STAGE_GENERATE, pb.STAGE_REWRITE], ("rewrite", "generate")),
        ([pb.STAGE_JUDGE, pb.STAGE_REWRITE, pb.STAGE_GENERATE], ALL),
    ],
)
def test_stages_of_accepts_prefixes(stages: list[pb.Stage.ValueType], expected: tuple[str, ...]) -> None:
    assert stages_of(pb.JobSpec(stages=stages)) == expected


@pytest.mark.parametrize(
    "stages",
    [
        [pb.STAGE_GENERATE],
        [pb.STAGE_JUDGE],
        [pb.STAGE_REWRITE, pb.STAGE_JUDGE],
        [pb.STAGE_GENERATE, pb.STAGE_JUDGE],
        [pb.STAGE_REWRITE, pb.STAGE_REWRITE],
        [pb.STAGE_REWRITE, pb.STAGE_GENERATE, pb.STAGE_GENERATE],
        [pb.STAGE_UNSPECIFIED],
        [pb.STAGE_REWRITE, pb.STAGE_UNSPECIFIED],
    ],
)
def test_stages_of_rejects_gaps_duplicates_and_unknowns(stages: list[pb.Stage.ValueType]) -> None:
    with pytest.raises(InvalidConfigurationError):
        stages_of(pb.JobSpec(stages=stages))


def test_endpoint_name_is_the_declared_name_or_the_default() -> None:
    assert endpoint_name(pb.ModelEndpoint(), "small") == "small"
    assert endpoint_name(pb.ModelEndpoint(model="gpt-4o-mini", max_new_tokens=50), "small") == "gpt-4o-mini"


def job_row(
    job_id: str = JOB_ID, spec: pb.JobSpec | None = None, stages: Sequence[str] = ALL, state: str = "running"
) -> JobRow:
    return JobRow(job_id, "job", to_json(spec or pb.JobSpec()), tuple(stages), state, 1, 0)


def test_resolve_fills_the_platform_defaults() -> None:
    platform = PlatformSettings(optimizer_model="opt", target_model="target", judge_model="judge")
    plain = resolve(job_row(stages=("rewrite", "generate")), platform)
    assert (plain.optimizer_model, plain.params, plain.stages, plain.active) == (
        "opt",
        OptimizeParams(),
        ("rewrite", "generate"),
        True,
    )
    assert (plain.target, plain.judge) == ("target", "judge")
    assert (plain.target_max_new_tokens, plain.judge_max_new_tokens) == (256, 384)
    assert plain.next_stage("rewrite") == "generate" and plain.next_stage("generate") is None
    assert plain.is_last("generate") and not plain.is_last("rewrite")

    spec = pb.JobSpec(
        optimizer_model="other",
        params=pb.OptimizeParams(rounds=2),
        target=pb.ModelEndpoint(model="gpt", max_new_tokens=50),
    )
    custom = resolve(job_row(spec=spec, state="cancelled"), platform)
    assert (custom.optimizer_model, custom.params.rounds, custom.target, custom.target_max_new_tokens) == (
        "other",
        2,
        "gpt",
        50,
    )
    assert not custom.active


class CountingJobs(PipelineStore):
    """Only ``jobs_by_ids``, counting the calls (no pool: nothing here reaches Postgres)."""

    def __init__(self, *rows: JobRow) -> None:
        self.rows = {row.job_id: row for row in rows}
        self.calls = 0

    def jobs_by_ids(self, job_ids: Sequence[str]) -> dict[str, JobRow]:
        self.calls += 1
        return {job_id: self.rows[job_id] for job_id in job_ids if job_id in self.rows}


def test_job_lookup_caches_briefly_and_reports_unknown_jobs() -> None:
    store = CountingJobs(job_row())
    cached = JobLookup(store, PlatformSettings(), ttl_s=60)
    assert cached.get(JOB_ID).job_id == JOB_ID
    assert cached.get(JOB_ID).job_id == JOB_ID
    assert store.calls == 1
    uncached = JobLookup(store, PlatformSettings(), ttl_s=0)
    uncached.get(JOB_ID)
    uncached.get(JOB_ID)
    assert store.calls == 3
    with pytest.raises(JobNotFoundError):
        cached.get(CANCELLED_JOB_ID)
    # A batch's jobs: one query for those not cached.
    calls = store.calls
    assert set(cached.get_many([JOB_ID, CANCELLED_JOB_ID, JOB_ID])) == {JOB_ID}
    assert store.calls == calls + 1


# -- reports ------------------------------------------------------------------------------------------------


def report_rows(
    wins: int, ties: int, losses: int, *, consistent: int = 0, extra: int = 0, identical: int = 0
) -> dict[str, Any]:
    judged = wins + ties + losses
    totals = {
        "items": judged + extra,
        "rewritten": judged,
        "kept_original": 1,
        "cache_hits": 2,
        "judged": judged,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "consistent": consistent,
        "identical_answers": identical,
        "rewrite_in": 1,
        "rewrite_out": 2,
        "target_in": 3,
        "target_out": 4,
        "judge_in": 5,
        "judge_out": 6,
    }
    return {"totals": totals, "categories": [], "failures": [], "failure_reasons": [], "failed": 0, "rejected": 0}


def test_build_report_rates_and_delta_wr() -> None:
    rows = report_rows(6, 1, 3, consistent=8)
    rows["categories"] = [
        {"category": "", "judged": 2, "wins": 0, "ties": 0, "losses": 2},
        {"category": "math", "judged": 8, "wins": 6, "ties": 1, "losses": 1},
        {"category": "empty", "judged": 0, "wins": 0, "ties": 0, "losses": 0},
    ]
    rows["failures"] = [
        {"item_id": "i9", "source_id": "s9", "line": 9, "stage": "judge", "reason": "judge down"},
        {"item_id": "", "source_id": "", "line": 11, "stage": "submit", "reason": "not JSON"},
    ]
    rows["failure_reasons"] = [
        {"stage": "judge", "reason": "judge down", "count": 1, "lines": [9]},
        {"stage": "submit", "reason": "not JSON", "count": 1, "lines": [11]},
    ]
    rows["failed"], rows["rejected"] = 2, 1
    report = build_report(pb.Job(job_id=JOB_ID), rows)
    assert report.job.job_id == JOB_ID
    assert (report.judged, report.wins, report.ties, report.losses, report.failed) == (10, 6, 1, 3, 2)
    assert (report.win_rate, report.tie_rate, report.lose_rate) == pytest.approx((0.6, 0.1, 0.3))
    assert report.delta_wr == pytest.approx(0.3)  # (wins - losses) / judged
    assert report.position_consistency == pytest.approx(0.8)
    assert [(c.category, c.judged, c.delta_wr) for c in report.categories] == [
        ("", 2, pytest.approx(-1.0)),
        ("math", 8, pytest.approx(5 / 8)),
        ("empty", 0, 0.0),
    ]
    assert [(t.role, t.tokens_in, t.tokens_out) for t in report.tokens] == [
        ("rewrite", 1, 2),
        ("target", 3, 4),
        ("judge", 5, 6),
    ]
    assert [(f.item_id, f.line, f.stage, f.reason) for f in report.failures] == [
        ("i9", 9, pb.STAGE_JUDGE, "judge down"),
        ("", 11, pb.STAGE_UNSPECIFIED, "not JSON"),
    ]
    assert report.rejected == 1
    assert [(r.stage, r.reason, r.count, list(r.sample_lines)) for r in report.failure_reasons] == [
        (pb.STAGE_JUDGE, "judge down", 1, [9]),
        (pb.STAGE_UNSPECIFIED, "not JSON", 1, [11]),
    ]


def test_identical_answers_are_left_out_of_position_consistency() -> None:
    report = build_report(pb.Job(), report_rows(2, 4, 0, consistent=2, identical=2))
    assert report.identical_answers == 2
    assert report.position_consistency == pytest.approx(0.5)  # 2 consistent of the 4 the judge saw
    assert report.tie_rate == pytest.approx(4 / 6)  # identical answers still count as ties


def test_build_report_with_nothing_judged() -> None:
    report = build_report(pb.Job(), report_rows(0, 0, 0, extra=4))
    assert (report.items, report.judged) == (4, 0)
    assert (report.win_rate, report.tie_rate, report.lose_rate, report.delta_wr, report.position_consistency) == (
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
    )


# -- the cached rewriter ------------------------------------------------------------------------------------


class MemoryStore(PipelineStore):
    """The parts of the store the rewriter and the stages use, in memory, with the same write-once rules."""

    def __init__(self) -> None:  # no pool: nothing here reaches Postgres
        self.cache: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.items: dict[str, dict[str, Any]] = {}
        self.finish_checks: list[str] = []
        self.over_quota: set[tuple[str, str]] = set()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("postgres unreachable")

    def cached_rewrites(self, prompt_hashes: Sequence[str], model_version: str, params_hash: str) -> dict[str, Any]:
        found = {h: self.cache.get((h, model_version, params_hash)) for h in prompt_hashes}
        return {h: rewrite for h, rewrite in found.items() if rewrite is not None}

    def cache_rewrites(self, model_version: str, params_hash: str, entries: Mapping[str, dict[str, Any]]) -> None:
        for key, rewrite in entries.items():
            self.cache.setdefault((key, model_version, params_hash), rewrite)

    def add(self, item_id: str, *, job_id: str = JOB_ID, status: str = "pending", rewrite: str | None = None) -> None:
        stored = to_json(pb.Rewrite(optimized=rewrite)) if rewrite is not None else None
        self.items[item_id] = {
            "item_id": item_id,
            "job_id": job_id,
            "status": status,
            "rewrite": stored,
            "failed_stage": None,
            "error": None,
            "attempts": 0,
            "retry_at": None,
        }

    def items_by_ids(self, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        self._check()
        return {i: dict(self.items[i]) for i in item_ids if i in self.items}

    def record_outputs(self, stage: str, writes: Sequence[StageWrite]) -> set[str]:
        self._check()
        written = set()
        for write in writes:
            row = self.items[write.item_id]
            if row["rewrite"] is not None or row["status"] in ("failed", "cancelled"):
                continue
            row.update(rewrite=write.output, status="done" if write.final else "rewritten", attempts=0)
            written.add(write.item_id)
        return written

    def fail_items(self, stage: str, failures: Sequence[tuple[str, str]]) -> set[str]:
        failed = set()
        for item_id, reason in failures:
            row = self.items.get(item_id)
            if row is None or row["status"] not in ("pending", "rewritten", "answered"):
                continue
            row.update(status="failed", failed_stage=stage, error=reason)
            failed.add(item_id)
        return failed

    def park_items(self, stage: str, failures: Sequence[tuple[str, str]], policy: RetryPolicy) -> Parked:
        parked, gave_up = [], []
        for item_id, reason in failures:
            row = self.items[item_id]
            row["attempts"] += 1
            if row["attempts"] >= policy.max_attempts:
                row.update(status="failed", failed_stage=stage, error=f"gave up after {row['attempts']}: {reason}")
                gave_up.append(item_id)
            else:
                row.update(retry_at="later", error=None, last_error=reason)
                parked.append(item_id)
        return Parked(parked, gave_up)

    def finish_jobs_if_complete(self, job_ids: Sequence[str]) -> list[str]:
        self.finish_checks.extend(job_ids)
        return []

    def teams_over_token_quota(self, role: str, team_ids: Sequence[str]) -> set[str]:
        return {team_id for team_id in team_ids if (team_id, role) in self.over_quota}

    def defer_items(self, item_ids: Sequence[str], until: datetime, reason: str) -> None:
        for item_id in item_ids:
            self.items[item_id].update(retry_at=until, last_error=reason)


class FixedVersions(ModelVersions):
    def __init__(self, version: str = "1") -> None:  # no catalogue: a fixed version per model name
        self.version = version

    def version_of(self, model: str) -> ModelVersion:
        return ModelVersion(f"{model}@{self.version}", f"{model}@{self.version}")


class FakeBackend:
    """The optimizer workers: rewrites every prompt, fails the ones in ``fail``, records every batch."""

    def __init__(self, fail: Sequence[str] = ()) -> None:
        self.fail = set(fail)
        self.batches: list[list[PromptInput]] = []

    async def optimize_batch(
        self, model: str, params: OptimizeParams, inputs: Sequence[PromptInput]
    ) -> list[RewriteResult | RewriteFailure]:
        self.batches.append(list(inputs))
        return [
            RewriteFailure(i.prompt, "prompt needs 9000 tokens", "INVALID_ARGUMENT")
            if i.prompt in self.fail
            else result_for(
                i.prompt,
                i.context,
                optimized=f"Better: {i.prompt} [{i.context or ''}]",
                model=model,
                params=params.as_dict(),
                tokens_in=len(i.prompt),
            )
            for i in inputs
        ]


def rewriter_parts(fail: Sequence[str] = ()) -> tuple[CachedRewriter, MemoryStore, FakeBackend, PlatformMetrics]:
    store, backend, metrics = MemoryStore(), FakeBackend(fail), PlatformMetrics()
    return CachedRewriter(store, backend, FixedVersions(), metrics), store, backend, metrics


def lookups(metrics: PlatformMetrics, result: str) -> float:
    return metrics.registry.get_sample_value("bpo_rewrite_cache_lookups_total", {"result": result}) or 0.0


def item(item_id: str, prompt: str, context: str = "") -> pb.PromptItem:
    return pb.PromptItem(item_id=item_id, job_id=JOB_ID, prompt=prompt, context=context)


async def test_cache_hits_cost_no_backend_call() -> None:
    rewriter, store, backend, metrics = rewriter_parts()
    params = OptimizeParams(seed=1)
    (first,) = await rewriter.rewrite([item("a", "Tell me about tides.")], "opt", params)
    assert first.failure is None and first.rewrite is not None
    assert (first.rewrite.cache_hit, first.rewrite.tokens_in, first.rewrite.tokens_out) == (False, 20, 12)
    assert len(backend.batches) == 1 and len(store.cache) == 1
    assert "item" not in next(iter(store.cache.values()))  # the cache holds the rewrite, not whose it was

    (second,) = await rewriter.rewrite([item("b", "Tell me about tides.")], "opt", params)
    assert len(backend.batches) == 1
    assert second.rewrite is not None
    assert second.rewrite.optimized == first.rewrite.optimized
    assert (second.rewrite.cache_hit, second.rewrite.tokens_in, second.rewrite.tokens_out) == (True, 0, 0)
    assert second.rewrite.item.item_id == "b"
    assert (lookups(metrics, "miss"), lookups(metrics, "hit")) == (1, 1)
    assert metrics.registry.get_sample_value("bpo_tokens_total", {"role": "optimizer", "direction": "in"}) == 20

    # Another model version, other parameters or another context are other keys.
    await rewriter.rewrite([item("c", "Tell me about tides.")], "opt", OptimizeParams(seed=2))
    await rewriter.rewrite([item("d", "Tell me about tides.", "the Moon")], "opt", params)
    await CachedRewriter(store, backend, FixedVersions("2"), metrics).rewrite(
        [item("e", "Tell me about tides.")], "opt", params
    )
    # Version 2 was looked up but the (fake) workers still answered with version 1, as a worker does while an
    # alias moves: that result is not filed under version 2.
    assert len(backend.batches) == 4 and len(store.cache) == 3


async def test_repeats_inside_a_batch_are_sent_once() -> None:
    rewriter, store, backend, _ = rewriter_parts()
    items = [
        item("1", "Explain recursion."),
        item("2", "Name three rivers."),
        item("3", "Explain recursion."),
        item("4", "Explain recursion.", "in Lisp"),
        item("5", "Name three rivers."),
    ]
    outcomes = await rewriter.rewrite(items, "opt", OptimizeParams())
    assert backend.batches == [
        [
            PromptInput("Explain recursion."),
            PromptInput("Name three rivers."),
            PromptInput("Explain recursion.", "in Lisp"),
        ]
    ]
    rewrites = [o.rewrite for o in outcomes]
    assert all(r is not None for r in rewrites)
    assert [r.item.item_id for r in rewrites if r] == ["1", "2", "3", "4", "5"]
    assert [(r.cache_hit, r.tokens_in) for r in rewrites if r] == [
        (False, 18),
        (False, 18),
        (True, 0),
        (False, 18),
        (True, 0),
    ]
    assert rewrites[0] is not None and rewrites[2] is not None
    assert rewrites[2].optimized == rewrites[0].optimized
    assert len(store.cache) == 3


async def test_misses_go_out_in_tasks_of_the_task_size_all_at_once() -> None:
    store, metrics = MemoryStore(), PlatformMetrics()
    running = 0
    most_running = 0

    class SlowBackend(FakeBackend):
        async def optimize_batch(
            self, model: str, params: OptimizeParams, inputs: Sequence[PromptInput]
        ) -> list[RewriteResult | RewriteFailure]:
            nonlocal running, most_running
            running += 1
            most_running = max(most_running, running)
            await asyncio.sleep(0.01)
            running -= 1
            return await super().optimize_batch(model, params, inputs)

    backend = SlowBackend()
    rewriter = CachedRewriter(store, backend, FixedVersions(), metrics, task_size=3)
    items = [item(str(n), f"Question {n}?") for n in range(7)]
    outcomes = await rewriter.rewrite(items, "opt", OptimizeParams())
    assert [len(batch) for batch in backend.batches] == [3, 3, 1]
    assert most_running == 3  # sent together, not one after the other
    rewrites = [o.rewrite for o in outcomes]
    assert [r.item.item_id for r in rewrites if r] == [str(n) for n in range(7)]
    assert [r.optimized for r in rewrites if r] == [f"Better: Question {n}? []" for n in range(7)]
    with pytest.raises(ValueError, match="task_size"):
        CachedRewriter(store, backend, FixedVersions(), metrics, task_size=0)


async def test_failures_pass_through_and_are_not_cached() -> None:
    rewriter, store, backend, _ = rewriter_parts(fail=["Too long."])
    items = [item("1", "Too long."), item("2", "Fine."), item("3", "Too long.")]
    outcomes = await rewriter.rewrite(items, "opt", OptimizeParams())
    assert [o.rewrite is None for o in outcomes] == [True, False, True]
    failure = outcomes[0].failure
    assert failure is not None and (failure.status_code, failure.error) == (
        "INVALID_ARGUMENT",
        "prompt needs 9000 tokens",
    )
    assert outcomes[2].failure == failure
    assert len(store.cache) == 1
    await rewriter.rewrite([item("4", "Too long.")], "opt", OptimizeParams())
    assert backend.batches[-1] == [PromptInput("Too long.")]  # a failure is tried again next time


async def test_a_backend_error_fails_the_whole_call() -> None:
    class Down(FakeBackend):
        async def optimize_batch(
            self, model: str, params: OptimizeParams, inputs: Sequence[PromptInput]
        ) -> list[RewriteResult | RewriteFailure]:
            raise ConnectionError("broker unreachable")

    store = MemoryStore()
    with pytest.raises(ConnectionError):
        await CachedRewriter(store, Down(), FixedVersions(), PlatformMetrics()).rewrite(
            [item("1", "Anything.")], "opt", OptimizeParams()
        )
    assert store.cache == {}


# -- the stage base -----------------------------------------------------------------------------------------


class StaticJobs(JobLookup):
    def __init__(self, *jobs: ResolvedJob) -> None:  # no store: jobs are given
        self.jobs = {job.job_id: job for job in jobs}

    def get_many(self, job_ids: Sequence[str]) -> dict[str, ResolvedJob | BpoError]:
        return {job_id: self.jobs[job_id] for job_id in job_ids if job_id in self.jobs}


def resolved(job_id: str, *, stages: tuple[str, ...] = ALL, state: str = "running") -> ResolvedJob:
    endpoint = "m"
    return ResolvedJob(job_id, state, stages, "opt", OptimizeParams(), endpoint, 256, endpoint, 384)


def uid(name: str) -> str:
    """A readable item id that is a UUID, as item ids on the topics must be."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, name))


class ToyStage(Stage[pb.PromptItem]):
    """A rewrite stage whose "rewrite" upper-cases the prompt; prompts in ``errors`` fail with that error, prompts in
    ``hang`` never finish; items are grouped by their prompt's first word (so a group fails alone)."""

    name = "rewrite"
    role = "optimizer"
    message_type = pb.PromptItem

    def __init__(
        self, ctx: StageContext, *, errors: dict[str, Exception] | None = None, hang: set[str] | None = None
    ) -> None:
        super().__init__(ctx)
        self.errors = errors or {}
        self.hang = hang or set()
        self.processed: list[str] = []

    def item_of(self, payload: pb.PromptItem) -> pb.PromptItem:
        return payload

    def stored_output(self, row: dict[str, object], payload: pb.PromptItem) -> Message | None:
        stored = row.get("rewrite")
        return from_json(stored, pb.Rewrite) if isinstance(stored, dict) else None

    def endpoint_of(self, job: ResolvedJob) -> str:
        return job.optimizer_model

    def group_key(self, work: Work[pb.PromptItem]) -> Hashable:
        return work.payload.prompt.split(" ")[0]

    async def run_group(self, members: Sequence[Work[pb.PromptItem]]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for w in members:
            self.processed.append(w.item_id)
            if w.payload.prompt in self.hang:
                await asyncio.sleep(3600)
            if w.payload.prompt in self.errors:
                raise self.errors[w.payload.prompt]
            output = pb.Rewrite(item=w.payload, optimized=w.payload.prompt.upper())
            write = StageWrite(w.item_id, to_json(output), 1, 1, w.job.is_last(self.name))
            outcomes.append(Done(output, write))
        return outcomes


@pytest.fixture(scope="module")
def stage_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The service's event loop, on its own thread, as ``handle`` (called from the Kafka thread) expects."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="stage-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


class Harness:
    def __init__(self, loop: asyncio.AbstractEventLoop, *jobs: ResolvedJob, deadline_s: float = 5.0) -> None:
        self.store = MemoryStore()
        self.metrics = PlatformMetrics()
        self.published: list[OutboundMessage] = []
        self.refuse: dict[str, PublishError] = {}
        self.ctx = StageContext(
            store=self.store,
            jobs=StaticJobs(*(jobs or (resolved(JOB_ID),))),
            publish_many=self._publish,
            topic=lambda name: f"t.{name}",
            metrics=self.metrics,
            loop=loop,
            retry=RetryPolicy(base_delay_s=1, max_delay_s=10, max_attempts=3),
            batch_deadline_s=deadline_s,
        )
        self.offset = 0

    def _publish(self, messages: Sequence[OutboundMessage]) -> list[PublishedRecord | PublishError]:
        results: list[PublishedRecord | PublishError] = []
        for message in messages:
            refused = self.refuse.get(message.key or "")
            if refused is not None:
                results.append(refused)
                continue
            self.published.append(message)
            results.append(PublishedRecord(message.topic, 0, len(self.published)))
        return results

    def message(self, item_id: str, prompt: str = "", *, job_id: str = JOB_ID) -> InboundMessage:
        payload = pb.PromptItem(item_id=item_id, job_id=job_id, prompt=prompt or f"prompt {item_id}")
        return self.raw(payload.SerializeToString())

    def raw(self, value: bytes) -> InboundMessage:
        self.offset += 1
        return InboundMessage("t.prompts", 0, self.offset, None, value)

    def forwarded(self) -> list[tuple[str, str | None, str]]:
        return [(m.topic, m.key, pb.Rewrite.FromString(m.value).optimized) for m in self.published]

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "bpo_stage_messages_total", {"stage": "rewrite", "outcome": outcome}
        )
        return value or 0.0


A, B, C = uid("a"), uid("b"), uid("c")


def test_handle_writes_once_and_forwards(stage_loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(stage_loop, resolved(JOB_ID, stages=("rewrite",)))
    h.store.add(A)
    h.store.add(B)
    stage = ToyStage(h.ctx)
    assert stage.handle([h.message(A, "tides"), h.message(B, "rivers")]) == []
    assert h.forwarded() == [("t.rewrites", A, "TIDES"), ("t.rewrites", B, "RIVERS")]
    assert [h.store.items[i]["status"] for i in (A, B)] == ["done", "done"]  # the last stage: final writes
    assert h.store.finish_checks == [JOB_ID]  # one completion check for the batch
    assert h.count("done") == 2


def test_a_team_over_its_token_quota_waits_and_others_go_on(stage_loop: asyncio.AbstractEventLoop) -> None:
    heavy = replace(resolved(JOB_ID, stages=("rewrite",)), team="heavy", team_id="t-heavy")
    light_job = "55555555-5555-5555-5555-555555555555"
    light = replace(resolved(light_job, stages=("rewrite",)), team="light", team_id="t-light")
    h = Harness(stage_loop, heavy, light)
    h.store.add(A)
    h.store.add(B, job_id=light_job)
    h.store.over_quota = {("t-heavy", "optimizer"), ("t-light", "target")}  # light's *target* quota: not this role
    stage = ToyStage(h.ctx)
    assert stage.handle([h.message(A, "tides"), h.message(B, "rivers", job_id=light_job)]) == []
    assert stage.processed == [B] and h.forwarded() == [("t.rewrites", B, "RIVERS")]
    held = h.store.items[A]
    assert held["status"] == "pending" and held["attempts"] == 0  # waiting costs no attempt
    assert held["retry_at"] > datetime.now(UTC) and "tokens_per_day.optimizer of team 'heavy'" in held["last_error"]
    assert h.count("deferred") == 1
    spent = h.metrics.registry.get_sample_value(
        "bpo_team_tokens_total", {"team": "light", "role": "optimizer", "direction": "in"}
    )
    assert spent == 1


def test_poison_is_returned_for_the_dead_letter_topic(stage_loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(stage_loop)
    h.store.add(A)
    stage = ToyStage(h.ctx)
    garbage = h.raw(b"\x0a\xff")
    not_uuids = h.message("not-a-uuid", job_id="also-not")
    unknown_job = h.message(B, job_id="44444444-4444-4444-4444-444444444444")
    never_stored = h.message(C)
    failures = stage.handle([garbage, not_uuids, unknown_job, never_stored, h.message(A)])
    assert [f.message for f in failures] == [garbage, not_uuids, unknown_job, never_stored]
    assert all(isinstance(f.error, PoisonMessageError) for f in failures)
    assert ["not a PromptItem" in str(failures[0].error), "UUIDs" in str(failures[1].error)] == [True, True]
    assert "no such job" in str(failures[2].error) and "no such item" in str(failures[3].error)
    assert [m.key for m in h.published] == [A]
    # Dead-lettering what names no item marks nothing and raises nothing.
    for failure in failures:
        stage.on_dead_letter(failure.message, str(failure.error))
    assert h.store.items[A]["status"] == "rewritten"


def test_items_of_cancelled_jobs_and_finished_items_are_skipped(stage_loop: asyncio.AbstractEventLoop) -> None:
    other = "33333333-3333-3333-3333-333333333333"
    h = Harness(stage_loop, resolved(JOB_ID), resolved(CANCELLED_JOB_ID, state="cancelled"), resolved(other, stages=()))
    of_cancelled, cancelled, failed, not_its_stage = uid("1"), uid("2"), uid("3"), uid("4")
    h.store.add(of_cancelled, job_id=CANCELLED_JOB_ID)
    h.store.add(cancelled, status="cancelled")
    h.store.add(failed, status="failed")
    h.store.add(not_its_stage, job_id=other)
    stage = ToyStage(h.ctx)
    messages = [
        h.message(of_cancelled, job_id=CANCELLED_JOB_ID),
        h.message(cancelled),
        h.message(failed),
        h.message(not_its_stage, job_id=other),
    ]
    assert stage.handle(messages) == []
    assert stage.processed == [] and h.published == []
    assert h.store.items[of_cancelled]["status"] == "pending"
    assert h.count("skipped") == 4


def test_stored_output_is_forwarded_not_recomputed(stage_loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(stage_loop, resolved(JOB_ID, stages=("rewrite",)))
    h.store.add(A, status="done", rewrite="written by the first delivery")
    stage = ToyStage(h.ctx)
    assert stage.handle([h.message(A, "tides"), h.message(A, "tides")]) == []
    assert stage.processed == []
    assert h.forwarded() == [("t.rewrites", A, "written by the first delivery")]  # a repeat in the batch: once
    assert h.count("redelivered") == 1 and h.count("duplicate") == 1


def test_bad_input_fails_its_item_and_a_transient_error_parks_it(stage_loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(stage_loop)
    bad, flaky, good = uid("bad"), uid("flaky"), uid("good")
    for item_id in (bad, flaky, good):
        h.store.add(item_id)
    errors: dict[str, Exception] = {
        "long prompt": PermanentItemError("prompt needs 9000 tokens"),
        "down endpoint": EngineUnavailableError("target down"),
    }
    stage = ToyStage(h.ctx, errors=errors)
    assert stage.handle([h.message(bad, "long prompt"), h.message(flaky, "down endpoint"), h.message(good, "ok")]) == []
    row = h.store.items[bad]
    assert (row["status"], row["failed_stage"], row["error"]) == (
        "failed", "rewrite", "PermanentItemError: prompt needs 9000 tokens"
    )  # fmt: skip
    parked = h.store.items[flaky]
    assert (parked["status"], parked["retry_at"], parked["attempts"]) == ("pending", "later", 1)
    assert h.store.items[good]["status"] == "rewritten"
    assert [m.key for m in h.published] == [good]
    rejected = {"stage": "rewrite", "reason": "rejected"}
    assert h.metrics.registry.get_sample_value("bpo_items_failed_total", rejected) == 1
    assert h.count("parked") == 1
    # Redelivered by the sweep until its attempts run out: then it fails, with the reason.
    stage.handle([h.message(flaky, "down endpoint")])
    stage.handle([h.message(flaky, "down endpoint")])
    row = h.store.items[flaky]
    assert (row["status"], row["error"]) == ("failed", "gave up after 3: EngineUnavailableError: target down")
    assert JOB_ID in h.store.finish_checks  # a failed item may have been the job's last
    exhausted = {"stage": "rewrite", "reason": "retries_exhausted"}
    assert h.metrics.registry.get_sample_value("bpo_items_failed_total", exhausted) == 1


def test_a_dead_letter_is_counted_and_fails_the_item_it_names(stage_loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(stage_loop)
    h.store.add(A)
    stage = ToyStage(h.ctx)
    assert h.metrics.registry.get_sample_value("bpo_dead_letters_total", {"stage": "rewrite"}) == 0
    stage.on_dead_letter(h.message(A, "tides"), "unreadable")
    stage.on_dead_letter(h.raw(b"not a protobuf"), "unreadable")
    assert h.metrics.registry.get_sample_value("bpo_dead_letters_total", {"stage": "rewrite"}) == 2
    dead = {"stage": "rewrite", "reason": "dead_lettered"}
    assert h.metrics.registry.get_sample_value("bpo_items_failed_total", dead) == 1


def test_a_hung_group_is_parked_at_the_deadline_and_others_finish(stage_loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(stage_loop, deadline_s=0.2)
    stuck, fine = uid("stuck"), uid("fine")
    h.store.add(stuck)
    h.store.add(fine)
    stage = ToyStage(h.ctx, hang={"slow endpoint"})
    started = time.monotonic()
    assert stage.handle([h.message(stuck, "slow endpoint"), h.message(fine, "quick one")]) == []
    assert time.monotonic() - started < 5
    assert h.store.items[fine]["status"] == "rewritten"
    assert h.store.items[stuck]["status"] == "pending" and h.store.items[stuck]["attempts"] == 1
    assert "0.2s batch deadline" in h.store.items[stuck]["last_error"]


def test_an_output_too_large_for_the_broker_fails_its_item_alone(stage_loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(stage_loop)
    h.store.add(A)
    h.store.add(B)
    h.refuse[A] = PublishError("MessageSizeTooLargeError", too_large=True)
    assert ToyStage(h.ctx).handle([h.message(A), h.message(B)]) == []
    assert h.store.items[A]["status"] == "failed" and "larger than the broker accepts" in h.store.items[A]["error"]
    assert [m.key for m in h.published] == [B]


def test_a_platform_failure_raises_for_the_loop_to_retry(stage_loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(stage_loop)
    h.store.add(A)
    h.refuse[A] = PublishError("broker did not acknowledge")
    with pytest.raises(PublishError):
        ToyStage(h.ctx).handle([h.message(A)])
    # The write happened once; the retried batch forwards the stored output instead of redoing the work.
    del h.refuse[A]
    stage = ToyStage(h.ctx)
    assert stage.handle([h.message(A)]) == [] and stage.processed == []
    assert [m.key for m in h.published] == [A]
    h.store.down = True
    with pytest.raises(ConnectionError):
        stage.handle([h.message(B)])


def test_a_dead_lettered_item_fails_with_the_reason(stage_loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(stage_loop)
    h.store.add(A)
    ToyStage(h.ctx).on_dead_letter(h.message(A), "undecodable downstream")
    row = h.store.items[A]
    assert (row["status"], row["error"]) == ("failed", "dead-lettered: undecodable downstream")
