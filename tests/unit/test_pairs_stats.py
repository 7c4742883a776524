"""``bpo pairs stats``: counts per source and decision, distinct-n of kept pairs, text and JSON."""

from __future__ import annotations

import pytest

from bpo.pairs.stats import pairs_stats, source_label
from bpo.store.pairs import DecisionCount, RecordCount

pytestmark = pytest.mark.unit


class Counts:
    def record_counts(self, dataset: str | None = None) -> list[RecordCount]:
        return [
            RecordCount("bpo-val", "bpo", "alpaca-gpt4", "CC-BY-NC-4.0", 3),
            RecordCount("bpo-val", "bpo", "oasst1", "Apache-2.0", 2),
            RecordCount("hh", "hh-rlhf", "", "MIT", 4),
        ]

    def decision_counts(self, dataset: str | None = None) -> list[DecisionCount]:
        return [
            DecisionCount("bpo-val", "bpo", "alpaca-gpt4", "authors", "v1", "kept", 2),
            DecisionCount("bpo-val", "bpo", "alpaca-gpt4", "authors", "v1", "dropped:length_ratio", 1),
            DecisionCount("bpo-val", "bpo", "oasst1", "authors", "v1", "kept", 1),
            DecisionCount("bpo-val", "bpo", "oasst1", "authors", "v1", "dropped:too_short", 1),
            DecisionCount("hh", "hh-rlhf", "", "smollm2", "v1", "dropped:no_marker", 3),
        ]

    def kept_texts(self, dataset: str | None = None) -> list[tuple[str, str, str, str, str]]:
        return [
            ("bpo-val", "authors", "v1", "the cat sat", "describe the cat"),
            ("bpo-val", "authors", "v1", "the cat ran", "describe the dog"),
            ("bpo-val", "authors", "v1", "a dog", "write a poem"),
        ]


def test_counts_per_source_and_decision() -> None:
    stats = pairs_stats(Counts())
    data = stats.to_dict()
    assert data["records"][0] == {
        "dataset": "bpo-val",
        "source": "bpo/alpaca-gpt4",
        "licence": "CC-BY-NC-4.0",
        "records": 3,
    }
    authors, smollm2 = data["constructions"]
    assert (authors["decided"], authors["kept"]) == (5, 3)
    assert authors["decisions"] == {"dropped:length_ratio": 1, "dropped:too_short": 1, "kept": 3}
    assert authors["decisions_by_source"]["kept"] == {"bpo/alpaca-gpt4": 2, "bpo/oasst1": 1}
    # x_user unigrams: the cat sat the cat ran a dog -> 6 distinct of 8
    assert authors["distinct_of_kept"]["x_user"]["distinct_1"] == pytest.approx(6 / 8)
    # x_opt bigrams: "describe the" twice, "the cat", "the dog", "write a", "a poem" -> 5 distinct of 6
    assert authors["distinct_of_kept"]["x_opt"]["distinct_2"] == pytest.approx(5 / 6)
    assert (smollm2["kept"], smollm2["distinct_of_kept"]) == (0, {})


def test_text_rendering() -> None:
    text = pairs_stats(Counts()).render()
    assert "bpo-val: constructed by authors with prompts v1" in text
    assert "decided 5 of 5 records; kept 3 (60.0%)" in text
    assert "hh: constructed by smollm2 with prompts v1" in text and "decided 3 of 4 records; kept 0 (0.0%)" in text
    assert "distinct-1 / distinct-2 of kept pairs: X_user 0.750" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.strip().startswith("decision"))
    assert "bpo/alpaca-gpt4" in header and "bpo/oasst1" in header


def test_source_label() -> None:
    assert source_label("bpo", "oasst1") == "bpo/oasst1"
    assert source_label("hh-rlhf", "") == "hh-rlhf"
