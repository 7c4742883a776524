"""The checked-in files generated from code, written or checked by ``python -m bpo.observability``
(``make dashboards``; the unit tests fail when a checked-in copy drifts from its source):

* ``bpo/resources/grafana/<uid>.json``: each dashboard of ``bpo.observability.dashboards``;
* ``k8s/components/monitoring/prometheusrule.yaml``: the alert rule file as a Prometheus Operator
  ``PrometheusRule``, so the rules have one copy.

Development-time only: it needs the ``dev`` extra (the Grafana SDK, PyYAML) and the repository's tree.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from bpo.observability.dashboards import BOARDS, file_name, render
from bpo.observability.prometheus import rules_file

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = ROOT / "bpo" / "resources" / "grafana"
PROMETHEUS_RULE = ROOT / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"
PROMETHEUS_RULE_NAME = "bpo-alerts"
_RULE_HEADER = (
    "# Generated from bpo/resources/prometheus/alerts.yaml by `make dashboards`: edit that file, not this one.\n"
    "# The platform's alert rules for a Prometheus Operator; apply it beside the monitors of this component.\n"
)


class _ReadableDumper(yaml.SafeDumper):
    """Multi-line strings (the rules' expressions) as literal blocks, as they are written in the rule file."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_ReadableDumper.add_representer(str, _string)


def prometheus_rule(rules_yaml: str) -> str:
    """The rule file's groups as a ``PrometheusRule`` manifest."""
    groups = yaml.safe_load(rules_yaml)["groups"]
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": PROMETHEUS_RULE_NAME, "labels": {"app.kubernetes.io/name": "bpo"}},
        "spec": {"groups": groups},
    }
    return _RULE_HEADER + yaml.dump(manifest, Dumper=_ReadableDumper, sort_keys=False, allow_unicode=True, width=120)


def expected() -> dict[Path, str]:
    """Every generated file and the content its source gives it now."""
    files = {DASHBOARDS_DIR / file_name(board): render(board) for board in BOARDS}
    files[PROMETHEUS_RULE] = prometheus_rule(rules_file().read_text(encoding="utf-8"))
    return files


def stale() -> list[Path]:
    """Generated files whose checked-in content differs from what their source gives (or that are missing), and
    dashboard files no dashboard generates any more."""
    files = expected()
    drifted = [path for path, text in files.items() if not path.is_file() or path.read_text(encoding="utf-8") != text]
    orphans = [path for path in sorted(DASHBOARDS_DIR.glob("*.json")) if path not in files]
    return drifted + orphans


def write() -> list[Path]:
    files = expected()
    DASHBOARDS_DIR.mkdir(parents=True, exist_ok=True)
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        if path not in files:
            path.unlink()
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    return sorted(files)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpo.observability", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ from their source")
    args = parser.parse_args(argv)
    if args.check:
        drifted = stale()
        for path in drifted:
            print(f"stale: {path.relative_to(ROOT)} (run `make dashboards`)", file=sys.stderr)
        return 1 if drifted else 0
    for path in write():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0
