"""Evaluation reports show the judge's calibration beside every ΔWR and warn when it does not vouch for the judge;
``bpo judge calibrate`` refuses what it cannot do."""

from __future__ import annotations

import dataclasses
import json
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
    ShippedCalibrations,
    calibrate,
    calibration_status,
)
from bpo.evaluation.report import EvalReport, render_markdown, report_dict
from bpo.judging.calibration import KnownPairJudgement, PairFailure
from bpo.judging.pairwise import DEFAULT_JUDGE_TEMPLATE
from bpo.models.catalogue import ModelCatalogue
from bpo.pipeline.jobspec import DEFAULT_JUDGE_TOKENS
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


def shipped_library(tmp_path: Path, *calibrations: JudgeCalibration) -> ShippedCalibrations:
    for index, shipped in enumerate(calibrations):
        folder = tmp_path / "shipped" / f"run-{index}"
        folder.mkdir(parents=True)
        (folder / "calibration.json").write_text(json.dumps(shipped.to_dict()), encoding="utf-8")
    return ShippedCalibrations(tmp_path / "shipped")


def measured(key: CalibrationKey, correct: int, engine: str, max_tokens: int) -> JudgeCalibration:
    return calibrate(key, JUDGE, [CORRECT] * correct + [WRONG] * 10, [], {"max_tokens": max_tokens, "engine": engine})


def test_a_fresh_platform_reports_the_shipped_calibration_until_it_measures_its_own(tmp_path: Path) -> None:
    settings = BpoSettings(state_dir=tmp_path / "state")
    version = calibration_status(settings, JUDGE, "pair-v2", 256).key
    assert version is not None
    # Shipped under another endpoint name: a calibration describes the model, not what a platform calls it.
    shipped_key = CalibrationKey("the-projects-judge", version.model_version, "pair-v2")
    library = shipped_library(
        tmp_path,
        measured(shipped_key, 30, "llamacpp", 384),
        measured(shipped_key, 20, "llamacpp", 256),
        measured(shipped_key, 40, "hf", 256),
        measured(CalibrationKey("x", "another-version", "pair-v2"), 40, "llamacpp", 256),
    )
    status = calibration_status(settings, JUDGE, "pair-v2", 256, library)
    assert status.shipped and status.calibration is not None and status.source == "shipped with bpo"
    assert status.calibration.max_tokens == 256 and status.calibration.summary.n == 30  # same tokens, same engine
    assert calibration_status(settings, JUDGE, "pair-v2", 512, library).calibration.max_tokens == 384  # type: ignore[union-attr]
    assert calibration_status(settings, JUDGE, "ranking", 256, library).calibration is None
    text = render_markdown(report_with(status))
    assert ", n=30, shipped with bpo |" in text and "| shipped with bpo |" in text.split("## Judge calibration")[1]
    assert report_dict(report_with(status))["judge_calibration"]["source"] == "shipped with bpo"

    own = calibration(45, 5, key=version)
    CalibrationStore.under(settings.state_dir).save(own)
    status = calibration_status(settings, JUDGE, "pair-v2", 256, library)
    assert not status.shipped and status.source == "this platform"
    assert status.calibration is not None and status.calibration.to_dict() == own.to_dict()


def test_an_unreadable_shipped_calibration_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "shipped" / "broken"
    folder.mkdir(parents=True)
    (folder / "calibration.json").write_text("{}", encoding="utf-8")
    with pytest.raises(BpoError, match="cannot be read"):
        ShippedCalibrations(tmp_path / "shipped").all()


def test_the_embedded_judge_ships_with_its_calibration(tmp_path: Path) -> None:
    """The packaged calibrations stay attached to the pinned weights they measured: a new pin must re-measure."""
    packaged = ShippedCalibrations.packaged().all()
    assert packaged
    pinned = {spec.sha256[:12] for spec in ModelCatalogue() if spec.sha256}
    assert all(c.key.model_version in pinned and c.settings.get("engine") for c in packaged)
    settings = BpoSettings(state_dir=tmp_path)
    status = calibration_status(settings, settings.platform.judge_model, DEFAULT_JUDGE_TEMPLATE, DEFAULT_JUDGE_TOKENS)
    assert status.shipped and status.calibration is not None and status.calibration.summary.n >= 40
