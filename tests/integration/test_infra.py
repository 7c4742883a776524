"""Each embedded service starts from the wheels' binaries, answers a real client, and stops cleanly."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer  # type: ignore[import-untyped]

from bpo.infra.kafka import EmbeddedKafka, kafka_reachable
from bpo.infra.postgres import EmbeddedPostgres, postgres_reachable
from bpo.infra.process import free_port
from bpo.infra.redis import EmbeddedRedis, redis_reachable

pytestmark = pytest.mark.integration


@pytest.fixture
def postgres_at(tmp_path: Path) -> Iterator[Callable[[], EmbeddedPostgres]]:
    """Makes servers on one data directory, each on a fresh port; stops them all and removes their data after."""
    made: list[EmbeddedPostgres] = []

    def make() -> EmbeddedPostgres:
        made.append(EmbeddedPostgres(tmp_path / "postgres", free_port()))
        return made[-1]

    yield make
    for server in made:
        server.stop()
    # As root the cluster lives outside pytest's private temporary root (see bpo.infra.postgres).
    for service_dir in {server.service_dir for server in made}:
        if not service_dir.is_relative_to(tmp_path):
            shutil.rmtree(service_dir, ignore_errors=True)


def rows(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM jobs ORDER BY id").fetchall()]


def test_postgres_keeps_its_data_across_a_stop_and_a_crash(postgres_at: Callable[[], EmbeddedPostgres]) -> None:
    first = postgres_at()
    url = first.start()
    assert url.startswith("postgresql://") and url.endswith("/bpo")
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.execute("CREATE TABLE jobs (id text PRIMARY KEY)")
        conn.execute("INSERT INTO jobs VALUES ('job-1')")
    first.stop()
    assert not postgres_reachable(url)
    if first.user is not None:  # running as root: the cluster belongs to the unprivileged service user
        assert first.pgdata.stat().st_uid == first.user.uid != 0

    # A clean restart (no second initdb) keeps the row.
    second = postgres_at()
    second_url = second.start()
    assert rows(second_url) == ["job-1"]
    with psycopg.connect(second_url, autocommit=True) as conn:
        conn.execute("INSERT INTO jobs VALUES ('job-2')")

    # The platform dies without stopping it; the next start stops the orphan and starts afresh.
    third = postgres_at()
    assert rows(third.start()) == ["job-1", "job-2"]
    assert not postgres_reachable(second_url)


def test_redis_answers_and_keeps_a_key_across_a_restart(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", free_port())
    url = server.start()
    try:
        client = redis.Redis.from_url(url)
        assert client.ping()
        client.set("celery-task", b"queued")
        client.close()
    finally:
        server.stop()
    assert not redis_reachable(url)

    server = EmbeddedRedis(tmp_path / "redis", server.port)
    try:
        client = redis.Redis.from_url(server.start())
        assert client.get("celery-task") == b"queued"
        client.close()
    finally:
        server.stop()


def test_tansu_carries_a_message_from_a_producer_to_a_consumer(tmp_path: Path) -> None:
    broker = EmbeddedKafka(free_port(), log_path=tmp_path / "tansu.log")
    bootstrap = broker.start()
    try:
        assert kafka_reachable(bootstrap)
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics({"infra-check": {"num_partitions": 1, "replication_factor": 1}})
        admin.close()
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
        producer.send("infra-check", key=b"k", value=b"hello").get(timeout=30)
        producer.close()
        consumer = KafkaConsumer("infra-check", bootstrap_servers=bootstrap, auto_offset_reset="earliest")
        received: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                received += [(record.key, record.value) for record in records]
        consumer.close()
        assert received == [(b"k", b"hello")]
    finally:
        broker.stop()
    assert not kafka_reachable(bootstrap)
