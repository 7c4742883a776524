"""The one store: jobs, items and their stage outputs, and (from sibling modules) the rewrite and completion
caches and the model registry.

Every stage write is keyed by (item, stage) and happens once: ``UPDATE ... WHERE <output> IS NULL``. A
redelivered message therefore never duplicates or overwrites a result; the stage re-reads the stored output
and forwards that instead. Stages read and write a whole batch in one statement each.

An item's life: ``pending`` -> (``rewritten`` -> ``answered`` ->) ``done``, or ``failed`` / ``cancelled``. An item
whose stage hit a transient error is *parked* (``retry_at``) and re-published by the sweep when due; after its
last attempt it fails with the reason. ``published_at`` says when it was last handed to a topic: the sweep
re-publishes an item idle beyond a threshold, so a message the broker lost delays the item, never loses it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import Any

from psycopg import Connection
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from bpo.messages import ALL_STAGES
from bpo.store.caches import CacheTables
from bpo.store.progress import ProgressTables, increments
from bpo.store.registry import RegistryTables
from bpo.store.teams import TeamTables

Pool = ConnectionPool[Connection[dict[str, Any]]]
UNFINISHED = ("pending", "rewritten", "answered")
# What a stage's successful write sets the status to, when more stages follow it.
STATUS_AFTER = {"rewrite": "rewritten", "generate": "answered", "judge": "done"}
# The status an item has while it waits for each stage.
STATUS_BEFORE = {"rewrite": "pending", "generate": "rewritten", "judge": "answered"}
OUTPUT_COLUMN = {"rewrite": "rewrite", "generate": "answers", "judge": "verdict"}
TOKEN_COLUMNS = {"rewrite": "rewrite_tokens", "generate": "target_tokens", "judge": "judge_tokens"}
# A report lists at most this many failures, and summarises every distinct reason (at most this many, each
# with the corpus lines of its first occurrences).
MAX_REPORTED_FAILURES = 1000
MAX_FAILURE_REASONS = 100
FAILURE_SAMPLE_LINES = 5
# The role whose daily token quota a stage's work counts against.
USAGE_ROLE = {"rewrite": "optimizer", "generate": "target", "judge": "judge"}


def _failed_counts(stage: str) -> dict[str, str]:
    """The counters an item failing in ``stage`` grows (its stage's, if it is one, and the job's)."""
    counts = {"failed": "count(*)"}
    if stage in ALL_STAGES:
        counts[f"{stage}_failed"] = "count(*)"
    return counts


def item_id_for(job_id: str, source_id: str) -> str:
    """Deterministic: the same corpus record in the same job always gets the same id (re-submits dedupe)."""
    return str(uuid.uuid5(uuid.UUID(job_id), source_id))


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


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
    # The team that submitted it ("" and None for jobs from before teams existed).
    team: str = ""
    team_id: str | None = None


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
    reason: str = "resumed"


@dataclass(frozen=True, slots=True)
class StageWrite:
    """One item's output of one stage, as a stage writes it. ``extra`` holds the stage's own columns
    (rewrite: ``cache_hit``, ``fallback_reason``; judge: ``winner``)."""

    item_id: str
    output: dict[str, Any]
    tokens_in: int
    tokens_out: int
    final: bool
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long an item whose stage keeps failing transiently is retried: exponential back-off from
    ``base_delay_s`` capped at ``max_delay_s``, ``max_attempts`` in all (the defaults span about 35 minutes)."""

    base_delay_s: float = 5.0
    max_delay_s: float = 300.0
    max_attempts: int = 12


@dataclass(frozen=True, slots=True)
class Parked:
    parked: list[str]
    gave_up: list[str]


_EXTRA_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "rewrite": (("cache_hit", "boolean"), ("fallback_reason", "text")),
    "generate": (),
    "judge": (("winner", "text"),),
}


def _ms(value: Any) -> int:
    return int(value.timestamp() * 1000) if value is not None else 0


def _job_row(row: Mapping[str, Any]) -> JobRow:
    return JobRow(
        job_id=str(row["job_id"]),
        name=row["name"],
        spec=row["spec"],
        stages=tuple(row["stages"]),
        state=row["state"],
        created_at_ms=_ms(row["created_at"]),
        finished_at_ms=_ms(row["finished_at"]),
        team=row.get("team_name") or "",
        team_id=str(row["team_id"]) if row.get("team_id") is not None else None,
    )


def next_stage_of(status: str, stages: Sequence[str]) -> str | None:
    """The stage an unfinished item of a job with ``stages`` needs next, given its status."""
    if status == "pending":
        return stages[0]
    for previous, following in pairwise(stages):
        if STATUS_AFTER[previous] == status:
            return following
    return None


class PipelineStore(CacheTables, RegistryTables, TeamTables, ProgressTables):
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    # -- jobs --------------------------------------------------------------------------------------------

    def begin_job(self, name: str, spec: dict[str, Any], stages: Sequence[str], team_id: str | None = None) -> str:
        """A job whose corpus is still arriving: invisible to the stages until ``start_job``."""
        return self._insert_job(name, spec, stages, "submitting", team_id)

    def create_job(self, name: str, spec: dict[str, Any], stages: Sequence[str], team_id: str | None = None) -> str:
        """A running job at once (items added later are published by whoever adds them)."""
        return self._insert_job(name, spec, stages, "running", team_id)

    def _insert_job(
        self, name: str, spec: dict[str, Any], stages: Sequence[str], state: str, team_id: str | None
    ) -> str:
        job_id = str(uuid.uuid4())
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO jobs (job_id, name, spec, stages, state, team_id) VALUES (%s, %s, %s, %s, %s, %s)",
                (job_id, name, Jsonb(spec), list(stages), state, team_id),
            )
        return job_id

    def heartbeat_job(self, job_id: str) -> None:
        """A submission in progress says it is alive (the sweep deletes submissions that stopped saying so)."""
        with self._pool.connection() as conn:
            conn.execute("UPDATE jobs SET heartbeat_at = now() WHERE job_id = %s AND state = 'submitting'", (job_id,))

    def start_job(self, job_id: str) -> bool:
        """The whole corpus arrived: the job runs from now on. False when it is gone (deleted as stale)."""
        with self._pool.connection() as conn:
            updated = conn.execute(
                "UPDATE jobs SET state = 'running', heartbeat_at = now() WHERE job_id = %s AND state = 'submitting'",
                (job_id,),
            ).rowcount
        return updated == 1

    def abort_job(self, job_id: str) -> bool:
        """Forget a submission that did not complete, with its items; a started job is never touched."""
        with self._pool.connection() as conn:
            deleted = conn.execute("DELETE FROM jobs WHERE job_id = %s AND state = 'submitting'", (job_id,)).rowcount
        return deleted == 1

    def delete_stale_submissions(self, silent_for_s: float) -> list[str]:
        """Submissions whose stream stopped (their jobs process died mid-stream): nobody got their id."""
        with self._pool.connection() as conn:
            rows = conn.execute(
                "DELETE FROM jobs WHERE state = 'submitting' AND heartbeat_at < now() - make_interval(secs => %s)"
                " RETURNING job_id::text",
                (silent_for_s,),
            ).fetchall()
        return [row["job_id"] for row in rows]

    def get_job(self, job_id: str) -> JobRow | None:
        return self.jobs_by_ids([job_id]).get(job_id)

    def jobs_by_ids(self, job_ids: Sequence[str]) -> dict[str, JobRow]:
        wanted = sorted({job_id for job_id in job_ids if is_uuid(job_id)})
        if not wanted:
            return {}
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT jobs.*, teams.name AS team_name FROM jobs LEFT JOIN teams USING (team_id)"
                " WHERE job_id = ANY(%s::uuid[])",
                (wanted,),
            ).fetchall()
        return {str(row["job_id"]): _job_row(row) for row in rows}

    def running_jobs(self) -> list[JobRow]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT jobs.*, teams.name AS team_name FROM jobs LEFT JOIN teams USING (team_id)"
                " WHERE state = 'running'"
            ).fetchall()
        return [_job_row(row) for row in rows]

    def oldest_unfinished_item_age_s(self) -> float:
        """Seconds since the oldest unfinished item of a running job was submitted (0 when there is none)."""
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM now() - min(i.created_at)) AS age FROM items i"
                " JOIN jobs j ON j.job_id = i.job_id AND j.state = 'running' WHERE i.status = ANY(%s)",
                (list(UNFINISHED),),
            ).fetchone()
        return float(row["age"]) if row is not None and row["age"] is not None else 0.0

    def cancel_job(self, job_id: str) -> bool:
        with self._pool.connection() as conn, conn.transaction():
            updated = conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE job_id = %s AND state = 'running'",
                (job_id,),
            ).rowcount
            conn.execute(
                "WITH cancelled AS (UPDATE items SET status = 'cancelled', finished_at = now(), retry_at = NULL"
                " WHERE job_id = %s AND status = ANY(%s) RETURNING job_id) "
                + increments("cancelled", {"cancelled": "count(*)"}),
                (job_id, list(UNFINISHED)),
            )
        return updated == 1

    def finish_job_if_complete(self, job_id: str) -> bool:
        return bool(self.finish_jobs_if_complete([job_id]))

    def finish_jobs_if_complete(self, job_ids: Sequence[str]) -> list[str]:
        """End each running job with no item left to process, in the state its items earned: ``succeeded``
        when none failed, ``failed`` when none finished (an empty job included: nothing was done),
        ``partially_failed`` otherwise. Rejected corpus lines count as failed items. Returns the jobs ended."""
        wanted = sorted({job_id for job_id in job_ids if is_uuid(job_id)})
        if not wanted:
            return []
        with self._pool.connection() as conn:
            rows = conn.execute(
                "UPDATE jobs SET finished_at = now(), state = CASE"
                " WHEN c.done = 0 THEN 'failed' WHEN c.failed > 0 THEN 'partially_failed' ELSE 'succeeded' END"
                " FROM (SELECT j.job_id,"
                "   (SELECT count(*) FROM items i WHERE i.job_id = j.job_id AND i.status = 'done') AS done,"
                "   (SELECT count(*) FROM items i WHERE i.job_id = j.job_id AND i.status = 'failed')"
                "   + (SELECT count(*) FROM rejected_lines r WHERE r.job_id = j.job_id) AS failed"
                "  FROM jobs j WHERE j.job_id = ANY(%s::uuid[]) AND j.state = 'running'"
                "  AND NOT EXISTS (SELECT 1 FROM items i WHERE i.job_id = j.job_id AND i.status = ANY(%s))) AS c"
                " WHERE jobs.job_id = c.job_id AND jobs.state = 'running' RETURNING jobs.job_id::text",
                (wanted, list(UNFINISHED)),
            ).fetchall()
        return [row["job_id"] for row in rows]

    # -- items -------------------------------------------------------------------------------------------

    def add_items(self, job_id: str, items: Sequence[NewItem]) -> tuple[list[str], int]:
        """Insert a chunk of items in one statement; returns the ids inserted now and how many were duplicates
        (of earlier items or of each other)."""
        if not items:
            return [], 0
        first: dict[str, NewItem] = {}
        for item in items:
            first.setdefault(item_id_for(job_id, item.source_id), item)
        ids = list(first)
        with self._pool.connection() as conn:
            rows = conn.execute(
                "WITH added AS (INSERT INTO items"
                " (item_id, job_id, source_id, line, prompt, context, category, prompt_hash)"
                " SELECT u.item_id, %s, u.source_id, u.line, u.prompt, u.context, u.category, u.prompt_hash"
                " FROM unnest(%s::uuid[], %s::text[], %s::int[], %s::text[], %s::text[], %s::text[], %s::text[])"
                " AS u(item_id, source_id, line, prompt, context, category, prompt_hash)"
                " ON CONFLICT DO NOTHING RETURNING item_id, job_id),"
                f" counted AS ({increments('added', {'items': 'count(*)'})})"
                " SELECT item_id::text FROM added",
                (
                    job_id,
                    ids,
                    [first[i].source_id for i in ids],
                    [first[i].line for i in ids],
                    [first[i].prompt for i in ids],
                    [first[i].context for i in ids],
                    [first[i].category for i in ids],
                    [first[i].prompt_hash for i in ids],
                ),
            ).fetchall()
        inserted = {row["item_id"] for row in rows}
        ordered = [item_id for item_id in ids if item_id in inserted]
        return ordered, len(items) - len(ordered)

    def add_rejected(self, job_id: str, line: int, reason: str) -> None:
        self.add_rejected_lines(job_id, [(line, reason)])

    def add_rejected_lines(self, job_id: str, lines: Sequence[tuple[int, str]]) -> None:
        if not lines:
            return
        with self._pool.connection() as conn:
            conn.execute(
                "WITH added AS (INSERT INTO rejected_lines (job_id, line, reason) SELECT %s, u.line, u.reason"
                " FROM unnest(%s::int[], %s::text[]) AS u(line, reason) ON CONFLICT DO NOTHING RETURNING job_id) "
                + increments("added", {"rejected": "count(*)"}),
                (job_id, [line for line, _ in lines], [reason for _, reason in lines]),
            )

    def get_item(self, item_id: str) -> dict[str, Any] | None:
        return self.items_by_ids([item_id]).get(item_id)

    def items_by_ids(self, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        wanted = sorted({item_id for item_id in item_ids if is_uuid(item_id)})
        if not wanted:
            return {}
        with self._pool.connection() as conn:
            rows = conn.execute("SELECT * FROM items WHERE item_id = ANY(%s::uuid[])", (wanted,)).fetchall()
        return {str(row["item_id"]): dict(row) for row in rows}

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

    def record_outputs(self, stage: str, writes: Sequence[StageWrite]) -> set[str]:
        """Write one stage's outputs for a batch of items, each once (``WHERE <output> IS NULL``), in one
        statement; returns the items written now. An item another delivery wrote first, or that failed or was
        cancelled meanwhile, is left as it is. A write clears the item's retry state and marks it published
        (its output is forwarded next)."""
        if not writes:
            return set()
        column, tokens = OUTPUT_COLUMN[stage], TOKEN_COLUMNS[stage]
        counted = increments("written", {f"{stage}_done": "count(*)", "done": "count(*) FILTER (WHERE final)"})
        extras = _EXTRA_COLUMNS[stage]
        extra_sets = "".join(f", {name} = u.{name}" for name, _ in extras)
        extra_arrays = "".join(f", %s::{kind}[]" for _, kind in extras)
        extra_names = "".join(f", {name}" for name, _ in extras)
        rows_by_id = {write.item_id: write for write in writes if is_uuid(write.item_id)}
        ids = list(rows_by_id)
        params: list[Any] = [
            ids,
            [json.dumps(rows_by_id[i].output, ensure_ascii=False) for i in ids],
            [rows_by_id[i].tokens_in for i in ids],
            [rows_by_id[i].tokens_out for i in ids],
            [rows_by_id[i].final for i in ids],
            *([rows_by_id[i].extra.get(name) for i in ids] for name, _ in extras),
            STATUS_AFTER[stage],
        ]
        with self._pool.connection() as conn:
            rows = conn.execute(
                f"WITH written AS (UPDATE items AS i SET {column} = u.output::jsonb, {column}_at = now(),"
                f" {tokens}_in = u.tokens_in, {tokens}_out = u.tokens_out{extra_sets},"
                " status = CASE WHEN u.final THEN 'done' ELSE %s END,"
                " finished_at = CASE WHEN u.final THEN now() ELSE i.finished_at END,"
                " attempts = 0, retry_at = NULL, last_error = NULL, published_at = now()"
                f" FROM unnest(%s::uuid[], %s::text[], %s::int[], %s::int[], %s::boolean[]{extra_arrays})"
                f" AS u(item_id, output, tokens_in, tokens_out, final{extra_names})"
                f" WHERE i.item_id = u.item_id AND i.{column} IS NULL AND i.status NOT IN ('failed', 'cancelled')"
                " RETURNING i.item_id, i.job_id, u.tokens_in, u.tokens_out, u.final),"
                f" counted AS ({counted}),"
                # What the stage spent counts against the team's daily usage, in the same statement.
                " usage AS (INSERT INTO team_usage (team_id, day, role, tokens_in, tokens_out)"
                "  SELECT j.team_id, (now() AT TIME ZONE 'UTC')::date, %s, sum(w.tokens_in), sum(w.tokens_out)"
                "  FROM written w JOIN jobs j ON j.job_id = w.job_id WHERE j.team_id IS NOT NULL GROUP BY j.team_id"
                "  ON CONFLICT (team_id, day, role) DO UPDATE SET"
                "  tokens_in = team_usage.tokens_in + excluded.tokens_in,"
                "  tokens_out = team_usage.tokens_out + excluded.tokens_out)"
                " SELECT item_id::text FROM written",
                [params[-1], *params[:-1], USAGE_ROLE[stage]],
            ).fetchall()
        return {row["item_id"] for row in rows}

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
        extra = {"cache_hit": cache_hit, "fallback_reason": fallback_reason}
        write = StageWrite(item_id, rewrite, tokens_in, tokens_out, final, extra)
        return bool(self.record_outputs("rewrite", [write]))

    def record_answers(
        self, item_id: str, answers: dict[str, Any], *, tokens_in: int, tokens_out: int, final: bool
    ) -> bool:
        return bool(self.record_outputs("generate", [StageWrite(item_id, answers, tokens_in, tokens_out, final)]))

    def record_verdict(
        self, item_id: str, verdict: dict[str, Any], *, winner: str, tokens_in: int, tokens_out: int
    ) -> bool:
        write = StageWrite(item_id, verdict, tokens_in, tokens_out, True, {"winner": winner})
        return bool(self.record_outputs("judge", [write]))

    def mark_failed(self, item_id: str, stage: str, reason: str) -> bool:
        return bool(self.fail_items(stage, [(item_id, reason)]))

    def fail_items(self, stage: str, failures: Sequence[tuple[str, str]]) -> set[str]:
        """Fail unfinished items for good, each with its reason; returns those failed now."""
        pairs = [(item_id, reason) for item_id, reason in failures if is_uuid(item_id)]
        if not pairs:
            return set()
        with self._pool.connection() as conn:
            rows = conn.execute(
                "WITH failed AS (UPDATE items AS i SET status = 'failed', failed_stage = %s, error = u.reason,"
                " finished_at = now(), retry_at = NULL FROM unnest(%s::uuid[], %s::text[]) AS u(item_id, reason)"
                " WHERE i.item_id = u.item_id AND i.status = ANY(%s) RETURNING i.item_id, i.job_id),"
                f" counted AS ({increments('failed', _failed_counts(stage))})"
                " SELECT item_id::text FROM failed",
                (stage, [p[0] for p in pairs], [p[1] for p in pairs], list(UNFINISHED)),
            ).fetchall()
        return {row["item_id"] for row in rows}

    def park_items(self, stage: str, failures: Sequence[tuple[str, str]], policy: RetryPolicy) -> Parked:
        """Items whose stage hit a transient error wait until ``retry_at`` (exponential back-off); an item on
        its last attempt fails instead, with the reason. The sweep re-publishes parked items when they are due."""
        pairs = [(item_id, reason) for item_id, reason in failures if is_uuid(item_id)]
        if not pairs:
            return Parked([], [])
        with self._pool.connection() as conn:
            rows = conn.execute(
                "WITH parked AS (UPDATE items AS i SET attempts = i.attempts + 1, last_error = u.reason,"
                " retry_at = CASE WHEN i.attempts + 1 >= %(max)s THEN NULL"
                "  ELSE now() + make_interval(secs => least(%(cap)s, %(base)s * power(2, i.attempts))) END,"
                " status = CASE WHEN i.attempts + 1 >= %(max)s THEN 'failed' ELSE i.status END,"
                " failed_stage = CASE WHEN i.attempts + 1 >= %(max)s THEN %(stage)s ELSE i.failed_stage END,"
                " error = CASE WHEN i.attempts + 1 >= %(max)s"
                "  THEN 'gave up after ' || (i.attempts + 1) || ' attempts: ' || u.reason ELSE i.error END,"
                " finished_at = CASE WHEN i.attempts + 1 >= %(max)s THEN now() ELSE i.finished_at END"
                " FROM unnest(%(ids)s::uuid[], %(reasons)s::text[]) AS u(item_id, reason)"
                " WHERE i.item_id = u.item_id AND i.status = ANY(%(unfinished)s)"
                " RETURNING i.item_id, i.job_id, i.status),"
                " gave_up AS (SELECT job_id FROM parked WHERE status = 'failed'),"
                f" counted AS ({increments('gave_up', _failed_counts(stage))})"
                " SELECT item_id::text, status FROM parked",
                {
                    "max": policy.max_attempts,
                    "cap": policy.max_delay_s,
                    "base": policy.base_delay_s,
                    "stage": stage,
                    "ids": [p[0] for p in pairs],
                    "reasons": [p[1] for p in pairs],
                    "unfinished": list(UNFINISHED),
                },
            ).fetchall()
        return Parked(
            parked=[row["item_id"] for row in rows if row["status"] != "failed"],
            gave_up=[row["item_id"] for row in rows if row["status"] == "failed"],
        )

    def defer_items(self, item_ids: Sequence[str], until: datetime, reason: str) -> None:
        """Hold items until ``until`` without counting an attempt (their team's quota is used up for the day)."""
        wanted = [item_id for item_id in item_ids if is_uuid(item_id)]
        if not wanted:
            return
        with self._pool.connection() as conn:
            conn.execute(
                "UPDATE items SET retry_at = %s, last_error = %s WHERE item_id = ANY(%s::uuid[]) AND status = ANY(%s)",
                (until, reason, wanted, list(UNFINISHED)),
            )

    def claim_due_items(self, idle_s: float, limit: int, cutoff: datetime) -> list[ResumeItem]:
        """Unfinished items of running jobs to hand to their next stage again: parked items whose time has come,
        items never published, and items published before ``min(now - idle_s, cutoff)`` and not done since, of a
        job that has counted no progress for ``idle_s`` either (their message was lost; a job still moving has
        its messages queued, and they are left where they are). Claimed items are marked published now, so
        concurrent sweeps (several jobs replicas) take different ones and a pass never claims its own items
        twice; each comes with the stage it needs next and why it was due (``ResumeItem.reason``: parked,
        unpublished or idle)."""
        with self._pool.connection() as conn:
            rows = conn.execute(
                "WITH parked AS ("
                "  SELECT i.item_id, 'parked' AS reason FROM items i"
                "  JOIN jobs j ON j.job_id = i.job_id AND j.state = 'running'"
                "  WHERE i.retry_at IS NOT NULL AND i.retry_at <= now() AND i.status = ANY(%(unfinished)s)"
                "  ORDER BY i.retry_at LIMIT %(limit)s FOR UPDATE OF i SKIP LOCKED),"
                " idle AS ("
                "  SELECT i.item_id, CASE WHEN i.published_at IS NULL THEN 'unpublished' ELSE 'idle' END AS reason"
                "  FROM items i JOIN jobs j ON j.job_id = i.job_id AND j.state = 'running'"
                "  WHERE i.retry_at IS NULL AND i.status = ANY(%(unfinished)s) AND (i.published_at IS NULL"
                "  OR (i.published_at < least(now() - make_interval(secs => %(idle)s), %(cutoff)s)"
                "  AND NOT EXISTS (SELECT 1 FROM job_progress p WHERE p.job_id = i.job_id"
                "  AND p.recorded_at > now() - make_interval(secs => %(idle)s))))"
                "  ORDER BY i.published_at NULLS FIRST, i.job_id, i.line LIMIT %(limit)s FOR UPDATE OF i SKIP LOCKED),"
                " due AS (SELECT * FROM parked UNION ALL SELECT * FROM idle)"
                " UPDATE items SET published_at = now(), retry_at = NULL FROM due"
                " WHERE items.item_id = due.item_id RETURNING items.*, due.reason AS due_reason",
                {"unfinished": list(UNFINISHED), "idle": idle_s, "limit": limit, "cutoff": cutoff},
            ).fetchall()
            jobs = self._stages_of(conn, {str(row["job_id"]) for row in rows})
        resumed = []
        for row in rows:
            stage = next_stage_of(row["status"], jobs.get(str(row["job_id"]), ()))
            if stage is not None:
                item = dict(row)
                reason = item.pop("due_reason")
                resumed.append(ResumeItem(item, stage, reason))
        return resumed

    def unmark_published(self, item_ids: Sequence[str]) -> None:
        """Items claimed for publishing that could not be published: the next sweep takes them again."""
        wanted = [item_id for item_id in item_ids if is_uuid(item_id)]
        if not wanted:
            return
        with self._pool.connection() as conn:
            conn.execute("UPDATE items SET published_at = NULL WHERE item_id = ANY(%s::uuid[])", (wanted,))

    @staticmethod
    def _stages_of(conn: Connection[dict[str, Any]], job_ids: set[str]) -> dict[str, tuple[str, ...]]:
        if not job_ids:
            return {}
        rows = conn.execute(
            "SELECT job_id::text, stages FROM jobs WHERE job_id = ANY(%s::uuid[])", (sorted(job_ids),)
        ).fetchall()
        return {row["job_id"]: tuple(row["stages"]) for row in rows}

    def unfinished_items(self, job: JobRow) -> Iterator[ResumeItem]:
        """Items a restart must re-publish, each with the stage that should see it next."""
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT * FROM items WHERE job_id = %s AND status = ANY(%s) ORDER BY line",
                (job.job_id, list(UNFINISHED)),
            ).fetchall()
        for row in rows:
            stage = next_stage_of(row["status"], job.stages)
            if stage is not None:
                yield ResumeItem(dict(row), stage)

    # -- progress and reports ----------------------------------------------------------------------------

    def stage_counts(self, job: JobRow) -> tuple[int, list[StageCounts], int]:
        """(items and rejected lines, each stage's counts, how many of those finished), from the counters."""
        counts = self.progress_of([job.job_id])[job.job_id]
        stages = [StageCounts(stage, counts.items, *counts.stage(stage)) for stage in ALL_STAGES if stage in job.stages]
        return counts.items + counts.rejected, stages, counts.finished

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
            every_failure = (
                "SELECT item_id::text AS item_id, source_id, line, failed_stage AS stage, error AS reason"
                " FROM items WHERE job_id = %(job)s AND status = 'failed'"
                " UNION ALL SELECT '' AS item_id, '' AS source_id, line, 'submit' AS stage, reason"
                " FROM rejected_lines WHERE job_id = %(job)s"
            )
            # Bounded whatever the job's size: the first failures, and every distinct reason counted.
            failures = conn.execute(
                f"SELECT * FROM ({every_failure}) f ORDER BY line LIMIT %(limit)s",
                {"job": job_id, "limit": MAX_REPORTED_FAILURES},
            ).fetchall()
            reasons = conn.execute(
                f"SELECT stage, reason, count(*) AS count, (array_agg(line ORDER BY line))[1:%(sample)s] AS lines"
                f" FROM ({every_failure}) f GROUP BY stage, reason ORDER BY count(*) DESC, min(line)"
                " LIMIT %(limit)s",
                {"job": job_id, "sample": FAILURE_SAMPLE_LINES, "limit": MAX_FAILURE_REASONS},
            ).fetchall()
        counts = self.progress_of([job_id])[job_id]
        return {
            "totals": totals,
            "categories": categories,
            "failures": failures,
            "failure_reasons": reasons,
            "failed": counts.failed + counts.rejected,
            "rejected": counts.rejected,
        }
