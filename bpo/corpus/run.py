"""Run a corpus file through the optimizer: batches, progress, resume, and per-line errors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from bpo.corpus.formats import CorpusError, CorpusRecord, ResultWriter
from bpo.optimizer.optimizer import PromptInput, PromptOptimizer, RewriteFailure, RewriteResult

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CorpusRunSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    fell_back: int = 0
    failures: list[CorpusError] = field(default_factory=list)

    def problem(self, max_failure_rate: float) -> str | None:
        """Why the run did not do its work (failures beyond the share allowed, or no prompt at all), or None."""
        total = self.done + self.skipped + self.failed
        if total == 0:
            return "the corpus holds no prompts"
        rate = self.failed / total
        if rate <= max_failure_rate:
            return None
        return f"{self.failed} of {total} prompts failed ({rate:.1%}, allowed {max_failure_rate:.1%})"


def _chunks(items: Iterable[CorpusRecord], size: int) -> Iterator[list[CorpusRecord]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def result_line(record: CorpusRecord, result: RewriteResult) -> dict[str, Any]:
    payload: dict[str, Any] = {"id": record.id, "line": record.line}
    if record.category is not None:
        payload["category"] = record.category
    payload.update(result.to_dict())
    return payload


async def optimize_corpus(
    optimizer: PromptOptimizer,
    entries: Iterable[CorpusRecord | CorpusError],
    writer: ResultWriter,
    *,
    batch_size: int,
    already_done: set[str],
    on_error: Callable[[CorpusError], None],
    on_progress: Callable[[int], None] = lambda _: None,
) -> CorpusRunSummary:
    summary = CorpusRunSummary()

    def pending() -> Iterator[CorpusRecord]:
        for entry in entries:
            if isinstance(entry, CorpusError):
                summary.failed += 1
                summary.failures.append(entry)
                on_error(entry)
                on_progress(1)
            elif entry.id in already_done:
                summary.skipped += 1
                on_progress(1)
            else:
                yield entry

    for chunk in _chunks(pending(), batch_size):
        outcomes = await optimizer.optimize_batch([PromptInput(r.prompt, r.context) for r in chunk])
        for record, outcome in zip(chunk, outcomes, strict=True):
            if isinstance(outcome, RewriteFailure):
                error = CorpusError(record.line, f"{outcome.status_code}: {outcome.error}")
                summary.failed += 1
                summary.failures.append(error)
                on_error(error)
            else:
                writer.write(result_line(record, outcome))
                summary.done += 1
                summary.fell_back += outcome.fallback_reason is not None
        on_progress(len(chunk))
    return summary
