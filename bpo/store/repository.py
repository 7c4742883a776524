"""The one store: jobs, items and their stage outputs, the rewrite and completion caches, the model registry.

Every stage write is keyed by (item, stage) and happens once: ``UPDATE ... WHERE <output> IS NULL``. A
redelivered message therefore never duplicates or overwrites a result; the stage re-reads the stored output
and forwards that instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from psycopg import Connection
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from bpo.engines.base import Completion
from bpo.messages import ALL_STAGES

Pool = ConnectionPool[Connection[dict[str, Any]]]
UNFINISHED = ("pending", "rewritten", "answered")
# What a stage's successful write sets the status to, when more stages follow it.
STATUS_AFTER = {"rewrite": "rewritten", "generate": "answered", "judge": "done"}


def item_id_for(job_id: str, source_id: str) -> str:
    """Deterministic: the same corpus record in the same job always gets the same id (re-submits dedupe)."""
    return str(uuid.uuid5(uuid.UUID(job_id), source_id))


@dataclass(frozen=True, slots=True)
class NewItem:
    source_id: str
    line: int
    prompt: str
    context: str | None
    category: str | None
    prompt_hash: str


@dataclass(frozen=True, slots=True)
class JobRow:
    job_id: str
    name: str
    spec: dict[str, Any]
    stages: tuple[str, ...]
    state: str
    created_at_ms: int
    finished_at_ms: int


@dataclass(frozen=True, slots=True)
class StageCounts:
    stage: str
    total: int
    done: int
    failed: int


@dataclass(frozen=True, slots=True)
class ResumeItem:
    item: dict[str, Any]
    next_stage: str


def _ms(value: Any) -> int:
    return int(value.timestamp() * 1000) if value is not None else 0


class PipelineStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    # -- jobs --------------------------------------------------------------------------------------------

    def create_job(self, name: str, spec: dict[str, Any], stages: Sequence[str]) -> str:
        job_id = str(uuid.uuid4())
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO jobs (job_id, name, spec, stages, state) VALUES (%s, %s, %s, %s, 'running')",
                (job_id, name, Jsonb(spec), list(stages)),
            )
        return job_id

    def get_job(self, job_id: str) -> JobRow | None:
        if not _is_uuid(job_id):
            return None
        with self._pool.connection() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
        if row is None:
            return None
        return JobRow(
            job_id=str(row["job_id"]),
            name=row["name"],
            spec=row["spec"],
            stages=tuple(row["stages"]),
            state=row["state"],
            created_at_ms=_ms(row["created_at"]),
            finished_at_ms=_ms(row["finished_at"]),
        )

    def running_jobs(self) -> list[JobRow]:
        with self._pool.connection() as conn:
            ids = [str(r["job_id"]) for r in conn.execute("SELECT job_id FROM jobs WHERE state = 'running'")]
        return [job for job in (self.get_job(i) for i in ids) if job is not None]

    def cancel_job(self, job_id: str) -> bool:
        with self._pool.connection() as conn, conn.transaction():
            updated = conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE job_id = %s AND state = 'running'",
                (job_id,),
            ).rowcount
            conn.execute(
                "UPDATE items SET status = 'cancelled', finished_at = now() WHERE job_id = %s AND status = ANY(%s)",
                (job_id, list(UNFINISHED)),
            )
        return updated == 1

    def finish_job_if_complete(self, job_id: str) -> bool:
        """End a running job once none of its items is left to process, in the state its items earned:
        ``succeeded`` when none failed, ``failed`` when none finished (an empty job included: nothing was
        done), ``partially_failed`` otherwise. Rejected corpus lines count as failed items."""
        with self._pool.connection() as conn:
            return (
                conn.execute(
                    "UPDATE jobs SET finished_at = now(), state = CASE"
                    " WHEN c.done = 0 THEN 'failed' WHEN c.failed > 0 THEN 'partially_failed' ELSE 'succeeded' END"
                    " FROM (SELECT count(*) FILTER (WHERE status = 'done') AS done,"
                    "  count(*) FILTER (WHERE status = 'failed')"
                    "  + (SELECT count(*) FROM rejected_lines WHERE job_id = %s) AS failed"
                    "  FROM items WHERE job_id = %s) AS c"
                    " WHERE jobs.job_id = %s AND jobs.state = 'running'"
                    " AND NOT EXISTS (SELECT 1 FROM items WHERE job_id = %s AND status = ANY(%s))",
                    (job_id, job_id, job_id, job_id, list(UNFINISHED)),
                ).rowcount
                == 1
            )

    # -- items -------------------------------------------------------------------------------------------

    def add_items(self, job_id: str, items: Sequence[NewItem]) -> tuple[list[str], int]:
        """Insert a chunk of items; returns the ids inserted now and how many were duplicates of earlier ones."""
        inserted: list[str] = []
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            for item in items:
                item_id = item_id_for(job_id, item.source_id)
                cur.execute(
                    "INSERT INTO items (item_id, job_id, source_id, line, prompt, context, category, prompt_hash)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (item_id, job_id, item.source_id, item.line, item.prompt, item.context, item.category,
                     item.prompt_hash),
                )  # fmt: skip
                if cur.rowcount == 1:
                    inserted.append(item_id)
        return inserted, len(items) - len(inserted)

    def add_rejected(self, job_id: str, line: int, reason: str) -> None:
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO rejected_lines (job_id, line, reason) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (job_id, line, reason),
            )

    def get_item(self, item_id: str) -> dict[str, Any] | None:
        if not _is_uuid(item_id):
            return None
        with self._pool.connection() as conn:
            row = conn.execute("SELECT * FROM items WHERE item_id = %s", (item_id,)).fetchone()
        return dict(row) if row is not None else None

    def items_page(self, job_id: str, after: tuple[int, str] | None, limit: int = 500) -> list[dict[str, Any]]:
        """One page of a job's items in corpus order; pass the last row's (line, source_id) for the next."""
        line, source_id = after if after is not None else (-(2**31), "")
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT * FROM items WHERE job_id = %s AND (line, source_id) > (%s, %s)"
                " ORDER BY line, source_id LIMIT %s",
                (job_id, line, source_id, limit),
            ).fetchall()
        return [dict(row) for row in rows]

    def items_of(self, job_id: str) -> Iterator[dict[str, Any]]:
        after: tuple[int, str] | None = None
        while page := self.items_page(job_id, after):
            yield from page
            after = (page[-1]["line"], page[-1]["source_id"])

    def _record(self, item_id: str, stage: str, sets: str, values: tuple[Any, ...], final: bool) -> bool:
        column = {"rewrite": "rewrite", "generate": "answers", "judge": "verdict"}[stage]
        status = "done" if final else STATUS_AFTER[stage]
        with self._pool.connection() as conn:
            updated = conn.execute(
                f"UPDATE items SET {sets}, status = %s, {column}_at = now(),"
                " finished_at = CASE WHEN %s THEN now() ELSE finished_at END"
                f" WHERE item_id = %s AND {column} IS NULL AND status NOT IN ('failed', 'cancelled')",
                (*values, status, final, item_id),
            ).rowcount
        return updated == 1

    def record_rewrite(
        self,
        item_id: str,
        rewrite: dict[str, Any],
        *,
        tokens_in: int,
        tokens_out: int,
        cache_hit: bool,
        fallback_reason: str | None,
        final: bool,
    ) -> bool:
        return self._record(
            item_id,
            "rewrite",
            "rewrite = %s, rewrite_tokens_in = %s, rewrite_tokens_out = %s, cache_hit = %s, fallback_reason = %s",
            (Jsonb(rewrite), tokens_in, tokens_out, cache_hit, fallback_reason),
            final,
        )

    def record_answers(
        self, item_id: str, answers: dict[str, Any], *, tokens_in: int, tokens_out: int, final: bool
    ) -> bool:
        return self._record(
            item_id,
            "generate",
            "answers = %s, target_tokens_in = %s, target_tokens_out = %s",
            (Jsonb(answers), tokens_in, tokens_out),
            final,
        )

    def record_verdict(
        self, item_id: str, verdict: dict[str, Any], *, winner: str, tokens_in: int, tokens_out: int
    ) -> bool:
        return self._record(
            item_id,
            "judge",
            "verdict = %s, winner = %s, judge_tokens_in = %s, judge_tokens_out = %s",
            (Jsonb(verdict), winner, tokens_in, tokens_out),
            True,
        )

    def mark_failed(self, item_id: str, stage: str, reason: str) -> bool:
        if not _is_uuid(item_id):
            return False
        with self._pool.connection() as conn:
            return (
                conn.execute(
                    "UPDATE items SET status = 'failed', failed_stage = %s, error = %s, finished_at = now()"
                    " WHERE item_id = %s AND status = ANY(%s)",
                    (stage, reason, item_id, list(UNFINISHED)),
                ).rowcount
                == 1
            )

    def unfinished_items(self, job: JobRow) -> Iterator[ResumeItem]:
        """Items a restart must re-publish, each with the stage that should see it next."""
        next_stage = {"pending": job.stages[0]}
        for previous, following in zip(job.stages, job.stages[1:], strict=False):
            next_stage[STATUS_AFTER[previous]] = following
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT * FROM items WHERE job_id = %s AND status = ANY(%s) ORDER BY line",
                (job.job_id, list(UNFINISHED)),
            ).fetchall()
        for row in rows:
            stage = next_stage.get(row["status"])
            if stage is not None:
                yield ResumeItem(dict(row), stage)

    # -- progress and reports ----------------------------------------------------------------------------

    def stage_counts(self, job: JobRow) -> tuple[int, list[StageCounts], int]:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT count(*) AS items,"
                " count(rewrite) AS rewrite_done, count(*) FILTER (WHERE failed_stage = 'rewrite') AS rewrite_failed,"
                " count(answers) AS generate_done,"
                " count(*) FILTER (WHERE failed_stage = 'generate') AS generate_failed,"
                " count(verdict) AS judge_done, count(*) FILTER (WHERE failed_stage = 'judge') AS judge_failed,"
                " count(*) FILTER (WHERE status IN ('done', 'failed', 'cancelled')) AS finished"
                " FROM items WHERE job_id = %s",
                (job.job_id,),
            ).fetchone()
            rejected = conn.execute(
                "SELECT count(*) AS n FROM rejected_lines WHERE job_id = %s", (job.job_id,)
            ).fetchone()
        assert row is not None and rejected is not None
        total = int(row["items"])
        stages = [
            StageCounts(stage, total, int(row[f"{stage}_done"]), int(row[f"{stage}_failed"]))
            for stage in ALL_STAGES
            if stage in job.stages
        ]
        return total + int(rejected["n"]), stages, int(row["finished"]) + int(rejected["n"])

    def report_rows(self, job_id: str) -> dict[str, Any]:
        with self._pool.connection() as conn:
            totals = conn.execute(
                "SELECT count(*) AS items, count(rewrite) AS rewritten,"
                " count(*) FILTER (WHERE fallback_reason IS NOT NULL) AS kept_original,"
                " count(*) FILTER (WHERE cache_hit) AS cache_hits,"
                " count(verdict) AS judged,"
                " count(*) FILTER (WHERE winner = 'optimized') AS wins,"
                " count(*) FILTER (WHERE winner = 'tie') AS ties,"
                " count(*) FILTER (WHERE winner = 'original') AS losses,"
                " count(*) FILTER (WHERE (verdict->>'position_consistent')::boolean) AS consistent,"
                " count(*) FILTER (WHERE (verdict->>'identical_answers')::boolean) AS identical_answers,"
                " coalesce(sum(rewrite_tokens_in), 0) AS rewrite_in,"
                " coalesce(sum(rewrite_tokens_out), 0) AS rewrite_out,"
                " coalesce(sum(target_tokens_in), 0) AS target_in, coalesce(sum(target_tokens_out), 0) AS target_out,"
                " coalesce(sum(judge_tokens_in), 0) AS judge_in, coalesce(sum(judge_tokens_out), 0) AS judge_out"
                " FROM items WHERE job_id = %s",
                (job_id,),
            ).fetchone()
            categories = conn.execute(
                "SELECT coalesce(category, '') AS category, count(verdict) AS judged,"
                " count(*) FILTER (WHERE winner = 'optimized') AS wins,"
                " count(*) FILTER (WHERE winner = 'tie') AS ties,"
                " count(*) FILTER (WHERE winner = 'original') AS losses"
                " FROM items WHERE job_id = %s GROUP BY 1 ORDER BY 1",
                (job_id,),
            ).fetchall()
            failures = conn.execute(
                "SELECT item_id::text AS item_id, source_id, line, failed_stage AS stage, error AS reason"
                " FROM items WHERE job_id = %s AND status = 'failed'"
                " UNION ALL SELECT '' AS item_id, '' AS source_id, line, 'submit' AS stage, reason"
                " FROM rejected_lines WHERE job_id = %s ORDER BY line",
                (job_id, job_id),
            ).fetchall()
        return {"totals": totals, "categories": categories, "failures": failures}

    # -- rewrite cache -----------------------------------------------------------------------------------

    def cached_rewrite(self, prompt_hash: str, model_version: str, params_hash: str) -> dict[str, Any] | None:
        with self._pool.connection() as conn:
            row = conn.execute(
                "UPDATE rewrite_cache SET hits = hits + 1"
                " WHERE prompt_hash = %s AND model_version = %s AND params_hash = %s RETURNING rewrite",
                (prompt_hash, model_version, params_hash),
            ).fetchone()
        return row["rewrite"] if row is not None else None

    def cache_rewrite(self, prompt_hash: str, model_version: str, params_hash: str, rewrite: dict[str, Any]) -> None:
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO rewrite_cache (prompt_hash, model_version, params_hash, rewrite)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (prompt_hash, model_version, params_hash, Jsonb(rewrite)),
            )

    # -- completion cache (greedy target and judge calls) --------------------------------------------------

    def cached_completions(self, keys: Sequence[str]) -> dict[str, Completion]:
        if not keys:
            return {}
        with self._pool.connection() as conn:
            rows = conn.execute(
                "UPDATE completion_cache SET hits = hits + 1 WHERE key = ANY(%s) RETURNING key, completion",
                (list(keys),),
            ).fetchall()
        return {row["key"]: Completion(**row["completion"]) for row in rows}

    def cache_completions(self, model: str, entries: Mapping[str, Completion]) -> None:
        if not entries:
            return
        with self._pool.connection() as conn:
            conn.cursor().executemany(
                "INSERT INTO completion_cache (key, model, completion) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                [(key, model, Jsonb(asdict(completion))) for key, completion in entries.items()],
            )

    # -- model registry ----------------------------------------------------------------------------------

    def register_model(
        self,
        name: str,
        version: str,
        *,
        base_model: str = "",
        source: str = "",
        manifest_hash: str = "",
        metrics: dict[str, Any] | None = None,
    ) -> None:
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO model_registry (name, version, base_model, source, manifest_hash, metrics)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name, version) DO UPDATE"
                " SET base_model = excluded.base_model, source = excluded.source,"
                " manifest_hash = excluded.manifest_hash, metrics = excluded.metrics",
                (name, version, base_model, source, manifest_hash, Jsonb(metrics or {})),
            )

    def set_alias(self, alias: str, name: str, version: str) -> None:
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO model_aliases (alias, name, version) VALUES (%s, %s, %s)"
                " ON CONFLICT (alias) DO UPDATE SET name = excluded.name, version = excluded.version,"
                " updated_at = now()",
                (alias, name, version),
            )

    def resolve_alias(self, alias: str) -> tuple[str, str] | None:
        """(name, version) an alias points at; a registered optimizer's own name stands for its newest version."""
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT name, version FROM ("
                " SELECT 0 AS rank, a.name, a.version, now() AS created_at FROM model_aliases a WHERE a.alias = %s"
                " UNION ALL SELECT 1, name, version, created_at FROM model_registry WHERE name = %s"
                ") AS found ORDER BY rank, created_at DESC LIMIT 1",
                (alias, alias),
            ).fetchone()
        return (row["name"], row["version"]) if row is not None else None


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
