"""Each job's progress as counters (migration 0007): what GetJob and WatchJob read instead of counting items.

Every statement that changes items also inserts a row of increments for their jobs (``increments``); nothing
updates a counter in place, so stages never wait on each other for it. Reading sums a job's rows; the sweep
folds them into one row per job (``fold_progress``) so that a sum stays a handful of rows however long a job
runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import Connection
from psycopg_pool import ConnectionPool

from bpo.messages import ALL_STAGES

COUNTERS = (
    "items", "rejected", "rewrite_done", "rewrite_failed", "generate_done", "generate_failed", "judge_done",
    "judge_failed", "done", "failed", "cancelled",
)  # fmt: skip
# A job's rows are folded into one once there are more than this many.
FOLD_ABOVE = 32


def increments(source: str, counts: Mapping[str, str]) -> str:
    """A CTE body inserting, per job in ``source`` (a CTE with a ``job_id`` column), one row of increments:
    ``counts`` maps a counter to the SQL aggregate over ``source`` that it grows by."""
    unknown = set(counts) - set(COUNTERS)
    if unknown:
        raise ValueError(f"unknown progress counters: {sorted(unknown)}")
    names = ", ".join(counts)
    values = ", ".join(counts.values())
    return f"INSERT INTO job_progress (job_id, {names}) SELECT job_id, {values} FROM {source} GROUP BY job_id"


@dataclass(frozen=True, slots=True)
class JobProgressCounts:
    items: int = 0
    rejected: int = 0
    rewrite_done: int = 0
    rewrite_failed: int = 0
    generate_done: int = 0
    generate_failed: int = 0
    judge_done: int = 0
    judge_failed: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0

    def stage(self, stage: str) -> tuple[int, int]:
        """(done, failed) of one stage."""
        if stage not in ALL_STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        values: dict[str, int] = {name: getattr(self, name) for name in COUNTERS}
        return values[f"{stage}_done"], values[f"{stage}_failed"]

    @property
    def finished(self) -> int:
        """Items that will not change any more, and rejected lines."""
        return self.done + self.failed + self.cancelled + self.rejected


class ProgressTables:
    _pool: ConnectionPool[Connection[dict[str, Any]]]

    def progress_of(self, job_ids: Sequence[str]) -> dict[str, JobProgressCounts]:
        """Each job's counters (a job nothing was counted for yet has all zeros)."""
        wanted = sorted(set(job_ids))
        if not wanted:
            return {}
        sums = ", ".join(f"sum({name})::bigint AS {name}" for name in COUNTERS)
        with self._pool.connection() as conn:
            rows = conn.execute(
                f"SELECT job_id::text AS job_id, {sums} FROM job_progress WHERE job_id = ANY(%s::uuid[])"
                " GROUP BY job_id",
                (wanted,),
            ).fetchall()
        found = {row["job_id"]: JobProgressCounts(**{name: int(row[name]) for name in COUNTERS}) for row in rows}
        return {job_id: found.get(job_id, JobProgressCounts()) for job_id in wanted}

    def fold_progress(self, limit: int = 1000) -> int:
        """Fold the rows of up to ``limit`` jobs that have many into one row each, recorded when the newest of
        them was; returns the jobs folded. Rows inserted while this runs are not deleted, so they keep counting."""
        sums = ", ".join(f"sum({name})" for name in COUNTERS)
        with self._pool.connection() as conn:
            rows = conn.execute(
                "WITH crowded AS (SELECT job_id FROM job_progress GROUP BY job_id HAVING count(*) > %s LIMIT %s),"
                " gone AS (DELETE FROM job_progress p USING crowded c WHERE p.job_id = c.job_id RETURNING p.*),"
                f" folded AS (INSERT INTO job_progress (job_id, {', '.join(COUNTERS)}, recorded_at)"
                f"  SELECT job_id, {sums}, max(recorded_at) FROM gone GROUP BY job_id RETURNING job_id)"
                " SELECT count(*) AS n FROM folded",
                (FOLD_ABOVE, limit),
            ).fetchall()
        return int(rows[0]["n"]) if rows else 0
