"""The Postgres store against a real server: migrations, write-once stage outputs, job states, resume, counts,
reports, the rewrite cache and the model registry. Each test makes its own job in one fresh database."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import Connection
from psycopg_pool import ConnectionPool

from bpo.engines.base import Completion
from bpo.errors import InvalidConfigurationError
from bpo.messages import prompt_hash
from bpo.pipeline.report import build_report
from bpo.store.db import migrate, migration_scripts, open_pool
from bpo.store.progress import FOLD_ABOVE
from bpo.store.repository import (
    JobRow,
    NewItem,
    PipelineStore,
    RetryPolicy,
    StageCounts,
    StageWrite,
    item_id_for,
)
from bpo.store.teams import TeamQuotas
from bpo.v1 import bpo_pb2 as pb
from tests.integration.services import fresh_database

pytestmark = pytest.mark.integration

ALL = ("rewrite", "generate", "judge")


@dataclass(frozen=True)
class Db:
    url: str
    pool: ConnectionPool[Connection[dict[str, Any]]]
    store: PipelineStore
    first_migration: list[str]


@pytest.fixture(scope="module")
def db(postgres_admin_url: str) -> Iterator[Db]:
    with fresh_database(postgres_admin_url, "bpo_store") as url:
        pool = open_pool(url, min_size=1, max_size=2)
        try:
            applied = migrate(pool)
            yield Db(url, pool, PipelineStore(pool), applied)
        finally:
            pool.close()


@pytest.fixture
def store(db: Db) -> PipelineStore:
    return db.store


def new_item(source_id: str, line: int, prompt: str = "", *, category: str | None = None) -> NewItem:
    text = prompt or f"prompt {source_id}"
    return NewItem(source_id, line, text, None, category, prompt_hash(text, None))


def job_with(store: PipelineStore, sources: Sequence[str], stages: Sequence[str] = ALL) -> tuple[JobRow, list[str]]:
    job_id = store.create_job("test", {"name": "test"}, stages)
    inserted, duplicates = store.add_items(job_id, [new_item(s, n) for n, s in enumerate(sources, 1)])
    assert duplicates == 0
    job = store.get_job(job_id)
    assert job is not None
    return job, inserted


def rewrite(store: PipelineStore, item_id: str, *, final: bool = False, **kw: Any) -> bool:
    args: dict[str, Any] = {"tokens_in": 10, "tokens_out": 5, "cache_hit": False, "fallback_reason": None}
    args.update(kw)
    return store.record_rewrite(item_id, {"optimized": f"better {item_id}"}, final=final, **args)


def answer(store: PipelineStore, item_id: str, *, final: bool = False, tokens: tuple[int, int] = (20, 30)) -> bool:
    return store.record_answers(
        item_id,
        {"original_answer": "a", "optimized_answer": "b"},
        tokens_in=tokens[0],
        tokens_out=tokens[1],
        final=final,
    )


def judge(store: PipelineStore, item_id: str, winner: str, *, consistent: bool = True) -> bool:
    verdict = {"winner": winner, "position_consistent": consistent}
    return store.record_verdict(item_id, verdict, winner=winner, tokens_in=100, tokens_out=7)


def status(store: PipelineStore, item_id: str) -> str:
    row = store.get_item(item_id)
    assert row is not None
    return str(row["status"])


# -- migrations ---------------------------------------------------------------------------------------------


def test_migrate_is_idempotent_and_records_versions(db: Db) -> None:
    scripts = migration_scripts()
    assert scripts and scripts[0][1] == "0001_initial.sql"
    assert db.first_migration == [name for _, name, _ in scripts]
    assert migrate(db.pool) == []
    assert migrate(db.pool) == []
    with psycopg.connect(db.url) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert rows == [(version, name) for version, name, _ in scripts]
    assert {"jobs", "items", "rejected_lines", "rewrite_cache", "model_registry", "model_aliases"} <= tables


# -- jobs and items -----------------------------------------------------------------------------------------


def test_create_and_get_job(store: PipelineStore) -> None:
    job_id = store.create_job("corpus.jsonl", {"name": "corpus.jsonl", "rounds": 2}, ("rewrite", "generate"))
    job = store.get_job(job_id)
    assert job is not None
    assert (job.name, job.spec, job.stages, job.state) == (
        "corpus.jsonl",
        {"name": "corpus.jsonl", "rounds": 2},
        ("rewrite", "generate"),
        "running",
    )
    assert job.created_at_ms > 0 and job.finished_at_ms == 0
    assert job_id in {j.job_id for j in store.running_jobs()}
    assert store.get_job("not-a-uuid") is None
    assert store.get_job("00000000-0000-0000-0000-000000000000") is None


def test_add_items_dedupes_by_job_and_source_id(store: PipelineStore) -> None:
    job_id = store.create_job("dedupe", {}, ALL)
    inserted, duplicates = store.add_items(job_id, [new_item("a", 1), new_item("b", 2), new_item("a", 3)])
    assert inserted == [item_id_for(job_id, "a"), item_id_for(job_id, "b")]
    assert duplicates == 1
    inserted, duplicates = store.add_items(job_id, [new_item("b", 2), new_item("c", 4, "third")])
    assert inserted == [item_id_for(job_id, "c")]
    assert duplicates == 1
    # The first one written wins: the repeat at line 3 changed nothing.
    row = store.get_item(item_id_for(job_id, "a"))
    assert row is not None
    assert (row["line"], row["prompt"], row["status"], str(row["job_id"])) == (1, "prompt a", "pending", job_id)
    # The same source id in another job is another item.
    other = store.create_job("other", {}, ALL)
    assert store.add_items(other, [new_item("a", 1)]) == ([item_id_for(other, "a")], 0)
    assert item_id_for(other, "a") != item_id_for(job_id, "a")
    assert [r["source_id"] for r in store.items_of(job_id)] == ["a", "b", "c"]


def test_stage_outputs_are_written_once(store: PipelineStore) -> None:
    _, (item,) = job_with(store, ["only"])
    assert rewrite(store, item, tokens_in=11, tokens_out=6)
    assert not store.record_rewrite(
        item, {"optimized": "second"}, tokens_in=99, tokens_out=99, cache_hit=True, fallback_reason="empty", final=False
    )
    row = store.get_item(item)
    assert row is not None
    assert row["rewrite"] == {"optimized": f"better {item}"}
    assert (row["rewrite_tokens_in"], row["rewrite_tokens_out"], row["cache_hit"], row["fallback_reason"]) == (
        11,
        6,
        False,
        None,
    )
    assert (row["status"], row["finished_at"]) == ("rewritten", None)
    assert row["rewrite_at"] is not None

    assert answer(store, item, tokens=(20, 30))
    assert not answer(store, item, tokens=(1, 1))
    row = store.get_item(item)
    assert row is not None
    assert (row["status"], row["target_tokens_in"], row["target_tokens_out"]) == ("answered", 20, 30)

    assert judge(store, item, "optimized")
    assert not judge(store, item, "original")
    row = store.get_item(item)
    assert row is not None
    assert (row["status"], row["winner"], row["verdict"]["winner"]) == ("done", "optimized", "optimized")
    assert row["finished_at"] is not None
    # A late redelivery of an earlier stage changes nothing either.
    assert not rewrite(store, item)
    assert status(store, item) == "done"


def test_final_stage_write_finishes_the_item(store: PipelineStore) -> None:
    _, (only_rewrite,) = job_with(store, ["x"], ("rewrite",))
    assert rewrite(store, only_rewrite, final=True)
    row = store.get_item(only_rewrite)
    assert row is not None and (row["status"], row["finished_at"] is not None) == ("done", True)

    _, (two_stages,) = job_with(store, ["y"], ("rewrite", "generate"))
    assert rewrite(store, two_stages)
    assert answer(store, two_stages, final=True)
    row = store.get_item(two_stages)
    assert row is not None and (row["status"], row["finished_at"] is not None) == ("done", True)


def test_mark_failed_only_unfinished_items(store: PipelineStore) -> None:
    _, (pending, rewritten, done) = job_with(store, ["p", "r", "d"], ("rewrite", "generate"))
    assert rewrite(store, rewritten)
    assert rewrite(store, done) and answer(store, done, final=True)

    assert store.mark_failed(pending, "rewrite", "prompt too long")
    assert store.mark_failed(rewritten, "generate", "target down")
    assert not store.mark_failed(done, "generate", "late failure")
    assert not store.mark_failed(pending, "generate", "second reason")

    row = store.get_item(pending)
    assert row is not None
    assert (row["status"], row["failed_stage"], row["error"]) == ("failed", "rewrite", "prompt too long")
    assert row["finished_at"] is not None
    assert status(store, done) == "done"
    # A failed item takes no more outputs.
    assert not rewrite(store, pending)
    assert not answer(store, rewritten)
    row = store.get_item(rewritten)
    assert row is not None and row["answers"] is None


def test_cancel_job_cancels_unfinished_items_and_refuses_later_writes(db: Db) -> None:
    store = db.store
    job, (pending, rewritten, done, failed) = job_with(store, ["p", "r", "d", "f"], ("rewrite",))
    assert rewrite(store, done, final=True)
    assert store.mark_failed(failed, "rewrite", "bad")
    with psycopg.connect(db.url) as conn:  # a rewritten item in a one-stage job only arises by hand
        conn.execute("UPDATE items SET status = 'rewritten' WHERE item_id = %s", (rewritten,))

    assert store.cancel_job(job.job_id)
    cancelled = store.get_job(job.job_id)
    assert cancelled is not None
    assert cancelled.state == "cancelled" and cancelled.finished_at_ms >= cancelled.created_at_ms
    assert [status(store, i) for i in (pending, rewritten, done, failed)] == [
        "cancelled",
        "cancelled",
        "done",
        "failed",
    ]
    assert not rewrite(store, pending, final=True)
    assert not store.mark_failed(pending, "rewrite", "too late")
    assert status(store, pending) == "cancelled"
    assert not store.cancel_job(job.job_id)
    assert not store.finish_job_if_complete(job.job_id)
    assert job.job_id not in {j.job_id for j in store.running_jobs()}
    refreshed = store.get_job(job.job_id)
    assert refreshed is not None and refreshed.state == "cancelled"


def test_finish_job_only_when_nothing_is_unfinished(store: PipelineStore) -> None:
    job, (first, second) = job_with(store, ["1", "2"], ("rewrite",))
    assert not store.finish_job_if_complete(job.job_id)
    assert rewrite(store, first, final=True)
    assert not store.finish_job_if_complete(job.job_id)
    running = store.get_job(job.job_id)
    assert running is not None and (running.state, running.finished_at_ms) == ("running", 0)

    assert store.mark_failed(second, "rewrite", "bad")  # failed counts as finished
    assert store.finish_job_if_complete(job.job_id)
    assert not store.finish_job_if_complete(job.job_id)
    finished = store.get_job(job.job_id)
    # One item done, one failed: the job ends saying so.
    assert finished is not None and finished.state == "partially_failed" and finished.finished_at_ms > 0

    empty = store.create_job("all lines rejected", {}, ALL)
    assert store.finish_job_if_complete(empty)
    ended = store.get_job(empty)
    assert ended is not None and ended.state == "failed"  # nothing was done


@pytest.mark.parametrize(
    ("done", "failed", "rejected", "state"),
    [(2, 0, 0, "succeeded"), (1, 1, 0, "partially_failed"), (2, 0, 1, "partially_failed"), (0, 2, 0, "failed"),
     (0, 0, 2, "failed")],
)  # fmt: skip
def test_a_finished_job_says_what_happened(
    store: PipelineStore, done: int, failed: int, rejected: int, state: str
) -> None:
    job, items = job_with(store, [f"i{n}" for n in range(done + failed)], ("rewrite",))
    for item in items[:done]:
        assert rewrite(store, item, final=True)
    for item in items[done:]:
        assert store.mark_failed(item, "rewrite", "bad")
    for line in range(rejected):
        store.add_rejected(job.job_id, 100 + line, "not JSON")
    assert store.finish_job_if_complete(job.job_id)
    ended = store.get_job(job.job_id)
    assert ended is not None and ended.state == state


def test_unfinished_items_and_the_stage_each_needs_next(store: PipelineStore) -> None:
    job, (pending, rewritten, answered, done, failed) = job_with(store, ["p", "r", "a", "d", "f"])
    assert rewrite(store, rewritten)
    assert rewrite(store, answered) and answer(store, answered)
    assert rewrite(store, done) and answer(store, done) and judge(store, done, "tie")
    assert store.mark_failed(failed, "rewrite", "bad")
    resumed = [(str(r.item["item_id"]), r.item["status"], r.next_stage) for r in store.unfinished_items(job)]
    assert resumed == [
        (pending, "pending", "rewrite"),
        (rewritten, "rewritten", "generate"),
        (answered, "answered", "judge"),
    ]
    # The row carries what the next stage's message is rebuilt from.
    by_stage = {r.next_stage: r.item for r in store.unfinished_items(job)}
    assert by_stage["generate"]["rewrite"] == {"optimized": f"better {rewritten}"}
    assert by_stage["judge"]["answers"] == {"original_answer": "a", "optimized_answer": "b"}

    two, (p2, r2, d2) = job_with(store, ["p", "r", "d"], ("rewrite", "generate"))
    assert rewrite(store, r2)
    assert rewrite(store, d2) and answer(store, d2, final=True)
    resumed_two = [(str(r.item["item_id"]), r.next_stage) for r in store.unfinished_items(two)]
    assert resumed_two == [(p2, "rewrite"), (r2, "generate")]

    assert store.cancel_job(job.job_id)
    cancelled = store.get_job(job.job_id)
    assert cancelled is not None and list(store.unfinished_items(cancelled)) == []


def test_stage_counts(store: PipelineStore) -> None:
    job, (done, answered, gen_failed, pending, rw_failed) = job_with(store, ["1", "2", "3", "4", "5"])
    store.add_rejected(job.job_id, 6, "not JSON")
    store.add_rejected(job.job_id, 7, "no prompt field")
    store.add_rejected(job.job_id, 7, "reported twice")  # one line is one failure
    assert rewrite(store, done) and answer(store, done) and judge(store, done, "optimized")
    assert rewrite(store, answered) and answer(store, answered)
    assert rewrite(store, gen_failed) and store.mark_failed(gen_failed, "generate", "target down")
    assert store.mark_failed(rw_failed, "rewrite", "too long")

    total, stages, finished = store.stage_counts(job)
    assert total == 7
    assert stages == [StageCounts("rewrite", 5, 3, 1), StageCounts("generate", 5, 2, 1), StageCounts("judge", 5, 1, 0)]
    assert finished == 1 + 2 + 2  # done, failed twice, rejected lines twice
    assert pending  # still pending: neither done nor failed anywhere

    short, _ = job_with(store, ["1"], ("rewrite",))
    assert [s.stage for s in store.stage_counts(short)[1]] == ["rewrite"]


def test_report_rows(store: PipelineStore) -> None:
    job_id = store.create_job("report", {}, ALL)
    plan = [  # source, category, winner, position consistent, fallback, cache hit
        ("w1", "math", "optimized", True, None, False),
        ("w2", "math", "optimized", False, None, True),
        ("l1", "math", "original", True, "answered_instead", False),
        ("t1", "writing", "tie", False, None, True),
        ("w3", None, "optimized", True, None, False),
    ]
    items = [new_item(source, n, category=category) for n, (source, category, *_) in enumerate(plan, 1)]
    items.append(new_item("failed", 6, category="math"))
    items.append(new_item("waiting", 8, category="writing"))
    ids, _ = store.add_items(job_id, items)
    for item_id, (_, _, winner, consistent, fallback, cache_hit) in zip(ids, plan, strict=False):
        tokens = (0, 0) if cache_hit else (10, 5)
        assert rewrite(
            store, item_id, tokens_in=tokens[0], tokens_out=tokens[1], cache_hit=cache_hit, fallback_reason=fallback
        )
        assert answer(store, item_id, tokens=(20, 30))
        assert judge(store, item_id, winner, consistent=consistent)
    assert store.mark_failed(ids[5], "generate", "target down")
    store.add_rejected(job_id, 7, "not JSON")

    rows = store.report_rows(job_id)
    totals = rows["totals"]
    assert {
        k: int(totals[k])
        for k in ("items", "rewritten", "kept_original", "cache_hits", "judged", "wins", "ties", "losses", "consistent")
    } == {
        "items": 7,
        "rewritten": 5,
        "kept_original": 1,
        "cache_hits": 2,
        "judged": 5,
        "wins": 3,
        "ties": 1,
        "losses": 1,
        "consistent": 3,
    }
    assert {
        k: int(totals[k]) for k in ("rewrite_in", "rewrite_out", "target_in", "target_out", "judge_in", "judge_out")
    } == {
        "rewrite_in": 30,
        "rewrite_out": 15,
        "target_in": 100,
        "target_out": 150,
        "judge_in": 500,
        "judge_out": 35,
    }
    categories = {r["category"]: (r["judged"], r["wins"], r["ties"], r["losses"]) for r in rows["categories"]}
    assert categories == {"": (1, 1, 0, 0), "math": (3, 2, 0, 1), "writing": (1, 0, 1, 0)}
    assert [(f["item_id"], f["source_id"], f["line"], f["stage"], f["reason"]) for f in rows["failures"]] == [
        (ids[5], "failed", 6, "generate", "target down"),
        ("", "", 7, "submit", "not JSON"),
    ]

    report = build_report(pb.Job(job_id=job_id), rows)
    assert (report.items, report.judged, report.wins, report.ties, report.losses, report.failed) == (7, 5, 3, 1, 1, 2)
    assert report.delta_wr == pytest.approx((3 - 1) / 5)
    assert report.position_consistency == pytest.approx(3 / 5)
    assert {c.category: c.delta_wr for c in report.categories} == pytest.approx(
        {"": 1.0, "math": 1 / 3, "writing": 0.0}
    )
    assert [(f.stage, f.line) for f in report.failures] == [(pb.STAGE_GENERATE, 6), (pb.STAGE_UNSPECIFIED, 7)]


def test_report_rows_of_an_empty_job(store: PipelineStore) -> None:
    job_id = store.create_job("empty", {}, ALL)
    rows = store.report_rows(job_id)
    assert int(rows["totals"]["items"]) == 0 and int(rows["totals"]["judge_in"]) == 0
    assert rows["categories"] == [] and rows["failures"] == []
    report = build_report(pb.Job(job_id=job_id), rows)
    assert (report.win_rate, report.delta_wr, report.position_consistency) == (0.0, 0.0, 0.0)


# -- rewrite cache ------------------------------------------------------------------------------------------


def test_rewrite_cache(db: Db) -> None:
    store = db.store
    key = prompt_hash("cache me", None)
    assert store.cached_rewrite(key, "m@1", "p1") is None
    store.cache_rewrite(key, "m@1", "p1", {"optimized": "first"})
    store.cache_rewrite(key, "m@1", "p1", {"optimized": "second"})  # never overwrites
    assert store.cached_rewrite(key, "m@1", "p1") == {"optimized": "first"}
    assert store.cached_rewrite(key, "m@1", "p1") == {"optimized": "first"}
    assert store.cached_rewrite(key, "m@2", "p1") is None
    assert store.cached_rewrite(key, "m@1", "p2") is None
    assert store.cached_rewrite(prompt_hash("cache me", "with context"), "m@1", "p1") is None
    with psycopg.connect(db.url) as conn:
        hits = conn.execute(
            "SELECT hits FROM rewrite_cache WHERE prompt_hash = %s AND model_version = 'm@1'", (key,)
        ).fetchone()
    assert hits == (2,)


# -- model registry -----------------------------------------------------------------------------------------


def test_completion_cache(store: PipelineStore) -> None:
    first = Completion("an answer", prompt_tokens=12, completion_tokens=3, finish_reason="stop", latency_s=0.5)
    other = Completion("cut", prompt_tokens=9, completion_tokens=64, finish_reason="length", latency_s=1.5)
    assert store.cached_completions([]) == {} and store.cached_completions(["k1"]) == {}
    store.cache_completions("model-a", {"k1": first, "k2": other})
    store.cache_completions("model-a", {"k1": other})  # the first write stays
    assert store.cached_completions(["k1", "k2", "k3"]) == {"k1": first, "k2": other}


def test_registry_and_aliases(db: Db) -> None:
    store = db.store
    store.register_model("bpo-opt", "1", base_model="qwen", source="train run 1", metrics={"delta_wr": 0.1})
    store.register_model("bpo-opt", "2", base_model="qwen", source="train run 2")
    store.register_model("bpo-opt", "1", base_model="qwen", source="re-evaluated", metrics={"delta_wr": 0.2})
    assert store.resolve_alias("production") is None
    store.set_alias("production", "bpo-opt", "1")
    assert store.resolve_alias("production") == ("bpo-opt", "1")
    store.set_alias("production", "bpo-opt", "2")
    assert store.resolve_alias("production") == ("bpo-opt", "2")
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        store.set_alias("staging", "bpo-opt", "3")
    assert store.resolve_alias("staging") is None
    # A registered name stands for its newest version; an alias of the same name would win.
    assert store.resolve_alias("bpo-opt") == ("bpo-opt", "2")
    store.set_alias("bpo-opt", "bpo-opt", "1")
    assert store.resolve_alias("bpo-opt") == ("bpo-opt", "1")
    with psycopg.connect(db.url) as conn:
        row = conn.execute("SELECT source, metrics FROM model_registry WHERE name = 'bpo-opt' AND version = '1'")
        assert row.fetchone() == ("re-evaluated", {"delta_wr": 0.2})


# -- submissions, retries and the sweep's claims --------------------------------------------------------------


def test_a_submission_is_invisible_until_started_and_gone_when_aborted(store: PipelineStore) -> None:
    job_id = store.begin_job("corpus", {"name": "corpus"}, ALL)
    store.add_items(job_id, [new_item("a", 1)])
    assert store.get_job(job_id) is not None and store.get_job(job_id).state == "submitting"  # type: ignore[union-attr]
    assert job_id not in {job.job_id for job in store.running_jobs()}
    # Nothing of a submission in progress is ever claimed for the stages.
    assert all(str(r.item["job_id"]) != job_id for r in store.claim_due_items(0, 1000, datetime.now(UTC)))
    assert store.abort_job(job_id)
    assert store.get_job(job_id) is None and store.items_by_ids([item_id_for(job_id, "a")]) == {}
    started = store.begin_job("corpus", {"name": "corpus"}, ALL)
    assert store.start_job(started) and not store.abort_job(started)  # a started job is never aborted
    assert store.get_job(started).state == "running"  # type: ignore[union-attr]


def test_silent_submissions_are_deleted(db: Db) -> None:
    store = db.store
    silent = store.begin_job("silent", {}, ALL)
    alive = store.begin_job("alive", {}, ALL)
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute("UPDATE jobs SET heartbeat_at = now() - interval '1 hour' WHERE job_id = %s", (silent,))
    assert store.delete_stale_submissions(60) == [silent]
    assert store.get_job(alive) is not None
    assert not store.start_job(silent)  # its stream, if it ever comes back, is told to submit again


def test_parked_items_wait_their_back_off_and_give_up_after_the_last_attempt(db: Db) -> None:
    store = db.store
    _, (item,) = job_with(store, ["p"], ("rewrite",))
    policy = RetryPolicy(base_delay_s=60, max_delay_s=600, max_attempts=3)
    assert store.park_items("rewrite", [(item, "endpoint down")], policy).parked == [item]
    row = store.get_item(item)
    assert row is not None and (row["attempts"], row["status"], row["last_error"]) == (1, "pending", "endpoint down")
    assert row["retry_at"] is not None
    # Not due yet: the sweep leaves it alone.
    assert item not in {str(r.item["item_id"]) for r in store.claim_due_items(0, 1000, datetime.now(UTC))}
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute("UPDATE items SET retry_at = now() - interval '1 second' WHERE item_id = %s", (item,))
    (due,) = [r for r in store.claim_due_items(3600, 1000, datetime.now(UTC)) if str(r.item["item_id"]) == item]
    assert (due.next_stage, due.reason) == ("rewrite", "parked")
    assert store.park_items("rewrite", [(item, "still down")], policy).parked == [item]
    assert store.park_items("rewrite", [(item, "down for good")], policy).gave_up == [item]
    row = store.get_item(item)
    assert row is not None and (row["status"], row["failed_stage"]) == ("failed", "rewrite")
    assert row["error"] == "gave up after 3 attempts: down for good"


def test_the_sweep_claims_unpublished_and_idle_items_once_per_pass(db: Db) -> None:
    store = db.store
    job, items = job_with(store, ["u1", "u2", "idle", "fresh"], ("rewrite",))
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute("UPDATE items SET published_at = now() - interval '1 hour' WHERE item_id = %s", (items[2],))
        conn.execute("UPDATE items SET published_at = now() WHERE item_id = %s", (items[3],))
    cutoff = datetime.now(UTC)
    # The job counted progress just now (its submission): its idle item is queued, not lost, and stays put.
    claimed = {str(r.item["item_id"]): r.reason for r in store.claim_due_items(600, 1000, cutoff)}
    assert {k: v for k, v in claimed.items() if k in items} == {items[0]: "unpublished", items[1]: "unpublished"}
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE job_progress SET recorded_at = now() - interval '11 minutes' WHERE job_id = %s", (job.job_id,)
        )
    # A job that has not moved for the idle time: the item's message was lost.
    claimed = {str(r.item["item_id"]): r.reason for r in store.claim_due_items(600, 1000, cutoff)}
    assert {k: v for k, v in claimed.items() if k in items} == {items[2]: "idle"}
    # Claimed items count as published now: the same pass, or a concurrent one, does not take them again.
    again = {str(r.item["item_id"]) for r in store.claim_due_items(600, 1000, cutoff)}
    assert not again & set(items)
    # A limit bounds a pass.
    more, _ = store.add_items(job.job_id, [new_item(f"n{i}", 10 + i) for i in range(5)])
    assert len([r for r in store.claim_due_items(600, 2, cutoff) if str(r.item["item_id"]) in more]) <= 4


# -- teams, tokens, quotas, usage ---------------------------------------------------------------------------


def test_tokens_are_stored_hashed_and_revocable(db: Db) -> None:
    store = db.store
    team = store.create_team("store-tokens")
    with pytest.raises(InvalidConfigurationError, match="exists already"):
        store.create_team("store-tokens")
    with pytest.raises(InvalidConfigurationError, match="must be 1-64"):
        store.create_team("no spaces")
    info, token = store.create_token("store-tokens", "ci")
    assert token.startswith("bpo_") and info.prefix == token[:12] and info.team == "store-tokens"
    found = store.team_for_token(token)
    assert found is not None and found.team_id == team.team_id
    with psycopg.connect(db.url, autocommit=True) as conn:
        stored = conn.execute("SELECT token_hash, last_used_at FROM api_tokens WHERE token_id = %s", (info.token_id,))
        token_hash, last_used = stored.fetchone() or (None, None)
    assert token_hash == hashlib.sha256(token.encode()).hexdigest() and token not in str(token_hash)
    assert last_used is not None
    assert store.team_for_token(token + "x") is None
    assert store.revoke_token(info.token_id) and not store.revoke_token(info.token_id)
    assert not store.revoke_token("not-a-uuid")
    assert store.team_for_token(token) is None
    # A disabled team's token still names it (so the caller hears why it is refused).
    _, other = store.create_token("store-tokens")
    store.set_team_disabled("store-tokens", True)
    disabled = store.team_for_token(other)
    assert disabled is not None and disabled.disabled


def test_usage_counts_per_day_and_quotas_say_who_is_over(db: Db) -> None:
    store = db.store
    heavy, light = store.create_team("store-heavy"), store.create_team("store-light")
    store.set_quotas("store-heavy", TeamQuotas(running_jobs=1, tokens_per_day={"target": 100}))
    assert store.team("store-heavy").quotas == TeamQuotas(running_jobs=1, tokens_per_day={"target": 100})
    store.add_usage(heavy.team_id, "target", tokens_in=60, tokens_out=30)
    store.add_usage(light.team_id, "target", tokens_in=600, tokens_out=300)  # no quota: never over
    assert store.teams_over_token_quota("target", [heavy.team_id, light.team_id]) == set()
    store.add_usage(heavy.team_id, "target", tokens_out=10)
    assert store.usage_today(heavy.team_id)["target"] == {"tokens_in": 60, "tokens_out": 40, "items": 0}
    assert store.teams_over_token_quota("target", [heavy.team_id, light.team_id]) == {heavy.team_id}
    assert store.teams_over_token_quota("judge", [heavy.team_id]) == set()
    job_id = store.create_job("quota", {}, ("rewrite",), team_id=heavy.team_id)
    assert store.running_jobs_of(heavy.team_id) == 1 and store.running_jobs_of(light.team_id) == 0
    store.cancel_job(job_id)
    assert store.running_jobs_of(heavy.team_id) == 0


def test_record_outputs_charges_the_jobs_team(db: Db) -> None:
    store = db.store
    team = store.create_team("store-charged")
    job_id = store.create_job("charged", {}, ("rewrite",), team_id=team.team_id)
    (item,), _ = store.add_items(job_id, [new_item("c", 1)])
    written = store.record_outputs("rewrite", [StageWrite(item, {"optimized": "o"}, 7, 3, True)])
    assert written == {item}
    # A redelivered write charges nothing more.
    assert store.record_outputs("rewrite", [StageWrite(item, {"optimized": "o"}, 7, 3, True)]) == set()
    assert store.usage_today(team.team_id)["optimizer"] == {"tokens_in": 7, "tokens_out": 3, "items": 0}


# -- progress counters --------------------------------------------------------------------------------------


def recount(db: Db, job_id: str) -> dict[str, int]:
    """What the counters must say, counted from the items themselves."""
    with psycopg.connect(db.url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), count(rewrite), count(*) FILTER (WHERE failed_stage = 'rewrite'), count(answers),"
            " count(*) FILTER (WHERE failed_stage = 'generate'), count(verdict),"
            " count(*) FILTER (WHERE failed_stage = 'judge'), count(*) FILTER (WHERE status = 'done'),"
            " count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'cancelled'),"
            " (SELECT count(*) FROM rejected_lines WHERE job_id = %s) FROM items WHERE job_id = %s",
            (job_id, job_id),
        ).fetchone()
    assert row is not None
    names = ("items", "rewrite_done", "rewrite_failed", "generate_done", "generate_failed", "judge_done",
             "judge_failed", "done", "failed", "cancelled", "rejected")  # fmt: skip
    return dict(zip(names, (int(v) for v in row), strict=True))


def test_progress_counters_match_the_items_through_every_kind_of_change(db: Db) -> None:
    store = db.store
    job, items = job_with(store, [f"s{n}" for n in range(12)])
    store.add_items(job.job_id, [new_item("s0", 1), new_item("extra", 13)])  # one duplicate, one new
    store.add_rejected_lines(job.job_id, [(20, "not JSON"), (21, "empty"), (20, "not JSON")])
    writes = [StageWrite(i, {"optimized": "o"}, 1, 1, False) for i in items[:8]]
    store.record_outputs("rewrite", writes)
    store.record_outputs("rewrite", writes[:3])  # redelivered: counts nothing
    store.record_outputs("generate", [StageWrite(i, {"a": 1}, 1, 1, False) for i in items[:6]])
    store.record_outputs("judge", [StageWrite(i, {"winner": "tie"}, 1, 1, True, {"winner": "tie"}) for i in items[:4]])
    store.fail_items("generate", [(items[6], "target refused"), (items[0], "already done: not failed")])
    policy = RetryPolicy(base_delay_s=60, max_delay_s=60, max_attempts=2)
    store.park_items("rewrite", [(items[8], "down"), (items[9], "down")], policy)
    store.park_items("rewrite", [(items[8], "still down")], policy)  # gives up: fails
    expected = recount(db, job.job_id)
    counts = store.progress_of([job.job_id])[job.job_id]
    assert {name: getattr(counts, name) for name in expected} == expected
    assert expected["items"] == 13 and expected["rejected"] == 2 and expected["done"] == 4
    store.cancel_job(job.job_id)
    after = recount(db, job.job_id)
    assert after["cancelled"] == 13 - 4 - 2 and store.progress_of([job.job_id])[job.job_id].cancelled == 7
    # Folding keeps the sums and leaves one row.
    for n in range(FOLD_ABOVE):
        store.add_rejected_lines(job.job_id, [(100 + n, "more")])
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute("UPDATE job_progress SET recorded_at = recorded_at - interval '1 hour' WHERE job_id = %s",
                     (job.job_id,))  # fmt: skip
        newest = conn.execute("SELECT max(recorded_at) FROM job_progress WHERE job_id = %s", (job.job_id,)).fetchone()
    assert store.fold_progress() >= 1
    with psycopg.connect(db.url, autocommit=True) as conn:
        rows_after = conn.execute(
            "SELECT count(*), max(recorded_at) FROM job_progress WHERE job_id = %s", (job.job_id,)
        ).fetchone()
    # One row, as recent as the newest it folded: the sweep still sees when the job last moved.
    assert rows_after is not None and newest is not None and rows_after == (1, newest[0])
    folded = store.progress_of([job.job_id])[job.job_id]
    assert {name: getattr(folded, name) for name in expected} == recount(db, job.job_id)
    total, stages, finished = store.stage_counts(store.get_job(job.job_id) or job)
    assert (total, finished) == (13 + 2 + FOLD_ABOVE, 13 + 2 + FOLD_ABOVE)
    assert [(s.stage, s.done, s.failed) for s in stages] == [("rewrite", 8, 1), ("generate", 6, 1), ("judge", 4, 0)]


def test_a_report_summarises_failures_by_reason_within_bounds(db: Db) -> None:
    store = db.store
    job, items = job_with(store, [f"f{n}" for n in range(30)], ("rewrite",))
    store.fail_items("rewrite", [(item, "endpoint refused the prompt") for item in items[:20]])
    store.fail_items("rewrite", [(item, "prompt too long") for item in items[20:25]])
    store.add_rejected_lines(job.job_id, [(100, "not JSON")])
    rows = store.report_rows(job.job_id)
    assert (rows["failed"], rows["rejected"]) == (26, 1)
    reasons = [(r["stage"], r["reason"], r["count"], r["lines"]) for r in rows["failure_reasons"]]
    assert reasons == [
        ("rewrite", "endpoint refused the prompt", 20, [1, 2, 3, 4, 5]),
        ("rewrite", "prompt too long", 5, [21, 22, 23, 24, 25]),
        ("submit", "not JSON", 1, [100]),
    ]
    report = build_report(pb.Job(job_id=job.job_id), rows)
    assert report.failed == 26 and report.rejected == 1 and len(report.failures) == 26
    assert report.failure_reasons[0].count == 20 and list(report.failure_reasons[0].sample_lines) == [1, 2, 3, 4, 5]
