"""Kafka streaming for the pipeline stages: settings, topics, a durable producer and the one stage loop."""

from bpo.streaming.kafka import (
    PLATFORM_TOPICS,
    InboundMessage,
    KafkaSettings,
    MessageFailure,
    PublishedRecord,
    PublishError,
    Topics,
    ensure_topics,
    make_producer,
    publish,
)
from bpo.streaming.loop import DEAD_LETTER_HEADERS, StageLoop, install_signal_handlers

__all__ = [
    "DEAD_LETTER_HEADERS",
    "PLATFORM_TOPICS",
    "InboundMessage",
    "KafkaSettings",
    "MessageFailure",
    "PublishError",
    "PublishedRecord",
    "StageLoop",
    "Topics",
    "ensure_topics",
    "install_signal_handlers",
    "make_producer",
    "publish",
]
