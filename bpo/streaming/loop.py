"""The one consume-process-produce-commit loop that every pipeline stage (rewriter, generator, judge) runs.

A stage is a Kafka consumer group. Each round the loop polls a batch, hands it to the stage's handler (which
writes its results durably and produces them to the next topic), retries the messages the handler reports
as failed, dead-letters those that keep failing, and only then commits: a crash anywhere before the commit
redelivers the batch (at-least-once), so handlers must be idempotent.

Modelled on Quix Streams' application loop: errors are reported with topic, partition and offset to a
callback, SIGTERM/SIGINT stop it cleanly after the batch in hand, and ``stop_after`` ends it for tests.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

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
DEAD_LETTER_HEADERS = ("error", "source_topic", "source_partition", "source_offset", "stage", "attempts")
_MAX_ERROR_HEADER_CHARS = 4000
_MAX_BACKOFF_S = 30.0


@dataclass(frozen=True, slots=True)
class _BatchOutcome:
    """Where each partition of a batch may be committed to, and which partitions must re-read from there."""

    commit: dict[tuple[str, int], int]
    rewind: dict[tuple[str, int], int]
    resolved: int


class StageLoop:
    """Consume ``input_topic`` (a full topic name) as Kafka consumer group ``group_id``.

    Consumer groups are global to a cluster: platforms (or test runs) sharing one under different topic
    prefixes should put the prefix in ``group_id`` too, or their members rebalance each other.

    ``handler`` gets each batch and returns the messages it could not process with their exception; any
    message it does not return counts as done (written durably and forwarded). Failed messages are retried,
    alone, up to ``settings.max_attempts`` times in all with exponential back-off; one still failing is
    published to the dead-letter topic and passed to ``on_dead_letter`` (which records the failure, e.g. marks
    the item failed in Postgres). Offsets are committed after that, so a message is committed only once it is
    done or dead-lettered. A message that could not even be dead-lettered is not committed: its partition is
    rewound to it and it comes back in the next poll.

    ``run`` blocks until ``stop`` is called (from any thread or a signal handler), or until ``stop_after``
    messages are done or dead-lettered. An exception that is not an ``Exception`` (KeyboardInterrupt,
    SystemExit) escapes ``run`` after the consumer is closed without committing the batch in hand.
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
        self._committed: dict[tuple[str, int], int] = {}
        self._lag: dict[tuple[str, int], int] = {}

    @property
    def handled(self) -> int:
        """Messages done or dead-lettered (and committed, or about to be) since ``run`` started."""
        with self._lock:
            return self._handled

    @property
    def dead_lettered(self) -> int:
        with self._lock:
            return self._dead_lettered

    def stop(self) -> None:
        """Ask ``run`` to return after the batch in hand; safe from any thread and from signal handlers.

        Only a flag is set (no lock is taken: a signal handler that waited on a lock its own interrupted thread
        holds would hang); ``run`` notices within one poll timeout, or a tenth of a second while backing off.
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
        """Wait before retry number ``attempt`` (from 1): doubling from ``settings.retry_backoff_s``."""
        return min(_MAX_BACKOFF_S, self.settings.retry_backoff_s * 2.0 ** (attempt - 1))

    def run(self) -> None:
        consumer = self._consumer_factory()
        log.info("stage %s consuming %s", self.group_id, self.input_topic)
        try:
            while not self._stop_requested and not self._limit_reached():
                batch = self._poll(consumer)
                if batch:
                    outcome = self._process(batch)
                    self._commit(consumer, outcome)
                    with self._lock:
                        self._handled += outcome.resolved
                self._refresh_lag(consumer)
        finally:
            # Never commit on close: the batch in hand, if any, is not known to be done.
            consumer.close(autocommit=False)
            log.info("stage %s stopped after %d messages", self.group_id, self.handled)

    def _limit_reached(self) -> bool:
        return self.stop_after is not None and self.handled >= self.stop_after

    def _poll(self, consumer: Consumer) -> list[InboundMessage]:
        max_records = self.settings.max_poll_records
        if self.stop_after is not None:
            max_records = min(max_records, self.stop_after - self.handled)
        try:
            records = consumer.poll(timeout_ms=self.settings.poll_timeout_ms, max_records=max_records)
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

    def _process(self, batch: list[InboundMessage]) -> _BatchOutcome:
        pending = batch
        errors: dict[tuple[str, int, int], Exception] = {}
        attempt = 1
        while True:
            failures = self._call_handler(pending)
            errors = {}
            for failure in failures:
                errors[_position(failure.message)] = failure.error
                self._report(
                    failure.error,
                    failure.message,
                    f"attempt {attempt}/{self.settings.max_attempts} failed at {failure.message.where()}",
                )
            known = {_position(message) for message in pending}
            if unknown := set(errors) - known:
                log.warning("stage %s: handler reported failures for messages not in its batch: %s", self.group_id,
                            sorted(unknown))  # fmt: skip
            pending = [message for message in pending if _position(message) in errors]
            if not pending or attempt >= self.settings.max_attempts:
                break
            if self._sleep(self.backoff_s(attempt)):
                # Stopping: what still fails is neither dead-lettered nor committed; the next member retries it.
                return self._outcome(batch, unresolved={_position(message) for message in pending})
            attempt += 1
        unresolved = set()
        for message in pending:
            if not self._dead_letter(message, errors[_position(message)], attempt):
                unresolved.add(_position(message))
        return self._outcome(batch, unresolved=unresolved)

    def _sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True, early, once a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self._stop_requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(remaining, 0.1))
        return True

    def _call_handler(self, messages: list[InboundMessage]) -> list[MessageFailure]:
        try:
            return self.handler(messages)
        except Exception as exc:
            # A handler that raises has not said which messages it finished: all of them are retried.
            return [MessageFailure(message=message, error=exc) for message in messages]

    def _dead_letter(self, message: InboundMessage, error: Exception, attempts: int) -> bool:
        reason = f"{type(error).__name__}: {error}"[:_MAX_ERROR_HEADER_CHARS]
        extra = {
            "error": reason,
            "source_topic": message.topic,
            "source_partition": str(message.partition),
            "source_offset": str(message.offset),
            "stage": self.group_id,
            "attempts": str(attempts),
        }
        headers = [(name, value) for name, value in message.headers if name not in extra]
        headers += [(name, value.encode()) for name, value in extra.items()]
        try:
            publish(
                self.producer,
                self.dead_letter_topic,
                message.key,
                message.value,
                headers,
                timeout_s=self.settings.publish_timeout_s,
            )
            self.on_dead_letter(message, reason)
        except Exception as exc:
            self._report(exc, message, f"dead-lettering {message.where()} failed; it will be redelivered")
            return False
        log.warning("stage %s dead-lettered %s after %d attempts: %s", self.group_id, message.where(), attempts, reason)
        with self._lock:
            self._dead_lettered += 1
        return True

    def _outcome(self, batch: list[InboundMessage], unresolved: set[tuple[str, int, int]]) -> _BatchOutcome:
        commit: dict[tuple[str, int], int] = {}
        rewind: dict[tuple[str, int], int] = {}
        for message in batch:
            partition = (message.topic, message.partition)
            if partition in rewind:
                continue
            if _position(message) in unresolved:
                rewind[partition] = message.offset
                if message.offset > self._committed.get(partition, -1):
                    commit[partition] = message.offset
            else:
                commit[partition] = message.offset + 1
        resolved = sum(
            1 for m in batch if (m.topic, m.partition) not in rewind or m.offset < rewind[(m.topic, m.partition)]
        )
        return _BatchOutcome(commit=commit, rewind=rewind, resolved=resolved)

    def _commit(self, consumer: Consumer, outcome: _BatchOutcome) -> None:
        for (topic, partition), offset in outcome.rewind.items():
            try:
                consumer.seek(topic_partition(topic, partition), offset)
            except Exception as exc:
                self._report(exc, None, f"rewinding {topic}[{partition}] to {offset} failed")
        if not outcome.commit:
            return
        try:
            commit_offsets(consumer, outcome.commit)
        except Exception as exc:
            # Typically a rebalance: the partitions' new owner re-reads from the last commit (at-least-once).
            self._report(exc, None, f"committing {_describe(outcome.commit)} failed")
            return
        with self._lock:
            self._committed.update(outcome.commit)

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


def _position(message: InboundMessage) -> tuple[str, int, int]:
    return (message.topic, message.partition, message.offset)


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
