"""The rewrite cache and the greedy completion cache (tables of migrations 0001 and 0003)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from psycopg import Connection
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from bpo.engines.base import Completion


class CacheTables:
    _pool: ConnectionPool[Connection[dict[str, Any]]]

    # -- rewrite cache -----------------------------------------------------------------------------------

    def cached_rewrite(self, prompt_hash: str, model_version: str, params_hash: str) -> dict[str, Any] | None:
        with self._pool.connection() as conn:
            row = conn.execute(
                "UPDATE rewrite_cache SET hits = hits + 1"
                " WHERE prompt_hash = %s AND model_version = %s AND params_hash = %s RETURNING rewrite",
                (prompt_hash, model_version, params_hash),
            ).fetchone()
        return row["rewrite"] if row is not None else None

    def cached_rewrites(self, prompt_hashes: Sequence[str], model_version: str, params_hash: str) -> dict[str, Any]:
        """The cached rewrites of a batch of prompts, by prompt hash, in one statement."""
        if not prompt_hashes:
            return {}
        with self._pool.connection() as conn:
            rows = conn.execute(
                "UPDATE rewrite_cache SET hits = hits + 1"
                " WHERE prompt_hash = ANY(%s) AND model_version = %s AND params_hash = %s"
                " RETURNING prompt_hash, rewrite",
                (sorted(set(prompt_hashes)), model_version, params_hash),
            ).fetchall()
        return {row["prompt_hash"]: row["rewrite"] for row in rows}

    def cache_rewrites(self, model_version: str, params_hash: str, entries: Mapping[str, dict[str, Any]]) -> None:
        """File a batch of rewrites under the version that produced them, in one statement."""
        if not entries:
            return
        keys = sorted(entries)
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO rewrite_cache (prompt_hash, model_version, params_hash, rewrite)"
                " SELECT u.prompt_hash, %s, %s, u.rewrite::jsonb FROM unnest(%s::text[], %s::text[])"
                " AS u(prompt_hash, rewrite) ON CONFLICT DO NOTHING",
                (model_version, params_hash, keys, [json.dumps(entries[k], ensure_ascii=False) for k in keys]),
            )

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
