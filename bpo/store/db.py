"""Connection pool and versioned migrations, applied at start under an advisory lock."""

from __future__ import annotations

import logging
from importlib import resources

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)
# Any fixed number shared by every process of the platform: only one of them migrates at a time.
_MIGRATION_LOCK = 0x62706F  # "bpo"


def open_pool(url: str, *, min_size: int = 1, max_size: int = 8) -> ConnectionPool[Connection[dict[str, object]]]:
    pool: ConnectionPool[Connection[dict[str, object]]] = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs={"row_factory": dict_row, "autocommit": False},
        open=True,
        name="bpo",
    )
    pool.wait(timeout=30)
    return pool


def migration_scripts() -> list[tuple[int, str, str]]:
    folder = resources.files("bpo.store").joinpath("migrations")
    scripts = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            scripts.append((version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(scripts)


def migrate(pool: ConnectionPool[Connection[dict[str, object]]]) -> list[str]:
    """Apply every migration not yet recorded; returns the names applied now."""
    applied_now: list[str] = []
    with pool.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in conn.execute("SELECT version FROM schema_migrations").fetchall()}
        for version, name, sql in migration_scripts():
            if version in done:
                continue
            log.info("applying migration %s", name)
            conn.execute(sql.encode())
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
            applied_now.append(name)
    return applied_now
