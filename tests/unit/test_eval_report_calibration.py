"""Evaluation reports show the judge's calibration beside every ΔWR and warn when it does not vouch for the judge;
``bpo judge calibrate`` refuses what it cannot do."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bpo.cli.judge_cmd import _problems
from bpo.cli.main import app
from bpo.errors import BpoError
from bpo.evaluation.calibration import (
    CalibrationKey,
    CalibrationStore,
    JudgeCalibration,
    JudgeCalibrationStatus,
    calibrate,
    calibration_status,
)
from bpo.evaluation.report import EvalReport, render_markdown, report_dict
from bpo.judging.calibration import KnownPairJudgement, PairFailure
from bpo.models.catalogue import ModelCatalogue
from bpo.settings import BpoSettings
from tests.unit.test_eval_report import comparison, make_report

pytestmark = pytest.mark.unit

JUDGE = "qwen2.5-coder-1.5b-instruct"
CORRECT = KnownPairJudgement("p", "hh-rlhf", "correct", True, ("A", "B"), 0, 10, 2)
WRONG = KnownPairJudgement("p", "hh-rlhf", "wrong", True, ("B", "A"), 0, 10, 2)


def calibration(correct: int, wrong: int, key: CalibrationKey | None = None) -> JudgeCalibration:
    key = key or CalibrationKey(JUDGE, "v1", "pair-v2")
    return calibrate(key, JUDGE, [CORRECT] * correct + [WRONG] * wrong, [], {"max_tokens": 384})


def report_with(status: JudgeCalibrationStatus | None) -> EvalReport:
    base = make_report(comparison("vicuna", 1, 5, 3, 2), comparison("vicuna", 2, 6, 2, 2))
    return dataclasses.replace(base, judge_calibration=status)


def test_an_uncalibrated_judge_is_warned_about_and_shown_as_such() -> None:
    for status in (None, JudgeCalibrationStatus(JUDGE, "pair-v2", 384, key=CalibrationKey(JUDGE, "v1", "pair-v2"))):
        report = report_with(status)
        text = render_markdown(report)
        assert "| ΔWR [95% CI] | judge accuracy [95% CI] |" in text
        assert text.count("| not calibrated |") == 4  # two results rows, two rounds rows
        caveats = text.split("## Caveats", 1)[1]
        assert "- **Judge**: no calibration" in caveats
        data = report_dict(report)
        assert data["judge_warnings"] == report.judge_warnings() and data["judge_warnings"]
        assert all(c["judge_accuracy"] is None for c in data["comparisons"])
    assert "None stored for judge qwen2.5-coder-1.5b-instruct with template pair-v2, model version v1." in text


def test_a_judge_at_chance_is_warned_about_beside_its_accuracy() -> None:
    coin = calibration(20, 20)
    report = report_with(JudgeCalibrationStatus(JUDGE, "pair-v2", 384, coin.key, coin))
    text = render_markdown(report)
    assert "| 50.0% [" in text and ", n=40 |" in text
    assert "## Judge calibration" in text and "| qwen2.5-coder-1.5b-instruct | pair-v2 | v1 | 40 |" in text
    assert "includes 50% (chance)" in text.split("## Caveats", 1)[1]
    data = report_dict(report)
    assert data["comparisons"][0]["judge_accuracy"]["accuracy"] == 0.5
    assert data["judge_calibration"]["calibration"]["summary"]["n"] == 40


def test_a_calibrated_judge_above_chance_gets_no_judge_warning() -> None:
    good = calibration(45, 5)
    text = render_markdown(report_with(JudgeCalibrationStatus(JUDGE, "pair-v2", 384, good.key, good)))
    assert "| 90.0% [" in text
    assert "**Judge**" not in text


def test_the_status_is_found_by_the_endpoints_model_version_without_loading_it(tmp_path: Path) -> None:
    settings = BpoSettings(state_dir=tmp_path)
    status = calibration_status(settings, JUDGE, "pair-v2", 384)
    version = ModelCatalogue().resolve(JUDGE).sha256
    assert status.key is not None and version is not None and status.key.model_version == version[:12]
    assert status.calibration is None and "no calibration exists" in status.warnings()[0]
    stored = calibration(45, 5, key=status.key)
    CalibrationStore.under(tmp_path).save(stored)
    found = calibration_status(settings, JUDGE, "pair-v2", 384).calibration
    assert found is not None and found.to_dict() == stored.to_dict()
    assert calibration_status(settings, JUDGE, "ranking", 384).calibration is None
    unknown = calibration_status(settings, "no-such-endpoint", "pair-v2", 384)
    assert unknown.key is None and "no endpoint named 'no-such-endpoint'" in unknown.warnings()[0]


def test_a_calibration_without_judged_pairs_or_with_too_many_failures_is_a_failure() -> None:
    key = CalibrationKey(JUDGE, "v1", "pair-v2")
    nothing = calibrate(key, JUDGE, [], [PairFailure("a", "too long")], {})
    assert _problems(nothing, 1.0) == ["no known pair was judged: all 1 failed"]
    some = calibrate(key, JUDGE, [CORRECT] * 3, [PairFailure("a", "too long")], {})
    assert _problems(some, 0.25) == []
    assert _problems(some, 0.1) == ["1 of 4 pairs failed (allowed: 10%); the first: too long"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--template", "pair-v3"], "unknown judge template 'pair-v3'"),
        (["--set", "alpaca"], "--set 'alpaca'"),
        (["--max-pair-words", "1"], "no known pair of at most 1 words"),
        (["--judge", "no-such-endpoint", "--limit", "1"], "no endpoint named 'no-such-endpoint'"),
    ],
)
def test_calibrate_refuses_what_it_cannot_do(
    arguments: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BPO_STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["judge", "calibrate", "--out", str(tmp_path / "out"), *arguments])
    assert isinstance(result.exception, BpoError) and result.exit_code != 0
    assert message in str(result.exception)
    assert not (tmp_path / "judge-calibrations").exists()
