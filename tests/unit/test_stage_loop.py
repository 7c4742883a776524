"""StageLoop's dead-letter, pause-and-retry and commit decisions against an in-memory partition log.

The fake consumer keeps what the decisions depend on the way Kafka does: per-partition logs, a fetch
position that poll advances and seek moves, and a group's committed offsets that outlive one consumer.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from bpo.streaming import (
    DEAD_LETTER_HEADERS,
    InboundMessage,
    KafkaSettings,
    MessageFailure,
    StageLoop,
    install_signal_handlers,
)
from bpo.streaming.kafka import topic_partition

pytestmark = pytest.mark.unit

SETTINGS = KafkaSettings(bootstrap_servers="unused:9092", max_poll_records=4, retry_backoff_s=0.001)
TOPIC = SETTINGS.topic("prompts")
DLQ = SETTINGS.topic("deadletter")


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] | None


@dataclass
class Group:
    """A consumer group's committed offsets, shared by the consumers that join it one after another."""

    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    commits: list[dict[tuple[str, int], int]] = field(default_factory=list)


class FakeConsumer:
    def __init__(
        self,
        logs: Mapping[int, list[str]],
        group: Group,
        *,
        on_idle: Callable[[], None] = lambda: None,
        poll_errors: list[Exception] | None = None,
    ) -> None:
        self.logs = {(TOPIC, partition): keys for partition, keys in logs.items()}
        self.group = group
        self.positions = {tp: group.committed.get(tp, 0) for tp in self.logs}
        self.on_idle = on_idle
        self.poll_errors = poll_errors or []
        self.seeks: list[tuple[tuple[str, int], int]] = []
        self.max_records_seen: list[int | None] = []
        self.closed_with_autocommit: bool | None = None
        self.paused: set[tuple[str, int]] = set()
        self.pauses = 0
        self.revoked: set[tuple[str, int]] = set()

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> Mapping[Any, Sequence[Record]]:
        self.max_records_seen.append(max_records)
        if self.poll_errors:
            raise self.poll_errors.pop(0)
        budget = max_records or 500
        out: dict[Any, list[Record]] = {}
        for (topic, partition), keys in sorted(self.logs.items()):
            if (topic, partition) in self.paused or (topic, partition) in self.revoked:
                continue
            position = self.positions[(topic, partition)]
            while position < len(keys) and budget > 0:
                key = keys[position]
                record = Record(topic, partition, position, key.encode(), f"value-{key}".encode(), [("trace", b"t1")])
                out.setdefault(topic_partition(topic, partition), []).append(record)
                position += 1
                budget -= 1
            self.positions[(topic, partition)] = position
        if not out and not self.paused:
            self.on_idle()
        return out

    def commit(self, offsets: Mapping[Any, Any] | None = None) -> None:
        assert offsets is not None, "the loop commits explicit offsets"
        commit = {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}
        self.group.commits.append(commit)
        self.group.committed.update(commit)

    def seek(self, partition: Any, offset: int) -> None:
        self.seeks.append(((partition.topic, partition.partition), offset))
        self.positions[(partition.topic, partition.partition)] = offset

    def pause(self, *partitions: Any) -> None:
        self.pauses += 1
        self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, *partitions: Any) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in partitions}

    def assignment(self) -> set[Any]:
        return {
            topic_partition(topic, partition)
            for topic, partition in self.logs
            if (topic, partition) not in self.revoked
        }

    def highwater(self, partition: Any) -> int | None:
        return len(self.logs[(partition.topic, partition.partition)])

    def position(self, partition: Any, timeout_ms: int | None = None) -> int | None:
        return self.positions[(partition.topic, partition.partition)]

    def close(self, autocommit: bool = True) -> None:
        self.closed_with_autocommit = autocommit


@dataclass(frozen=True)
class Metadata:
    topic: str
    partition: int
    offset: int


class FakeFuture:
    def __init__(self, result: Metadata | Exception) -> None:
        self.result = result

    def get(self, timeout: float | None = None) -> Any:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class FakeProducer:
    def __init__(self, failing_sends: int = 0) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self.failing_sends = failing_sends

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> FakeFuture:
        if self.failing_sends > 0:
            self.failing_sends -= 1
            return FakeFuture(TimeoutError("broker did not acknowledge"))
        self.sent.append((topic, key, value, headers or []))
        return FakeFuture(Metadata(topic, 0, len(self.sent) - 1))

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


class Handler:
    """Dead-letters the messages whose key is in ``poison``; raises (a dependency down) on the calls numbered in
    ``raise_on_calls``; ``on_call`` runs before each call (to change the world between attempts)."""

    def __init__(
        self,
        poison: set[str] | None = None,
        raise_on_calls: set[int] | None = None,
        on_call: Callable[[int], None] = lambda _: None,
    ) -> None:
        self.poison = poison or set()
        self.raise_on_calls = raise_on_calls or set()
        self.on_call = on_call
        self.calls: list[list[str | None]] = []
        self.done: list[str | None] = []

    def __call__(self, batch: list[InboundMessage]) -> list[MessageFailure]:
        self.calls.append([m.key for m in batch])
        self.on_call(len(self.calls))
        if len(self.calls) in self.raise_on_calls:
            raise RuntimeError("store unavailable")
        failures = []
        for message in batch:
            if message.key in self.poison:
                failures.append(MessageFailure(message, ValueError(f"cannot read {message.key}")))
            else:
                self.done.append(message.key)
        return failures


@dataclass
class Harness:
    loop: StageLoop
    consumer: FakeConsumer
    producer: FakeProducer
    handler: Handler
    group: Group
    dead: list[tuple[str | None, str]]
    errors: list[tuple[Exception, InboundMessage | None]]


def harness(
    logs: Mapping[int, list[str]],
    handler: Handler,
    *,
    group: Group | None = None,
    producer: FakeProducer | None = None,
    stop_after: int | None = None,
    poll_errors: list[Exception] | None = None,
    settings: KafkaSettings = SETTINGS,
) -> Harness:
    group = group or Group()
    producer = producer or FakeProducer()
    dead: list[tuple[str | None, str]] = []
    errors: list[tuple[Exception, InboundMessage | None]] = []
    holder: dict[str, StageLoop] = {}
    consumer = FakeConsumer(logs, group, on_idle=lambda: holder["loop"].stop(), poll_errors=poll_errors)
    loop = StageLoop(
        settings,
        group_id="rewriter",
        input_topic=TOPIC,
        handler=handler,
        on_dead_letter=lambda message, reason: dead.append((message.key, reason)),
        on_error=lambda exc, message: errors.append((exc, message)),
        producer=producer,
        stop_after=stop_after,
        consumer_factory=lambda: consumer,
    )
    holder["loop"] = loop
    return Harness(loop, consumer, producer, handler, group, dead, errors)


def test_successful_batches_commit_past_their_last_offset_per_partition() -> None:
    h = harness({0: ["a", "b", "c"], 1: ["d", "e"]}, Handler())
    h.loop.run()
    assert h.handler.calls == [["a", "b", "c", "d"], ["e"]]
    assert h.group.commits == [{(TOPIC, 0): 3, (TOPIC, 1): 1}, {(TOPIC, 1): 2}]
    assert h.loop.handled == 5
    assert h.producer.sent == [] and h.dead == [] and h.errors == []
    assert h.consumer.closed_with_autocommit is False


def test_the_loop_says_it_has_joined_once_it_holds_partitions() -> None:
    h = harness({0: ["a"]}, Handler())
    assert not h.loop.joined
    h.loop.run()
    assert h.loop.joined
    idle = harness({}, Handler())  # no partition to hold: never joined
    idle.loop.run()
    assert not idle.loop.joined


def test_poison_is_dead_lettered_once_with_its_origin_and_the_batch_committed() -> None:
    h = harness({0: ["a", "poison", "c"], 1: ["d"]}, Handler({"poison"}))
    h.loop.run()
    assert h.handler.calls == [["a", "poison", "c", "d"]]
    assert len(h.producer.sent) == 1
    topic, key, value, headers = h.producer.sent[0]
    assert (topic, key, value) == (DLQ, b"poison", b"value-poison")
    header = dict(headers)
    assert set(DEAD_LETTER_HEADERS) <= set(header)
    assert header["error"] == b"ValueError: cannot read poison"
    assert (header["source_topic"], header["source_partition"], header["source_offset"]) == (TOPIC.encode(), b"0", b"1")
    assert (header["stage"], header["trace"]) == (b"rewriter", b"t1")
    assert h.dead == [("poison", "ValueError: cannot read poison")]
    assert h.group.committed == {(TOPIC, 0): 3, (TOPIC, 1): 1}
    assert h.loop.handled == 4 and h.loop.dead_lettered == 1


def test_a_failing_dependency_pauses_and_retries_the_same_batch_without_dead_lettering() -> None:
    h = harness({0: ["a", "b"], 1: ["c"]}, Handler(raise_on_calls={1, 2, 3}))
    h.loop.run()
    assert h.handler.calls == [["a", "b", "c"]] * 4
    assert h.handler.done == ["a", "b", "c"]
    assert h.dead == [] and h.producer.sent == []
    assert h.group.committed == {(TOPIC, 0): 2, (TOPIC, 1): 1}
    # Paused once for the outage, and resumed after it.
    assert h.consumer.pauses == 1 and h.consumer.paused == set()
    assert [str(exc) for exc, _ in h.errors] == ["store unavailable"] * 3


def test_a_dead_letter_the_broker_does_not_take_is_retried_with_the_batch() -> None:
    h = harness({0: ["a", "poison", "c"]}, Handler({"poison"}), producer=FakeProducer(failing_sends=1))
    h.loop.run()
    # The first publish to the dead-letter topic was not acknowledged: the batch was held and handled again.
    assert h.handler.calls == [["a", "poison", "c"]] * 2
    assert h.dead == [("poison", "ValueError: cannot read poison")]
    assert len(h.producer.sent) == 1
    assert h.group.committed == {(TOPIC, 0): 3}


def test_a_failing_dead_letter_hook_is_reported_and_the_loop_goes_on() -> None:
    h = harness({0: ["poison", "b"]}, Handler({"poison"}))

    def broken(message: InboundMessage, reason: str) -> None:
        raise RuntimeError("database away")

    h.loop.on_dead_letter = broken
    h.loop.run()
    assert len(h.producer.sent) == 1 and h.group.committed == {(TOPIC, 0): 2}
    assert [str(exc) for exc, _ in h.errors] == ["database away"]


def test_a_held_batch_whose_partitions_are_reassigned_is_dropped_uncommitted() -> None:
    holder: dict[str, FakeConsumer] = {}

    def revoke_on_retry(call: int) -> None:
        if call == 1:
            holder["consumer"].revoked.add((TOPIC, 0))

    h = harness({0: ["a", "b"], 1: ["c"]}, Handler(raise_on_calls={1}, on_call=revoke_on_retry))
    holder["consumer"] = h.consumer
    h.loop.settings = SETTINGS.model_copy(update={"retry_backoff_s": 0.05})
    h.loop.run()
    # Partition 0 went to another member mid-outage: this one gave the batch up (the new owner redelivers it),
    # and read what it still owns again from the batch's first message instead of skipping it.
    assert (TOPIC, 0) not in h.group.committed
    assert ((TOPIC, 1), 0) in h.consumer.seeks
    assert h.handler.calls[-1] == ["c"] and h.group.committed == {(TOPIC, 1): 1}


def test_stop_after_bounds_the_polls_and_stops_exactly_there() -> None:
    h = harness({0: ["a", "b", "c", "d", "e", "f"]}, Handler(), stop_after=5)
    h.loop.run()
    assert h.consumer.max_records_seen == [4, 1]
    assert h.loop.handled == 5 and h.group.committed == {(TOPIC, 0): 5}


def test_stopping_while_paused_leaves_the_batch_uncommitted() -> None:
    slow = SETTINGS.model_copy(update={"retry_backoff_s": 30.0})
    h = harness({0: ["a", "b", "c"]}, Handler(raise_on_calls={1}), settings=slow)
    thread = threading.Thread(target=h.loop.run)
    thread.start()
    while not h.errors:
        threading.Event().wait(0.01)
    assert h.loop.paused_for_s >= 0
    h.loop.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert h.dead == [] and h.producer.sent == []
    assert h.group.committed == {} and h.consumer.closed_with_autocommit is False


def test_a_crash_inside_the_handler_closes_without_committing() -> None:
    group = Group()

    def crash(batch: list[InboundMessage]) -> list[MessageFailure]:
        raise KeyboardInterrupt

    h = harness({0: ["a", "b"]}, Handler(), group=group)
    h.loop.handler = crash
    with pytest.raises(KeyboardInterrupt):
        h.loop.run()
    assert group.commits == [] and h.consumer.closed_with_autocommit is False
    again = harness({0: ["a", "b"]}, Handler(), group=group)
    again.loop.run()
    assert again.handler.calls == [["a", "b"]]


def test_poll_errors_are_reported_and_the_loop_goes_on() -> None:
    h = harness({0: ["a"]}, Handler(), poll_errors=[ConnectionError("broker down")])
    h.loop.run()
    assert [(str(exc), m) for exc, m in h.errors] == [("broker down", None)]
    assert h.handler.done == ["a"]


def test_a_failing_error_callback_does_not_stop_the_loop() -> None:
    h = harness({0: ["a", "b"]}, Handler(raise_on_calls={1}))

    def broken(exc: Exception, message: InboundMessage | None) -> None:
        raise RuntimeError("metrics down")

    h.loop.on_error = broken
    h.loop.run()
    assert h.handler.done == ["a", "b"]


def test_consumer_lag_is_highwater_minus_committed() -> None:
    h = harness({0: ["a", "b", "c"], 1: ["d"]}, Handler(), stop_after=2)
    h.loop.settings = SETTINGS.model_copy(update={"max_poll_records": 2})
    h.loop.run()
    # After the one round: a and b committed on partition 0, c left; d not fetched yet on partition 1.
    assert h.loop.consumer_lag() == {(TOPIC, 0): 1, (TOPIC, 1): 1}
    assert h.group.committed == {(TOPIC, 0): 2}


def test_backoff_doubles_from_the_configured_delay() -> None:
    loop = harness({0: []}, Handler(), settings=SETTINGS.model_copy(update={"retry_backoff_s": 0.5})).loop
    assert [loop.backoff_s(attempt) for attempt in (1, 2, 3)] == [0.5, 1.0, 2.0]


def test_sigterm_stops_every_loop_and_restores_the_previous_handler() -> None:
    loops = [harness({0: []}, Handler()).loop for _ in range(2)]
    before = signal.getsignal(signal.SIGTERM)
    restore = install_signal_handlers(*loops)
    try:
        signal.raise_signal(signal.SIGTERM)
        assert all(loop.stopping for loop in loops)
        assert signal.getsignal(signal.SIGTERM) == before
    finally:
        restore()


def test_signal_handlers_need_the_main_thread() -> None:
    outcome: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(lambda: install_signal_handlers(), outcome))
    thread.start()
    thread.join()
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError)


def _capture(call: Callable[[], object], into: list[BaseException]) -> None:
    try:
        call()
    except BaseException as exc:
        into.append(exc)


def test_topic_names_carry_the_prefix() -> None:
    assert KafkaSettings(bootstrap_servers="b:1", topic_prefix="t1").topic("rewrites") == "t1.rewrites"
