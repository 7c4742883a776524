"""``bpo pairs stats``: records per source, decisions per source and filter, and distinct-n of what was kept."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bpo.pairs.diversity import distinct_n
from bpo.pairs.filters import KEPT
from bpo.store.pairs import DecisionCount, RecordCount


def source_label(source: str, origin: str) -> str:
    """``bpo/alpaca-gpt4`` for a BPO record built from Alpaca-GPT4 data; the bare source otherwise."""
    return f"{source}/{origin}" if origin else source


@dataclass(slots=True)
class Construction:
    """Every decision of one constructor model and prompt version on one dataset."""

    dataset: str
    constructor_model: str
    prompt_version: str
    # decision -> source label -> pairs
    counts: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    distinct: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def decided(self) -> int:
        return sum(sum(by_source.values()) for by_source in self.counts.values())

    @property
    def kept(self) -> int:
        return sum(self.counts.get(KEPT, {}).values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "constructor_model": self.constructor_model,
            "prompt_version": self.prompt_version,
            "decided": self.decided,
            "kept": self.kept,
            "decisions": {d: sum(s.values()) for d, s in sorted(self.counts.items())},
            "decisions_by_source": {d: dict(sorted(s.items())) for d, s in sorted(self.counts.items())},
            "distinct_of_kept": self.distinct,
        }


@dataclass(slots=True)
class PairsStats:
    records: list[RecordCount]
    constructions: list[Construction]

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": [
                {"dataset": r.dataset, "source": source_label(r.source, r.origin), "licence": r.licence,
                 "records": r.records}
                for r in self.records
            ],
            "constructions": [c.to_dict() for c in self.constructions],
        }  # fmt: skip

    def render(self) -> str:
        if not self.records:
            return "no preference records (import some with `bpo pairs import`)"
        lines = ["records"]
        rows = [(r.dataset, source_label(r.source, r.origin), r.licence, str(r.records)) for r in self.records]
        lines += _table(("dataset", "source", "licence", "records"), rows)
        totals: dict[str, int] = defaultdict(int)
        for r in self.records:
            totals[r.dataset] += r.records
        for c in self.constructions:
            share = f"{c.kept / c.decided:.1%}" if c.decided else "-"
            lines += [
                "",
                f"{c.dataset}: constructed by {c.constructor_model} with prompts {c.prompt_version}",
                f"  decided {c.decided} of {totals.get(c.dataset, 0)} records; kept {c.kept} ({share})",
            ]
            sources = sorted({s for by_source in c.counts.values() for s in by_source})
            table_rows = [
                (decision, str(sum(by_source.values())), *(str(by_source.get(s, 0)) for s in sources))
                for decision, by_source in sorted(c.counts.items())
            ]
            lines += ["  " + line for line in _table(("decision", "total", *sources), table_rows)]
            if c.distinct:
                user, opt = c.distinct["x_user"], c.distinct["x_opt"]
                lines.append(
                    f"  distinct-1 / distinct-2 of kept pairs: X_user {user['distinct_1']:.3f} / "
                    f"{user['distinct_2']:.3f}, X_opt {opt['distinct_1']:.3f} / {opt['distinct_2']:.3f}"
                )
        return "\n".join(lines)


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths, strict=True))).rstrip()  # fmt: skip

    return [line(header), *(line(row) for row in rows)]


class StatsSource(Protocol):
    """What the statistics read of ``bpo.store.pairs.PairsStore``."""

    def record_counts(self, dataset: str | None = None) -> list[RecordCount]: ...

    def decision_counts(self, dataset: str | None = None) -> list[DecisionCount]: ...

    def kept_texts(self, dataset: str | None = None) -> list[tuple[str, str, str, str, str]]: ...


def pairs_stats(store: StatsSource, dataset: str | None = None) -> PairsStats:
    constructions: dict[tuple[str, str, str], Construction] = {}
    for count in store.decision_counts(dataset):
        key = (count.dataset, count.constructor_model, count.prompt_version)
        construction = constructions.setdefault(key, Construction(*key))
        label = source_label(count.source, count.origin)
        by_source = construction.counts[count.decision]
        by_source[label] = by_source.get(label, 0) + count.pairs
    texts: dict[tuple[str, str, str], list[tuple[str, str]]] = defaultdict(list)
    for ds, model, version, x_user, x_opt in store.kept_texts(dataset):
        texts[(ds, model, version)].append((x_user, x_opt))
    for key, pairs in texts.items():
        if key in constructions:
            users, opts = [u for u, _ in pairs], [o for _, o in pairs]
            constructions[key].distinct = {
                "x_user": {"distinct_1": distinct_n(users, 1), "distinct_2": distinct_n(users, 2)},
                "x_opt": {"distinct_1": distinct_n(opts, 1), "distinct_2": distinct_n(opts, 2)},
            }
    return PairsStats(store.record_counts(dataset), [constructions[k] for k in sorted(constructions)])
