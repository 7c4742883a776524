"""Trained optimizer versions and the aliases that point at them (tables of migration 0001)."""

from __future__ import annotations

from typing import Any

from psycopg import Connection
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool


class RegistryTables:
    _pool: ConnectionPool[Connection[dict[str, Any]]]

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
