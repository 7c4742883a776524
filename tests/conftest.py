"""Rules for the whole suite.

Under ``CI=true`` a skipped test is a failed test: every prerequisite (servers, weights, data) is started or
shipped by the suite itself, so a skip there means a test did not test its subject. The one exception is
hardware the machine lacks: tests marked ``gpu`` may skip on a machine without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

HARDWARE_MARKERS = ("gpu",)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if not (report.skipped and _in_ci()) or hasattr(report, "wasxfail"):
        return report
    if any(item.get_closest_marker(marker) is not None for marker in HARDWARE_MARKERS):
        return report
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where no test may skip its subject: {reason}"
    return report
