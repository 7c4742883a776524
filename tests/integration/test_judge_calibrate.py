"""``bpo judge calibrate`` with the real SmolLM2 judge on a handful of known pairs: too weak a judge for its
accuracy to mean anything, so the run's structure, storage and consistency are checked, not its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bpo.evaluation.calibration import calibration_status
from bpo.judging.pairwise import DEFAULT_JUDGE_TEMPLATE
from bpo.settings import BpoSettings

pytestmark = pytest.mark.integration

JUDGE = "smollm2-135m-instruct"
PAIRS = 4


def test_calibrate_judges_known_pairs_in_both_orders_and_stores_the_result(tmp_path: Path) -> None:
    # A state directory of its own, sharing the prepared models: the stored calibration stays in the test's.
    state = tmp_path / "state"
    state.mkdir()
    (state / "models").symlink_to(BpoSettings().models_dir, target_is_directory=True)
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bpo.cli.main",
            "judge",
            "calibrate",
            "--judge",
            JUDGE,
            "--limit",
            str(PAIRS),
            "--max-tokens",
            "48",
            "--seed",
            "0",
            "--bootstrap",
            "200",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "BPO_STATE_DIR": str(state), "BPO_ENGINE__THREADS": "2"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy [95% CI]" in result.stdout and "position consistency" in result.stdout

    report = json.loads((out / "calibration.json").read_text(encoding="utf-8"))
    assert report["key"]["judge"] == JUDGE and report["key"]["template"] == DEFAULT_JUDGE_TEMPLATE
    assert report["summary"]["n"] == PAIRS and report["failures"] == []
    judgements = report["judgements"]
    assert Counter(j["group"].split("/")[0] for j in judgements) == {"bpo": PAIRS // 2, "hh-rlhf": PAIRS // 2}
    for judgement in judgements:
        first, second = judgement["verdicts"]
        assert {first, second} <= {"A", "B", "C", ""}
        expected = {("A", "B"): "correct", ("B", "A"): "wrong"}.get((first, second), "tie")
        if first == second == "C":
            expected = "tie"
        assert judgement["outcome"] == expected
        assert judgement["position_consistent"] == (expected != "tie" or first == second == "C")
        assert judgement["tokens_in"] > 200 and judgement["tokens_out"] > 0
    summary = report["summary"]
    assert summary["correct"] + summary["wrong"] + summary["ties"] == PAIRS
    assert 0.0 <= summary["accuracy_ci"][0] <= summary["accuracy"] <= summary["accuracy_ci"][1] <= 1.0
    assert (out / "calibration.md").read_text(encoding="utf-8").startswith(f"# Judge calibration: {JUDGE} with ")

    status = calibration_status(BpoSettings(state_dir=state), JUDGE, DEFAULT_JUDGE_TEMPLATE, 48)
    assert status.calibration is not None
    assert status.calibration.summary.to_dict() == summary
    assert status.key is not None and status.key.model_version == report["key"]["model_version"]
    # An eval report with this judge warns exactly when the accuracy interval does not lie above chance.
    assert any("50% (chance)" in warning for warning in status.warnings()) == (summary["accuracy_ci"][0] <= 0.5)
