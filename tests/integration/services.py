"""The PostgreSQL and Redis servers the integration tests talk to: the configured ones, otherwise embedded ones
started for the test session, exactly as ``bpo up`` starts its own. A test never skips for want of a server.

    BPO_TEST_POSTGRES_URL   an admin URL of a server to use (tests create and drop their own databases on it)
    BPO_TEST_REDIS_URL      a Redis server to use (tests take their own database numbers on it)

A configured server that does not answer fails the session at once: it was asked for, so its absence is an
error, not a reason to fall back.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis

from bpo.infra.postgres import EmbeddedPostgres, postgres_reachable
from bpo.infra.process import free_port
from bpo.infra.redis import EmbeddedRedis, redis_reachable

POSTGRES_ENV = "BPO_TEST_POSTGRES_URL"
REDIS_ENV = "BPO_TEST_REDIS_URL"


@contextmanager
def postgres_server(work_dir: Path) -> Iterator[str]:
    """An admin URL (database ``postgres``) of the configured server, or of an embedded one started now."""
    configured = os.environ.get(POSTGRES_ENV, "")
    if configured:
        if not postgres_reachable(configured):
            pytest.fail(f"{POSTGRES_ENV}={configured} does not answer")
        yield configured
        return
    server = EmbeddedPostgres(work_dir / "postgres", free_port(), database="postgres")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        # The cluster belongs to this session alone (as root it lives under /var/tmp, where nothing cleans it).
        shutil.rmtree(server.service_dir, ignore_errors=True)


@contextmanager
def redis_server(work_dir: Path) -> Iterator[str]:
    """The URL of the configured Redis, or of an embedded one started now (database 0; tests pick others)."""
    configured = os.environ.get(REDIS_ENV, "")
    if configured:
        if not redis_reachable(configured):
            pytest.fail(f"{REDIS_ENV}={configured} does not answer")
        yield configured
        return
    with EmbeddedRedis(work_dir / "redis", free_port()) as server:
        yield server.url


def redis_database(server_url: str, number: int) -> str:
    """The same server, database ``number``, emptied: tests that share a server keep out of each other's keys."""
    url = server_url.rsplit("/", 1)[0] + f"/{number}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@contextmanager
def fresh_database(admin_url: str, prefix: str) -> Iterator[str]:
    """Create ``<prefix>_<random>`` on the server, yield its URL, drop it (forcing out any connection left)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
