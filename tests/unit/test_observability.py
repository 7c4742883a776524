"""Dashboards as code and Prometheus for a one-machine platform: the checked-in dashboards and PrometheusRule are
what their sources generate (drift check), the dashboards are well formed and name only the platform's metrics,
the PrometheusRule is valid for its CRD, and the scrape configuration ``bpo up --with-prometheus`` writes passes
``promtool check config`` and names every process's metrics port."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bpo.observability.artifacts import DASHBOARDS_DIR, PROMETHEUS_RULE, expected, prometheus_rule, stale
from bpo.observability.dashboards import BOARDS, NOT_CHARTED
from bpo.observability.prometheus import (
    SERVICE_JOB,
    WORKER_JOB,
    LocalPrometheus,
    find_binary,
    prometheus_config,
    rules_file,
    scrape_targets,
)
from bpo.settings import BpoSettings

pytestmark = pytest.mark.unit

AREAS = {"jobs", "pipeline", "optimizer-workers", "endpoints", "quality", "grpc"}
# What a query may name besides metrics: PromQL's functions, aggregations and keywords used by the dashboards.
PROMQL_WORDS = {
    "sum", "max", "min", "rate", "increase", "changes", "delta", "histogram_quantile", "by", "on", "and", "or",
}  # fmt: skip


def dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text(encoding="utf-8")) for path in sorted(DASHBOARDS_DIR.glob("*.json"))]


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def identifiers(expr: str) -> set[str]:
    """The names a query uses outside label matchers, strings, ranges and grouping clauses."""
    stripped = re.sub(r'"[^"]*"', "", expr)
    stripped = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|on|without|ignoring)\s*\([^)]*\)", " ", stripped)
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", stripped))


def test_checked_in_files_are_what_their_sources_generate() -> None:
    drifted = [str(path) for path in stale()]
    assert not drifted, f"stale generated files (run `make dashboards`): {drifted}"


def test_the_drift_check_notices_a_changed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bpo.observability.artifacts as artifacts

    copy = tmp_path / "grafana"
    copy.mkdir()
    for path in DASHBOARDS_DIR.glob("*.json"):
        (copy / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    changed = copy / "bpo-quality.json"
    changed.write_text(changed.read_text(encoding="utf-8").replace("ΔWR", "WR"), encoding="utf-8")
    (copy / "bpo-retired.json").write_text("{}", encoding="utf-8")
    monkeypatch.setattr(artifacts, "DASHBOARDS_DIR", copy)
    assert set(artifacts.stale()) == {changed, copy / "bpo-retired.json"}


def test_an_overview_and_one_dashboard_per_area() -> None:
    boards = dashboards()
    uids = [board["uid"] for board in boards]
    assert len(uids) == len(set(uids)) == len(BOARDS)
    assert set(uids) == {"bpo-overview", *(f"bpo-{area}" for area in AREAS)}
    for board in boards:
        assert board["tags"] == ["bpo"] and board["title"].startswith("bpo / ")
        (variable,) = board["templating"]["list"]
        assert variable["type"] == "datasource" and variable["query"] == "prometheus"


def test_every_panel_queries_the_platforms_metrics_through_the_datasource_variable() -> None:
    for board in dashboards():
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), board["uid"]
        for panel in panels(board):
            where = f"{board['uid']}: {panel['title']}"
            assert panel["targets"] and panel["description"], where
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            for target in panel["targets"]:
                names = identifiers(target["expr"])
                metrics = {name for name in names if name.startswith("bpo_")}
                assert metrics, where
                assert names - metrics <= PROMQL_WORDS, f"{where}: {names - metrics - PROMQL_WORDS}"
                # The job label differs between `bpo up` and an operator's monitors.
                assert not re.search(r"\bjob\s*[=!]", target["expr"]), where
                assert "$__rate_interval" in target["expr"] or "rate(" not in target["expr"], where


def test_not_charted_metrics_say_why() -> None:
    for name, reason in NOT_CHARTED.items():
        assert name.startswith("bpo_") and len(reason) > 20, name


def test_the_prometheus_rule_is_the_rule_file_and_valid_for_its_crd() -> None:
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule

    manifest = yaml.safe_load(PROMETHEUS_RULE.read_text(encoding="utf-8"))
    assert manifest["spec"]["groups"] == yaml.safe_load(rules_file().read_text(encoding="utf-8"))["groups"]
    parsed = PrometheusRule.model_validate(manifest, strict=True)
    assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == manifest
    assert expected()[PROMETHEUS_RULE] == prometheus_rule(rules_file().read_text(encoding="utf-8"))


def test_scrape_targets_are_every_services_and_workers_metrics_port() -> None:
    settings = BpoSettings.model_validate({"platform": {"metrics_port_base": 9500, "workers": 2}})
    assert scrape_targets(settings) == {
        SERVICE_JOB["jobs"]: ["127.0.0.1:9500"],
        SERVICE_JOB["rewriter"]: ["127.0.0.1:9501"],
        SERVICE_JOB["generator"]: ["127.0.0.1:9502"],
        SERVICE_JOB["judge"]: ["127.0.0.1:9503"],
        WORKER_JOB: ["127.0.0.1:9504", "127.0.0.1:9505"],
    }
    everywhere = BpoSettings.model_validate({"platform": {"metrics_host": "0.0.0.0"}})
    assert scrape_targets(everywhere)[SERVICE_JOB["jobs"]] == ["127.0.0.1:9400"]
    scaled = BpoSettings.model_validate({"platform": {"metrics_port_base": 9500, "replicas": 2}})
    targets = scrape_targets(scaled)
    assert targets[SERVICE_JOB["jobs"]] == ["127.0.0.1:9500"]  # the jobs service is never replicated
    assert targets[SERVICE_JOB["rewriter"]] == ["127.0.0.1:9501", "127.0.0.1:9564"]
    assert targets[SERVICE_JOB["judge"]] == ["127.0.0.1:9503", "127.0.0.1:9566"]


def test_the_written_configuration_passes_promtool(tmp_path: Path) -> None:
    settings = BpoSettings.model_validate(
        {"state_dir": tmp_path, "platform": {"prometheus_port": 9590, "prometheus_scrape_interval_s": 0.5}}
    )
    server = LocalPrometheus.for_platform(settings, tmp_path / "prometheus")
    path = server.write_config(settings)
    config = json.loads(path.read_text(encoding="utf-8"))
    assert config["global"]["scrape_interval"] == "500ms" and config["rule_files"] == [str(rules_file())]
    assert server.url == "http://127.0.0.1:9590"
    assert f"--config.file={path}" in server.command()
    promtool = find_binary("promtool")
    assert promtool is not None, "promtool is missing: `make install` puts it in .venv/bin"
    result = subprocess.run([str(promtool), "check", "config", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_scrape_interval_bounds_the_timeout() -> None:
    config = prometheus_config({"a": ["127.0.0.1:1"]}, scrape_interval_s=30, rule_files=[])
    assert config["global"] == {
        "scrape_interval": "30000ms",
        "scrape_timeout": "10000ms",
        "evaluation_interval": "30000ms",
    }
