"""The suite's own rule: under CI=true a skip fails, except for hardware the machine lacks."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.unit

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
TESTS = """
import pytest

def test_needs_a_server() -> None:
    pytest.skip("no server")

@pytest.mark.skipif(True, reason="no data")
def test_needs_data() -> None:
    pass

@pytest.mark.gpu
def test_needs_a_gpu() -> None:
    pytest.skip("no GPU")

@pytest.mark.xfail(reason="known")
def test_known_failure() -> None:
    raise AssertionError
"""


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None) -> pytest.RunResult:
    pytester.makeconftest(ROOT_CONFTEST.read_text())
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\nmarkers =\n    gpu: needs a GPU\n")
    pytester.makepyfile(TESTS)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider")


def test_skips_fail_under_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run(pytester, monkeypatch, "true")
    # A skip in the test body fails it; a skip mark (evaluated at setup) fails its setup, reported as an error.
    result.assert_outcomes(failed=1, errors=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(["*test_needs_a_server*skipped under CI=true*no server*"])
    result.stdout.fnmatch_lines(["*test_needs_data*skipped under CI=true*no data*"])


def test_skips_stay_skips_elsewhere(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    run(pytester, monkeypatch, None).assert_outcomes(skipped=3, xfailed=1)
