"""Evaluation reports: JSON, Markdown and PNG charts computed from item outcomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bpo.evaluation.outcomes import Comparison, ItemOutcome, Winner
from bpo.evaluation.report import (
    DELTA_WR_BY_ROUND_PNG,
    LENGTH_STRATA_PNG,
    WIN_TIE_LOSE_PNG,
    EvalReport,
    render_charts,
    render_markdown,
    report_dict,
    write_report,
)

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def outcome(index: int, winner: Winner, *, category: str = "generic", consistent: bool = True) -> ItemOutcome:
    # Optimized answers grow with the index so that all three length strata are populated.
    return ItemOutcome(
        item_id=f"item-{index}",
        source_id=f"src-{index}",
        category=category,
        prompt=f"Question {index}?",
        optimized_prompt=f"Question {index}? Answer step by step." if index % 5 else f"Question {index}?",
        original_answer=" ".join(["word"] * 10),
        optimized_answer=" ".join(["word"] * (5 + index % 12)),
        winner=winner,
        judged_orders=2,
        position_consistent=consistent,
        verdicts=("A", "B") if consistent else ("A", "A"),
        fallback_reason="" if index % 5 else "unchanged",
    )


def repeat(winner: Winner, count: int) -> list[Winner]:
    return [winner] * count


def comparison(
    set_name: str, rounds: int, wins: int, ties: int, losses: int, *, consistent: bool = True, variant: str = "bpo"
) -> Comparison:
    winners: list[Winner] = [*repeat("optimized", wins), *repeat("tie", ties), *repeat("original", losses)]
    items = tuple(
        outcome(i, w, category="math" if i % 3 == 0 else "writing", consistent=consistent)
        for i, w in enumerate(winners)
    )
    return Comparison(
        set_name=set_name,
        variant=variant,
        optimizer_model="bpo-7b",
        rounds=rounds,
        job_id=f"job-{set_name}-{rounds}",
        items=items,
    )


def make_report(*comparisons: Comparison) -> EvalReport:
    return EvalReport(
        title="BPO evaluation",
        created="2025-01-01T00:00:00+00:00",
        settings={
            "sets": ["vicuna", "dolly"],
            "target": "smollm2-135m",
            "judge": "qwen2.5-coder-0.5b",
            "judge template": "pairwise — both orders",
            "seed": 0,
            "out": Path("/tmp/out"),
            "command": "bpo eval --sets vicuna,dolly",
        },
        comparisons=comparisons,
    )


@pytest.fixture
def rounds_report() -> EvalReport:
    return make_report(
        comparison("vicuna", 1, 5, 3, 2),
        comparison("vicuna", 2, 6, 2, 2),
        Comparison(
            set_name="dolly",
            variant="bpo",
            optimizer_model="bpo-7b",
            rounds=1,
            job_id="job-dolly",
            items=comparison("dolly", 1, 4, 4, 4, consistent=False).items,
            failed=2,
            failures=("item-x: target timed out", "item-y: judge | unreadable"),
        ),
    )


def test_report_dict_round_trips_through_json(rounds_report: EvalReport) -> None:
    data = report_dict(rounds_report)
    assert json.loads(json.dumps(data, ensure_ascii=False, allow_nan=False)) == data
    assert data["settings"]["out"] == "/tmp/out"
    first = data["comparisons"][0]
    assert (first["set_name"], first["variant"], first["rounds"]) == ("vicuna", "bpo", 1)
    assert first["job_id"] == "job-vicuna-1"
    assert first["summary"]["delta_wr"] == 0.3
    assert [c["category"] for c in first["categories"]] == ["math", "writing"]
    assert [s["stratum"] for s in first["length_control"]["strata"]] == ["shorter", "similar", "longer"]
    assert first["lengths"]["n"] == 10
    item = first["items"][0]
    assert item["source_id"] == "src-0"
    assert (item["original_answer_words"], item["optimized_answer_words"]) == (10, 5)
    assert item["verdicts"] == ["A", "B"] and item["fallback_reason"] == "unchanged"
    assert data["comparisons"][2]["failures"] == ["item-x: target timed out", "item-y: judge | unreadable"]
    # Only vicuna/bpo was measured after more than one round count.
    assert [(r["set_name"], r["variant"]) for r in data["rounds"]] == [("vicuna", "bpo")]
    assert [entry["rounds"] for entry in data["rounds"][0]["rounds"]] == [1, 2]
    assert data["rounds"][0]["rounds"][1]["delta_wr"] == 0.4


def test_markdown_tables_and_numbers(rounds_report: EvalReport) -> None:
    text = render_markdown(rounds_report)
    assert text.startswith("# BPO evaluation\n")
    assert "| target | smollm2-135m |" in text
    assert "| sets | vicuna, dolly |" in text
    assert "| set | variant | rounds | n | win | tie | lose | ΔWR [95% CI] |" in text
    assert "| vicuna | bpo | 1 | 10 | 5 (50.0%) | 3 (30.0%) | 2 (20.0%) | +30.0 [" in text
    assert "| vicuna | bpo | 2 | 10 | 6 (60.0%) | 2 (20.0%) | 2 (20.0%) | +40.0 [" in text
    assert "| dolly | bpo | 1 | 12 | 4 (33.3%) | 4 (33.3%) | 4 (33.3%) | +0.0 [" in text
    assert "### vicuna · bpo · r1" in text
    assert "## Length strata" in text and "## Rounds" in text
    assert "item-y: judge \\| unreadable" in text
    assert "judge is unreliable" in text  # dolly's judge never agreed with itself
    assert "CI is wide" in text  # every comparison has fewer than 50 items
    assert "![" not in text  # no charts were passed


def test_markdown_without_comparisons_or_rounds() -> None:
    text = render_markdown(make_report())
    assert "No comparisons." in text and "## Rounds" not in text
    single = render_markdown(make_report(comparison("vicuna", 1, 60, 0, 0)))
    assert "## Rounds" not in single
    assert "+100.0 [+100.0, +100.0]" in single
    assert "CI is wide" not in single


def test_zero_item_comparison(tmp_path: Path) -> None:
    report = make_report(comparison("vicuna", 1, 0, 0, 0))
    text = render_markdown(report)
    assert "| vicuna | bpo | 1 | 0 | 0 (0.0%) |" in text and "no judged items" in text
    data = report_dict(report)
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert [path.name for path in render_charts(report, tmp_path)] == [WIN_TIE_LOSE_PNG, LENGTH_STRATA_PNG]


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_charts_with_rounds(rounds_report: EvalReport, tmp_path: Path) -> None:
    paths = render_charts(rounds_report, tmp_path / "charts")
    assert [path.name for path in paths] == [WIN_TIE_LOSE_PNG, DELTA_WR_BY_ROUND_PNG, LENGTH_STRATA_PNG]
    for path in paths:
        assert path.parent == tmp_path / "charts"
        assert_png(path)


def test_charts_without_rounds(tmp_path: Path) -> None:
    report = make_report(comparison("vicuna", 1, 5, 3, 2), comparison("dolly", 1, 2, 3, 5))
    paths = render_charts(report, tmp_path)
    assert [path.name for path in paths] == [WIN_TIE_LOSE_PNG, LENGTH_STRATA_PNG]
    for path in paths:
        assert_png(path)
    assert not (tmp_path / DELTA_WR_BY_ROUND_PNG).exists()
    assert render_charts(make_report(), tmp_path / "empty") == []


def test_write_report(rounds_report: EvalReport, tmp_path: Path) -> None:
    paths = write_report(rounds_report, tmp_path / "out")
    assert set(paths) == {"json", "markdown", "win_tie_lose", "delta_wr_by_round", "length_strata"}
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data == report_dict(rounds_report)
    assert '"judge template": "pairwise — both orders"' in paths["json"].read_text(encoding="utf-8")
    markdown = paths["markdown"].read_text(encoding="utf-8")
    for name in (WIN_TIE_LOSE_PNG, DELTA_WR_BY_ROUND_PNG, LENGTH_STRATA_PNG):
        assert f"]({name})" in markdown
        assert_png(tmp_path / "out" / name)


def test_bootstrap_settings_are_recorded_and_reproducible(rounds_report: EvalReport) -> None:
    data = report_dict(rounds_report, bootstrap_samples=500, seed=3)
    assert data == report_dict(rounds_report, bootstrap_samples=500, seed=3)
    assert (data["statistics"]["bootstrap_samples"], data["statistics"]["bootstrap_seed"]) == (500, 3)
    text = render_markdown(rounds_report, confidence=0.9)
    assert "ΔWR [90% CI]" in text and "90% percentile bootstrap" in text
