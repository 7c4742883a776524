"""Preference records and the prompt pairs built from them (tables of migration 0002).

Both writes are idempotent: record ids are uuid5 of (dataset, the record's own id or content hash) and pair ids
uuid5 of (record, constructor model, prompt version), inserted with ``ON CONFLICT DO NOTHING``. A re-import or a
re-run of a construction therefore adds only what is missing and never changes a stored decision.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar

from psycopg.types.json import Jsonb

from bpo.pairs.records import PreferenceRecord
from bpo.store.repository import Pool

T = TypeVar("T")
# Rows per transaction: large enough to amortise commits, small enough that an interrupted import keeps most
# of its work.
CHUNK = 500


def pair_id_for(record_id: str, constructor_model: str, prompt_version: str) -> str:
    return str(uuid.uuid5(uuid.UUID(record_id), f"{constructor_model}\x00{prompt_version}"))


@dataclass(frozen=True, slots=True)
class StoredRecord:
    record_id: str
    dataset: str
    source: str
    licence: str
    external_id: str
    instruction: str
    context: str | None
    chosen: str
    rejected: str
    extra: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PairRow:
    """One decision about one record, as ``prompt_pairs`` stores it."""

    record_id: str
    dataset: str
    constructor_model: str
    prompt_version: str
    decision: str
    x_user: str
    x_opt: str | None = None
    comparison: str | None = None
    raw_output: str | None = None

    @property
    def pair_id(self) -> str:
        return pair_id_for(self.record_id, self.constructor_model, self.prompt_version)


@dataclass(frozen=True, slots=True)
class KeptPair:
    """A training pair: the optimizer learns to write ``x_opt`` given ``x_user``."""

    pair_id: str
    record_id: str
    dataset: str
    source: str
    licence: str
    constructor_model: str
    prompt_version: str
    x_user: str
    x_opt: str


@dataclass(frozen=True, slots=True)
class RecordCount:
    dataset: str
    source: str
    origin: str
    licence: str
    records: int


@dataclass(frozen=True, slots=True)
class DecisionCount:
    dataset: str
    source: str
    origin: str
    constructor_model: str
    prompt_version: str
    decision: str
    pairs: int


def _chunks(items: Iterable[T], size: int) -> Iterator[Sequence[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


class PairsStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    def _insert_each(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> int:
        """Run an ``INSERT ... ON CONFLICT DO NOTHING`` per row, a transaction per chunk; returns rows inserted."""
        inserted = 0
        for chunk in _chunks(rows, CHUNK):
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                for values in chunk:
                    cur.execute(sql, values)
                    inserted += cur.rowcount
        return inserted

    # -- preference records ------------------------------------------------------------------------------

    def add_records(self, records: Sequence[PreferenceRecord]) -> int:
        """Insert records; returns how many were new (the rest were there from an earlier import)."""
        return self._insert_each(
            "INSERT INTO preference_records (record_id, dataset, source, licence, external_id,"
            " instruction, context, chosen, rejected, extra)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            ((r.record_id, r.dataset, r.source, r.licence, r.external_id, r.instruction, r.context, r.chosen,
              r.rejected, Jsonb(dict(r.extra))) for r in records),
        )  # fmt: skip

    def records_with_decisions(
        self, dataset: str, constructor_model: str, prompt_version: str
    ) -> list[tuple[StoredRecord, str | None]]:
        """Every record of ``dataset`` in its construction order, with its decision for this constructor and
        prompt version (None when undecided).

        The order is fixed (import time, then position in the file, then id): the self-BLEU filter keeps the
        first of two similar instructions, so which one that is must not change between runs."""
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT r.*, p.decision FROM preference_records r"
                " LEFT JOIN prompt_pairs p ON p.record_id = r.record_id"
                "  AND p.constructor_model = %s AND p.prompt_version = %s"
                " WHERE r.dataset = %s"
                " ORDER BY r.imported_at, (r.extra->>'position')::bigint NULLS LAST, r.external_id, r.record_id",
                (constructor_model, prompt_version, dataset),
            ).fetchall()
        return [(_stored_record(row), row["decision"]) for row in rows]

    def datasets(self) -> list[str]:
        with self._pool.connection() as conn:
            return [r["dataset"] for r in conn.execute("SELECT DISTINCT dataset FROM preference_records ORDER BY 1")]

    # -- prompt pairs ------------------------------------------------------------------------------------

    def add_pairs(self, pairs: Sequence[PairRow]) -> int:
        """Store decisions; one already stored for the same (record, constructor, prompt version) is kept."""
        return self._insert_each(
            "INSERT INTO prompt_pairs (pair_id, record_id, dataset, constructor_model, prompt_version,"
            " decision, x_user, x_opt, comparison, raw_output)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            ((p.pair_id, p.record_id, p.dataset, p.constructor_model, p.prompt_version, p.decision, p.x_user,
              p.x_opt, p.comparison, p.raw_output) for p in pairs),
        )  # fmt: skip

    def pair(self, record_id: str, constructor_model: str, prompt_version: str) -> PairRow | None:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT * FROM prompt_pairs WHERE pair_id = %s",
                (pair_id_for(record_id, constructor_model, prompt_version),),
            ).fetchone()
        if row is None:
            return None
        return PairRow(
            record_id=str(row["record_id"]),
            dataset=row["dataset"],
            constructor_model=row["constructor_model"],
            prompt_version=row["prompt_version"],
            decision=row["decision"],
            x_user=row["x_user"],
            x_opt=row["x_opt"],
            comparison=row["comparison"],
            raw_output=row["raw_output"],
        )

    def kept_pairs(
        self,
        datasets: Sequence[str],
        *,
        constructor_model: str | None = None,
        prompt_version: str | None = None,
    ) -> list[KeptPair]:
        """The kept pairs of ``datasets`` (optionally of one constructor model and prompt version), ordered by
        dataset and pair id: the same selection always yields the same list in the same order."""
        if not datasets:
            return []
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT p.pair_id, p.record_id, p.dataset, r.source, r.licence, p.constructor_model,"
                " p.prompt_version, p.x_user, p.x_opt"
                " FROM prompt_pairs p JOIN preference_records r ON r.record_id = p.record_id"
                " WHERE p.decision = 'kept' AND p.x_opt IS NOT NULL AND p.dataset = ANY(%s)"
                " AND (%s::text IS NULL OR p.constructor_model = %s)"
                " AND (%s::text IS NULL OR p.prompt_version = %s)"
                " ORDER BY p.dataset, p.pair_id",
                (list(datasets), constructor_model, constructor_model, prompt_version, prompt_version),
            ).fetchall()
        return [
            KeptPair(
                pair_id=str(row["pair_id"]),
                record_id=str(row["record_id"]),
                dataset=row["dataset"],
                source=row["source"],
                licence=row["licence"],
                constructor_model=row["constructor_model"],
                prompt_version=row["prompt_version"],
                x_user=row["x_user"],
                x_opt=row["x_opt"],
            )
            for row in rows
        ]

    # -- statistics --------------------------------------------------------------------------------------

    def record_counts(self, dataset: str | None = None) -> list[RecordCount]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT dataset, source, coalesce(extra->>'origin', '') AS origin, licence, count(*) AS n"
                " FROM preference_records WHERE (%s::text IS NULL OR dataset = %s)"
                " GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
                (dataset, dataset),
            ).fetchall()
        return [RecordCount(r["dataset"], r["source"], r["origin"], r["licence"], int(r["n"])) for r in rows]

    def decision_counts(self, dataset: str | None = None) -> list[DecisionCount]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT p.dataset, r.source, coalesce(r.extra->>'origin', '') AS origin, p.constructor_model,"
                " p.prompt_version, p.decision, count(*) AS n"
                " FROM prompt_pairs p JOIN preference_records r ON r.record_id = p.record_id"
                " WHERE (%s::text IS NULL OR p.dataset = %s)"
                " GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6",
                (dataset, dataset),
            ).fetchall()
        return [
            DecisionCount(r["dataset"], r["source"], r["origin"], r["constructor_model"], r["prompt_version"],
                          r["decision"], int(r["n"]))
            for r in rows
        ]  # fmt: skip

    def kept_texts(self, dataset: str | None = None) -> list[tuple[str, str, str, str, str]]:
        """(dataset, constructor model, prompt version, x_user, x_opt) of every kept pair, for distinct-n."""
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT dataset, constructor_model, prompt_version, x_user, x_opt FROM prompt_pairs"
                " WHERE decision = 'kept' AND x_opt IS NOT NULL AND (%s::text IS NULL OR dataset = %s)"
                " ORDER BY dataset, pair_id",
                (dataset, dataset),
            ).fetchall()
        return [(r["dataset"], r["constructor_model"], r["prompt_version"], r["x_user"], r["x_opt"]) for r in rows]


def _stored_record(row: dict[str, Any]) -> StoredRecord:
    return StoredRecord(
        record_id=str(row["record_id"]),
        dataset=row["dataset"],
        source=row["source"],
        licence=row["licence"],
        external_id=row["external_id"],
        instruction=row["instruction"],
        context=row["context"],
        chosen=row["chosen"],
        rejected=row["rejected"],
        extra=dict(row["extra"] or {}),
    )
