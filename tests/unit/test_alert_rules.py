"""The alert rules (bpo/resources/prometheus/alerts.yaml) pass ``promtool check rules`` and their unit tests
(tests/unit/prometheus/alerts_test.yaml, ``promtool test rules``), and every rule has a test that makes it fire
and one that keeps it silent. promtool comes with ``make install`` (.venv/bin, from Debian's prometheus package)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bpo.observability.prometheus import find_binary, rules_file

pytestmark = pytest.mark.unit

RULE_TESTS = Path(__file__).resolve().parent / "prometheus" / "alerts_test.yaml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = find_binary("promtool")
    assert binary is not None, "promtool is missing: `make install` puts it in .venv/bin"
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120, check=False)


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(rules_file().read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def rule_tests() -> list[dict[str, Any]]:
    tests: list[dict[str, Any]] = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    return tests


def test_promtool_checks_the_rule_file() -> None:
    result = promtool("check", "rules", str(rules_file()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_wrong_expectation_fails_the_unit_tests(tmp_path: Path) -> None:
    """The unit tests can fail: one expected annotation changed, and promtool reports the difference."""
    text = RULE_TESTS.read_text(encoding="utf-8").replace("20% of the requests", "25% of the requests")
    broken = tmp_path / "alerts_test.yaml"
    broken.write_text(text.replace("../../../bpo/resources/prometheus/alerts.yaml", str(rules_file())))
    result = promtool("test", "rules", str(broken))
    assert result.returncode != 0 and "BpoEndpointErrorRateHigh" in result.stderr, result.stdout + result.stderr


def test_every_rule_is_tested_firing_and_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for test in rule_tests():
        for case in test.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else silent).add(case["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert names == firing, f"rules without a firing test: {names - firing}; tests of no rule: {firing - names}"
    assert names == silent, f"rules without a silent test: {names - silent}"


def test_rules_are_described_and_graded() -> None:
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        # The job label differs between `bpo up` and an operator's monitors: rules must not depend on it.
        assert not re.search(r"\bjob\s*[=!]", rule["expr"]), rule["alert"]
