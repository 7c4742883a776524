"""A throwaway database on the machine's PostgreSQL, for tests of the store and the services that use it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from bpo.infra.postgres import postgres_reachable

MACHINE_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """Create ``<prefix>_<random>``, yield its URL, drop it (forcing out any connection left behind).

    Skips the calling test when the machine has no PostgreSQL answering on 127.0.0.1:5432."""
    if not postgres_reachable(MACHINE_POSTGRES):
        pytest.skip(f"no PostgreSQL reachable at {MACHINE_POSTGRES} (trust auth expected): store tests need one")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(MACHINE_POSTGRES, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield MACHINE_POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(MACHINE_POSTGRES, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
