"""Connection pool and versioned migrations, applied at start under an advisory lock.

Whoever starts first must not query tables that do not exist yet: the services and ``bpo up`` migrate before
anything else, and a process that only reads (an optimizer worker) waits for the schema, bounded, instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from importlib import resources

import psycopg
from psycopg import Connection
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from bpo.errors import BpoError

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
        # A connection broken by a server restart is replaced when handed out instead of failing its user.
        check=ConnectionPool.check_connection,
        # Waiting for a connection is bounded: a stage whose database is gone fails its batch and backs off.
        timeout=30,
    )
    pool.wait(timeout=30)
    return pool


def database_ready(pool: ConnectionPool[Connection[dict[str, object]]], timeout_s: float = 3.0) -> bool:
    """Whether the database answers now (for health checks; never raises)."""
    try:
        with pool.connection(timeout=timeout_s) as conn:
            conn.execute("SELECT 1")
    except Exception:
        return False
    return True


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


def migrate_database(url: str) -> list[str]:
    """Apply every pending migration to the database at ``url`` (one short-lived connection)."""
    pool = open_pool(url, min_size=1, max_size=1)
    try:
        return migrate(pool)
    finally:
        pool.close()


class SchemaNotReadyError(BpoError):
    """The database has not been migrated to the schema this code needs (yet)."""

    status_code = "UNAVAILABLE"


def required_schema_version() -> int:
    return max(version for version, _, _ in migration_scripts())


def schema_version(url: str, *, connect_timeout_s: int = 5) -> int:
    """The newest migration applied to the database at ``url``; 0 when none is (or the database is away)."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout_s) as conn:
            exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
            if not exists or not exists[0]:
                return 0
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    except psycopg.OperationalError:
        return 0
    return int(row[0]) if row is not None else 0


def wait_for_schema(
    url: str,
    timeout_s: float,
    *,
    interval_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Wait until the database holds every migration this code knows; returns the version found.

    Migrations are applied by ``bpo up``, ``bpo migrate`` and every gRPC service at start. A process that must
    not race them waits here, says what it waits for once, and gives up after ``timeout_s`` with an error that
    says how to fix it."""
    needed = required_schema_version()
    deadline = clock() + timeout_s
    announced = False
    while True:
        found = schema_version(url)
        if found >= needed:
            if announced:
                log.info("database schema is at version %d; going on", found)
            return found
        if clock() >= deadline:
            raise SchemaNotReadyError(
                f"the database schema is at version {found}, this code needs {needed}, and it was not migrated "
                f"within {timeout_s:g}s: run `bpo migrate` (or start the jobs service, which migrates at start)"
            )
        if not announced:
            log.warning("waiting up to %gs for database migrations (schema version %d, need %d)",
                        timeout_s, found, needed)  # fmt: skip
            announced = True
        sleep(interval_s)
