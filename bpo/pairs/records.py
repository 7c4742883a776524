"""What an importer produces: one preference triple with its origin, licence and a deterministic id."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Fixed forever: record ids must not change between releases, or a re-import would duplicate every record.
RECORD_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "bpo:preference_records")

SOURCES = ("bpo", "hh-rlhf", "oasst1", "chatbot-arena", "alpaca-gpt4", "generic")


def record_id_for(dataset: str, external_id: str) -> str:
    return str(uuid.uuid5(RECORD_NAMESPACE, f"{dataset}\x00{external_id}"))


def content_id(*parts: str | None) -> str:
    """An id for records that carry none of their own: the same content always maps to the same id."""
    digest = hashlib.sha256(json.dumps(list(parts), ensure_ascii=False).encode()).hexdigest()
    return f"sha256:{digest[:24]}"


@dataclass(frozen=True, slots=True)
class PreferenceRecord:
    """One (X_user, Y_good, Y_bad) triple, optionally with a context passage, ready for ``preference_records``."""

    dataset: str
    source: str
    licence: str
    external_id: str
    instruction: str
    context: str | None
    chosen: str
    rejected: str
    # Source-specific fields, JSON-serialisable; ``position`` (the line the record starts on) orders a dataset.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def record_id(self) -> str:
        return record_id_for(self.dataset, self.external_id)

    @property
    def position(self) -> int:
        value = self.extra.get("position", 0)
        return int(value) if isinstance(value, int) else 0


@dataclass(frozen=True, slots=True)
class ImportIssue:
    """A malformed record: reported with its line and skipped."""

    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class Skipped:
    """A well-formed record outside what BPO trains on (multi-turn, a tie, unranked replies...)."""

    line: int
    reason: str
