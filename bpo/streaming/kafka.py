"""Kafka plumbing shared by every pipeline stage: settings, topics, a durable producer, a consumer.

kafka-python is the only Kafka client; it ships no type information, so it is imported here alone and the
rest of the platform sees the narrow, typed surface below (``Producer``, ``Consumer``, ``publish``).

Topic names: the platform's topics have short names (``Topics``) that ``KafkaSettings.topic`` prefixes, so
several platforms (or test runs) can share one cluster. Everything else (``ensure_topics``, ``publish``,
``StageLoop``) takes full topic names, built in one place with ``settings.topic(Topics.PROMPTS)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer  # type: ignore[import-untyped]
from kafka.errors import (  # type: ignore[import-untyped]
    KafkaError,
    MessageSizeTooLargeError,
    TopicAlreadyExistsError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition  # type: ignore[import-untyped]
from pydantic import BaseModel, Field

from bpo.errors import BpoError

__all__ = [
    "PLATFORM_TOPICS",
    "Consumer",
    "ConsumerRecord",
    "InboundMessage",
    "KafkaSettings",
    "MessageFailure",
    "OutboundMessage",
    "Producer",
    "PublishError",
    "PublishedRecord",
    "Topics",
    "commit_offsets",
    "ensure_topics",
    "make_consumer",
    "make_producer",
    "publish",
    "publish_many",
    "topic_partition",
]

log = logging.getLogger(__name__)


class Topics:
    PROMPTS = "prompts"
    REWRITES = "rewrites"
    ANSWERS = "answers"
    VERDICTS = "verdicts"
    DEAD_LETTER = "deadletter"


PLATFORM_TOPICS = (Topics.PROMPTS, Topics.REWRITES, Topics.ANSWERS, Topics.VERDICTS, Topics.DEAD_LETTER)


class KafkaSettings(BaseModel):
    """How stages reach Kafka, and how a stage backs off while a dependency is down."""

    bootstrap_servers: str
    topic_prefix: str = "bpo"
    session_timeout_ms: int = Field(default=10000, ge=1000)
    heartbeat_interval_ms: int = Field(default=3000, ge=100)
    # A batch must be processed within this, or the group hands its partitions to another member: it must
    # exceed the stages' batch deadline (the runtime derives it from that).
    max_poll_interval_ms: int = Field(default=300000, ge=1000)
    max_poll_records: int = Field(default=8, ge=1)
    poll_timeout_ms: int = Field(default=1000, ge=0)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    publish_timeout_s: float = Field(default=30.0, gt=0)
    # The largest message a producer sends: what the brokers accept (Kafka's message.max.bytes, 1 MiB by
    # default). Larger items are refused at submission, so no hop ever carries more.
    max_message_bytes: int = Field(default=1_048_576, ge=1024)
    partitions: int = Field(default=8, ge=1)

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"


class PublishError(BpoError):
    """The broker did not acknowledge a message: it may not be on the topic. ``too_large``: the message itself
    is refused (over the size limit) and would be on any retry; anything else is the broker's condition."""

    status_code = "UNAVAILABLE"

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def _publish_error(topic: str, exc: KafkaError) -> PublishError:
    return PublishError(
        f"publishing to {topic} failed: {type(exc).__name__}: {exc}",
        too_large=isinstance(exc, MessageSizeTooLargeError),
    )


@dataclass(frozen=True, slots=True)
class InboundMessage:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name`` (Kafka allows repeats), or None."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return None

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True, slots=True)
class MessageFailure:
    message: InboundMessage
    error: Exception


@dataclass(frozen=True, slots=True)
class PublishedRecord:
    topic: str
    partition: int
    offset: int


class ConsumerRecord(Protocol):
    """What the loop reads of a kafka-python ``ConsumerRecord``."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]] | None: ...


class SendFuture(Protocol):
    def get(self, timeout: float | None = None) -> Any: ...


class Producer(Protocol):
    """The part of ``kafka.KafkaProducer`` the platform uses."""

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> SendFuture: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


class Consumer(Protocol):
    """The part of ``kafka.KafkaConsumer`` the loop uses. Partitions are kafka-python ``TopicPartition``s."""

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> Mapping[Any, Sequence[ConsumerRecord]]: ...

    def commit(self, offsets: Mapping[Any, Any] | None = None) -> None: ...

    def seek(self, partition: Any, offset: int) -> None: ...

    def pause(self, *partitions: Any) -> None: ...

    def resume(self, *partitions: Any) -> None: ...

    def assignment(self) -> set[Any]: ...

    def highwater(self, partition: Any) -> int | None: ...

    def position(self, partition: Any, timeout_ms: int | None = None) -> int | None: ...

    def close(self, autocommit: bool = True) -> None: ...


def make_producer(settings: KafkaSettings, *, client_id: str = "bpo") -> Producer:
    """A producer whose acknowledged messages are on every in-sync replica.

    Not idempotent: the local broker (Tansu) forgets producer ids on restart, after which an idempotent
    kafka-python producer fails until it is recreated. Without idempotence a retried send can duplicate a
    message, which the at-least-once stages tolerate anyway. One request in flight keeps retries in order.
    """
    producer: Producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=False,
        retries=5,
        retry_backoff_ms=200,
        max_in_flight_requests_per_connection=1,
        request_timeout_ms=10000,
        delivery_timeout_ms=int(settings.publish_timeout_s * 1000),
        linger_ms=5,
        max_request_size=settings.max_message_bytes,
    )
    return producer


def publish(
    producer: Producer,
    topic: str,
    key: str | None,
    value: bytes,
    headers: Sequence[tuple[str, bytes]] = (),
    *,
    timeout_s: float = 30.0,
) -> PublishedRecord:
    """Send one message and wait for the broker's acknowledgement, so the caller knows it is on the topic."""
    try:
        future = producer.send(
            topic, value=value, key=key.encode() if key is not None else None, headers=list(headers) or None
        )
        metadata = future.get(timeout=timeout_s)
    except KafkaError as exc:
        raise _publish_error(topic, exc) from exc
    return PublishedRecord(topic=str(metadata.topic), partition=int(metadata.partition), offset=int(metadata.offset))


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    topic: str
    key: str | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def publish_many(
    producer: Producer, messages: Sequence[OutboundMessage], *, timeout_s: float = 30.0
) -> list[PublishedRecord | PublishError]:
    """Send every message, then wait once for all acknowledgements (one round trip for a batch, not one per
    message). Per message: where it landed, or why it was refused (a message over the size limit is refused
    alone; the caller decides what that means for its item)."""
    futures: list[SendFuture | PublishError] = []
    for message in messages:
        try:
            futures.append(
                producer.send(
                    message.topic,
                    value=message.value,
                    key=message.key.encode() if message.key is not None else None,
                    headers=list(message.headers) or None,
                )
            )
        except KafkaError as exc:
            futures.append(_publish_error(message.topic, exc))
    results: list[PublishedRecord | PublishError] = []
    for message, future in zip(messages, futures, strict=True):
        if isinstance(future, PublishError):
            results.append(future)
            continue
        try:
            metadata = future.get(timeout=timeout_s)
        except KafkaError as exc:
            results.append(_publish_error(message.topic, exc))
            continue
        results.append(PublishedRecord(str(metadata.topic), int(metadata.partition), int(metadata.offset)))
    return results


def make_consumer(settings: KafkaSettings, group_id: str, topics: Sequence[str], *, client_id: str) -> Consumer:
    """A group member on full topic names that commits only when told to and starts new groups at the beginning."""
    consumer: Consumer = KafkaConsumer(
        *topics,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        max_poll_records=settings.max_poll_records,
    )
    return consumer


def commit_offsets(consumer: Consumer, offsets: Mapping[tuple[str, int], int]) -> None:
    """Commit ``{(topic, partition): next offset to read}`` for the consumer's group, synchronously."""
    consumer.commit(
        {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
            for (topic, partition), offset in offsets.items()
        }
    )


def topic_partition(topic: str, partition: int) -> Any:
    """kafka-python's key for a partition, as ``Consumer`` methods take it."""
    return TopicPartition(topic, partition)


def ensure_topics(
    settings: KafkaSettings, topics: Iterable[str], partitions: int = 4, *, replication_factor: int = -1
) -> list[str]:
    """Create those of ``topics`` (full names) that do not exist yet; returns them all, sorted.

    Safe to call from every process at start: a topic created meanwhile by another process is not an error.
    A replication factor of -1 takes the cluster's default (1 on the embedded broker); existing topics are
    left as they are, whatever their partition count.
    """
    wanted = sorted(set(topics))
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, client_id="bpo-admin")
    try:
        missing = [topic for topic in wanted if topic not in set(admin.list_topics())]
        if missing:
            log.info("creating topics %s with %d partitions", ", ".join(missing), partitions)
            response = admin.create_topics(
                {topic: {"num_partitions": partitions, "replication_factor": replication_factor} for topic in missing},
                raise_errors=False,
            )
            for result in response["topics"]:
                code = int(result["error_code"])
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise BpoError(f"cannot create topic {result['name']}: error {code} {result.get('error_message')}")
    finally:
        admin.close()
    return wanted
