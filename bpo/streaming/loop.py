"""The one consume-process-produce-commit loop that every pipeline stage (rewriter, generator, judge) runs.

A stage is a Kafka consumer group. Each round the loop polls a batch and hands it to the stage's handler, which
settles every message itself: it writes each item's outcome durably (done, failed, or parked for a later
retry) and produces the results to the next topic, and returns the messages that are poison (undecodable, or
naming nothing that exists), which the loop dead-letters at once. Only then does the loop commit: a crash
anywhere before the commit redelivers the batch (at-least-once), so handlers must be idempotent.

A handler that *raises* met a failure of the platform itself (Postgres, the broker or Redis unreachable), which
no message can be blamed for: the loop pauses its partitions, keeps its group membership by polling, and
retries the same batch with capped back-off until it succeeds, the partitions are taken away by a rebalance
(their new owner redelivers), or the loop is stopped. Nothing is dead-lettered because a dependency is down.

Modelled on Quix Streams' application loop: errors are reported with topic, partition and offset to a
callback, SIGTERM/SIGINT stop it cleanly after the batch in hand, and ``stop_after`` ends it for tests.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from bpo.streaming.kafka import (
    Consumer,
    InboundMessage,
    KafkaSettings,
    MessageFailure,
    Producer,
    Topics,
    commit_offsets,
    make_consumer,
    publish,
    topic_partition,
)

__all__ = [
    "DEAD_LETTER_HEADERS",
    "BatchHandler",
    "DeadLetterHook",
    "ErrorHook",
    "StageLoop",
    "install_signal_handlers",
]

log = logging.getLogger(__name__)

BatchHandler = Callable[[list[InboundMessage]], list[MessageFailure]]
DeadLetterHook = Callable[[InboundMessage, str], None]
ErrorHook = Callable[[Exception, InboundMessage | None], None]

# Headers a dead-lettered message carries on top of its own.
DEAD_LETTER_HEADERS = ("error", "source_topic", "source_partition", "source_offset", "stage")
_MAX_ERROR_HEADER_CHARS = 4000
_MAX_BACKOFF_S = 30.0
_PAUSED_POLL_MS = 200


class StageLoop:
    """Consume ``input_topic`` (a full topic name) as Kafka consumer group ``group_id``.

    Consumer groups are global to a cluster: platforms (or test runs) sharing one under different topic
    prefixes should put the prefix in ``group_id`` too, or their members rebalance each other.

    ``handler`` gets each batch and returns the messages to dead-letter (with their error); every other message
    counts as settled. Dead-lettered messages are published to the dead-letter topic with their origin and
    passed to ``on_dead_letter`` (which records the failure where it can; it must not raise). Offsets are
    committed after that. A handler that raises pauses the loop's partitions and is called again with the same
    batch, with exponential back-off from ``settings.retry_backoff_s`` up to 30 s.

    ``run`` blocks until ``stop`` is called (from any thread or a signal handler), or until ``stop_after``
    messages are settled. An exception that is not an ``Exception`` (KeyboardInterrupt, SystemExit) escapes
    ``run`` after the consumer is closed without committing the batch in hand.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        group_id: str,
        input_topic: str,
        handler: BatchHandler,
        on_dead_letter: DeadLetterHook,
        producer: Producer,
        on_error: ErrorHook | None = None,
        stop_after: int | None = None,
        consumer_factory: Callable[[], Consumer] | None = None,
    ) -> None:
        if stop_after is not None and stop_after < 1:
            raise ValueError("stop_after must be at least 1")
        self.settings = settings
        self.group_id = group_id
        self.input_topic = input_topic
        self.dead_letter_topic = settings.topic(Topics.DEAD_LETTER)
        self.handler = handler
        self.on_dead_letter = on_dead_letter
        self.producer = producer
        self.on_error = on_error
        self.stop_after = stop_after
        self._consumer_factory = consumer_factory or (
            lambda: make_consumer(settings, group_id, [input_topic], client_id=group_id)
        )
        self._stop_requested = False
        self._lock = threading.Lock()
        self._handled = 0
        self._dead_lettered = 0
        self._paused_since: float | None = None
        self._committed: dict[tuple[str, int], int] = {}
        self._lag: dict[tuple[str, int], int] = {}
        self._joined = threading.Event()

    @property
    def handled(self) -> int:
        """Messages settled (done, failed, parked or dead-lettered) and committed since ``run`` started."""
        with self._lock:
            return self._handled

    @property
    def dead_lettered(self) -> int:
        with self._lock:
            return self._dead_lettered

    @property
    def joined(self) -> bool:
        """The consumer has held partitions of ``input_topic`` at least once since ``run`` started: messages
        published from now on are consumed without waiting for the group to form (a broker may hold a
        first join for seconds). It stays true through later rebalances and outages, which health reports
        through the broker's own check."""
        return self._joined.is_set()

    @property
    def paused_for_s(self) -> float:
        """How long the loop has been paused on a failing dependency (0 when it is not)."""
        since = self._paused_since
        return 0.0 if since is None else time.monotonic() - since

    def stop(self) -> None:
        """Ask ``run`` to return after the batch in hand; safe from any thread and from signal handlers.

        Only a flag is set (no lock is taken: a signal handler that waited on a lock its own interrupted thread
        holds would hang); ``run`` notices within one poll timeout, or a fifth of a second while paused.
        """
        self._stop_requested = True

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    def consumer_lag(self) -> dict[tuple[str, int], int]:
        """Messages not yet committed per assigned ``(topic, partition)``: the high watermark of the last fetch
        minus the committed offset (or, before this member's first commit there, its fetch position).

        Read from a snapshot the loop refreshes after every round, so a metrics thread may call it at any time.
        """
        with self._lock:
            return dict(self._lag)

    def backoff_s(self, attempt: int) -> float:
        """Wait before retry number ``attempt`` (from 1): doubling from ``settings.retry_backoff_s``, capped."""
        return min(_MAX_BACKOFF_S, self.settings.retry_backoff_s * 2.0 ** (attempt - 1))

    def run(self) -> None:
        consumer = self._consumer_factory()
        log.info("stage %s consuming %s", self.group_id, self.input_topic)
        try:
            while not self._stop_requested and not self._limit_reached():
                batch = self._poll(consumer)
                if not self._joined.is_set() and consumer.assignment():
                    self._joined.set()
                if batch:
                    self._settle(consumer, batch)
                self._refresh_lag(consumer)
        finally:
            # Never commit on close: the batch in hand, if any, is not known to be settled.
            consumer.close(autocommit=False)
            log.info("stage %s stopped after %d messages", self.group_id, self.handled)

    def _limit_reached(self) -> bool:
        return self.stop_after is not None and self.handled >= self.stop_after

    def _poll(self, consumer: Consumer, timeout_ms: int | None = None) -> list[InboundMessage]:
        max_records = self.settings.max_poll_records
        if self.stop_after is not None:
            max_records = min(max_records, self.stop_after - self.handled)
        try:
            records = consumer.poll(
                timeout_ms=self.settings.poll_timeout_ms if timeout_ms is None else timeout_ms,
                max_records=max_records,
            )
        except Exception as exc:
            self._report(exc, None, f"polling {self.input_topic} failed")
            self._sleep(self.settings.retry_backoff_s)
            return []
        messages = [
            InboundMessage(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                key=record.key.decode(errors="replace") if record.key is not None else None,
                value=record.value if record.value is not None else b"",
                # Kafka allows a header without a value; the handlers see it as empty.
                headers=tuple((name, bytes(value or b"")) for name, value in record.headers or ()),
            )
            for partition_records in records.values()
            for record in partition_records
        ]
        return sorted(messages, key=lambda m: (m.topic, m.partition, m.offset))

    def _settle(self, consumer: Consumer, batch: list[InboundMessage]) -> None:
        """Handle ``batch`` until it is settled and committed, or no longer this member's to settle."""
        partitions = {(m.topic, m.partition) for m in batch}
        attempt = 0
        paused: list[Any] = []
        try:
            while True:
                try:
                    for failure in self.handler(batch):
                        self._dead_letter(failure.message, failure.error)
                except Exception as exc:
                    attempt += 1
                    delay = self.backoff_s(attempt)
                    self._report(
                        exc, None, f"batch of {len(batch)} ({_span(batch)}) failed, attempt {attempt}; partitions "
                        f"paused, the same batch is retried in {delay:.1f}s"
                    )  # fmt: skip
                    if not paused:
                        paused = list(consumer.assignment())
                        consumer.pause(*paused)
                        self._paused_since = time.monotonic()
                    if not self._wait_paused(consumer, delay, partitions):
                        self._rewind(consumer, batch)
                        return
                    continue
                break
            self._commit(consumer, _next_offsets(batch))
            with self._lock:
                self._handled += len(batch)
        finally:
            if paused:
                self._paused_since = None
                still_ours = set(consumer.assignment())
                consumer.resume(*(tp for tp in paused if tp in still_ours))

    def _rewind(self, consumer: Consumer, batch: list[InboundMessage]) -> None:
        """A batch given up: its partitions still assigned here are read again from its first message."""
        assigned = {(str(tp.topic), int(tp.partition)) for tp in consumer.assignment()}
        first: dict[tuple[str, int], int] = {}
        for message in batch:
            first.setdefault((message.topic, message.partition), message.offset)
        for (topic, partition), offset in first.items():
            if (topic, partition) in assigned:
                consumer.seek(topic_partition(topic, partition), offset)

    def _wait_paused(self, consumer: Consumer, seconds: float, partitions: set[tuple[str, int]]) -> bool:
        """Keep polling (group membership) while paused; False when stopping or the batch's partitions went."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._stop_requested:
                return False
            records = self._poll(consumer, timeout_ms=_PAUSED_POLL_MS)
            if records:
                # Partitions assigned by a rebalance while paused are not paused: read them again later.
                first: dict[tuple[str, int], int] = {}
                for message in records:
                    first.setdefault((message.topic, message.partition), message.offset)
                for (topic, partition), offset in first.items():
                    consumer.seek(topic_partition(topic, partition), offset)
                    consumer.pause(topic_partition(topic, partition))
            assigned = {(str(tp.topic), int(tp.partition)) for tp in consumer.assignment()}
            if not partitions <= assigned:
                log.warning("stage %s: partitions of the held batch were reassigned; dropping it", self.group_id)
                return False
        return True

    def _sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True, early, once a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self._stop_requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(remaining, 0.1))
        return True

    def _dead_letter(self, message: InboundMessage, error: Exception) -> None:
        """Publish ``message`` to the dead-letter topic with its origin (a failed publish raises: the batch is
        retried), then let ``on_dead_letter`` record it; that hook failing is reported, never retried."""
        reason = f"{type(error).__name__}: {error}"[:_MAX_ERROR_HEADER_CHARS]
        extra = {
            "error": reason,
            "source_topic": message.topic,
            "source_partition": str(message.partition),
            "source_offset": str(message.offset),
            "stage": self.group_id,
        }
        headers = [(name, value) for name, value in message.headers if name not in extra]
        headers += [(name, value.encode()) for name, value in extra.items()]
        publish(
            self.producer,
            self.dead_letter_topic,
            message.key,
            message.value,
            headers,
            timeout_s=self.settings.publish_timeout_s,
        )
        log.warning("stage %s dead-lettered %s: %s", self.group_id, message.where(), reason)
        with self._lock:
            self._dead_lettered += 1
        try:
            self.on_dead_letter(message, reason)
        except Exception as exc:
            self._report(exc, message, "recording a dead-lettered message failed (it is on the dead-letter topic)")

    def _commit(self, consumer: Consumer, offsets: dict[tuple[str, int], int]) -> None:
        try:
            commit_offsets(consumer, offsets)
        except Exception as exc:
            # Typically a rebalance: the partitions' new owner re-reads from the last commit (at-least-once).
            self._report(exc, None, f"committing {_describe(offsets)} failed")
            return
        with self._lock:
            self._committed.update(offsets)

    def _refresh_lag(self, consumer: Consumer) -> None:
        lag: dict[tuple[str, int], int] = {}
        try:
            assigned = {(str(tp.topic), int(tp.partition)): tp for tp in consumer.assignment()}
            for partition, tp in assigned.items():
                highwater = consumer.highwater(tp)
                committed = self._committed.get(partition)
                if committed is None:
                    # Nothing committed here by this member yet: between batches its fetch position is where the
                    # group's last commit left off. Timeout 0 keeps this from waiting on the coordinator.
                    committed = consumer.position(tp, timeout_ms=0)
                if highwater is not None and committed is not None:
                    lag[partition] = max(0, highwater - committed)
        except Exception as exc:
            log.debug("stage %s: lag not refreshed: %s", self.group_id, exc)
            return
        with self._lock:
            self._lag = lag
            # A partition given to another member and back may have moved on without this one.
            self._committed = {p: o for p, o in self._committed.items() if p in assigned}

    def _report(self, error: Exception, message: InboundMessage | None, what: str) -> None:
        if message is not None:
            log.error(
                "stage %s: %s (topic %s, partition %d, offset %d): %s: %s", self.group_id, what, message.topic,
                message.partition, message.offset, type(error).__name__, error,
            )  # fmt: skip
        else:
            log.error("stage %s: %s: %s: %s", self.group_id, what, type(error).__name__, error)
        if self.on_error is None:
            return
        try:
            self.on_error(error, message)
        except Exception:
            log.exception("stage %s: on_error callback failed", self.group_id)


def _next_offsets(batch: list[InboundMessage]) -> dict[tuple[str, int], int]:
    offsets: dict[tuple[str, int], int] = {}
    for message in batch:
        key = (message.topic, message.partition)
        offsets[key] = max(offsets.get(key, 0), message.offset + 1)
    return offsets


def _span(batch: list[InboundMessage]) -> str:
    return _describe({(m.topic, m.partition): m.offset for m in batch})


def _describe(offsets: dict[tuple[str, int], int]) -> str:
    return ", ".join(f"{topic}[{partition}]@{offset}" for (topic, partition), offset in sorted(offsets.items()))


def install_signal_handlers(*loops: StageLoop) -> Callable[[], None]:
    """Make SIGTERM and SIGINT stop ``loops`` after their batch in hand; returns a function restoring the
    previous handlers. Python only delivers signals to the main thread, so this must be called there.

    The previous handlers come back with the first signal, so a second Ctrl-C interrupts at once.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_signal_handlers must be called from the main thread")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            # None: a handler installed outside Python, which Python cannot put back.
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping %d stage loop(s)", signal.Signals(signum).name, len(loops))
        for loop in loops:
            loop.stop()
        restore()

    for sig in previous:
        signal.signal(sig, handle)
    return restore
