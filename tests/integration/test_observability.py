"""The real scrape test: a platform started with ``bpo up --with-prometheus`` (its Prometheus runs the repository's
scrape configuration and alert rules), a small workload that touches every metric, then every dashboard panel's
queries and every alert expression evaluated through Prometheus' HTTP API.

The platform is the fault tests' one: all embedded, with the optimizer, targets and judges on the OpenAI-compatible
stub (``bpo.testing``), so no model weights are needed. The workload: two jobs (one with an item the endpoint
refuses, which fails), an endpoint failing for a moment (retries), a rate-limited and priced endpoint (waits and
cost), a poison message (a dead letter), a job naming an optimizer nobody serves (a refused call), and two
Optimize calls. Then:

* every panel query returns data (a finite value): no panel would show "No data";
* no query names a metric the platform does not export;
* every metric the platform exports is on some panel or in ``NOT_CHARTED`` with a reason;
* every alert expression evaluates, names only exported metrics, and the dead-letter alert's condition holds.

The figure "panels with data / panels" is printed and written to ``$BPO_SCRAPE_FIGURE`` when set.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaProducer  # type: ignore[import-untyped]

from bpo.infra.process import free_port
from bpo.observability.artifacts import DASHBOARDS_DIR
from bpo.observability.dashboards import NOT_CHARTED
from bpo.observability.prometheus import rules_file
from bpo.stack.isolated import METRICS_SPAN, isolated_platform_env
from bpo.testing.openai_stub import OpenAIStub
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc
from tests.integration.platform import bpo, channel_to, jobs_stub, platform_logs, shared_models_dir, state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

OPTIMIZER = "stub-optimizer"
SCRAPE_INTERVAL_S = 1.0
FINISHED = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_PARTIALLY_FAILED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
# Endpoints jobs name: route -> (role, requests per second, USD per million input / output tokens).
ENDPOINTS = {
    "target": ("target", 50.0, 0.15, 0.60),
    "judge": ("judge", 0.0, 2.5, 10.0),
    "flaky": ("target", 0.0, 0.0, 0.0),
    "strict": ("target", 0.0, 0.0, 0.0),
}
# A counter's and a histogram's series, and the `_created` series prometheus_client adds, belong to their metric.
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


@dataclass
class PanelCheck:
    dashboard: str
    title: str
    exprs: list[str]
    empty: list[str]


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as server:
        yield server


@contextmanager
def platform_with_prometheus(env: dict[str, str]) -> Iterator[str]:
    """``bpo up --with-prometheus``; yields Prometheus' URL; ``bpo down`` afterwards whatever happened."""
    started = bpo(env, "up", "--with-prometheus")
    assert started.returncode == 0, started.stdout + started.stderr + platform_logs(env)
    try:
        url = state(env)["prometheus_url"]
        assert url and f"prometheus {url}" in " ".join(started.stdout.split()), started.stdout
        yield url
    finally:
        stopped = bpo(env, "down")
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="module")
def platform(stub: OpenAIStub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], str]]:
    env = isolated_platform_env(
        tmp_path_factory.mktemp("observability"),
        shared_models_dir(),
        model=OPTIMIZER,
        extra={
            "BPO_ENGINE__NAME": "openai",
            "BPO_ENGINE__OPENAI_BASE_URL": stub.url("optimizer"),
            "BPO_ENGINE__MAX_ATTEMPTS": "4",
            "BPO_ENGINE__RETRY_BASE_DELAY_S": "0.2",
            "BPO_ENGINE__RETRY_MAX_DELAY_S": "0.5",
            "BPO_ENGINE__REQUESTS_PER_SECOND": "50",
            "BPO_PLATFORM__STAGE_BATCH_SIZE": "4",
            "BPO_PLATFORM__SWEEP_INTERVAL_S": "2",
            # An item parked by the failing endpoint below is retried soon after.
            "BPO_PLATFORM__ITEM_RETRY_BASE_S": "1",
            "BPO_PLATFORM__ITEM_RETRY_MAX_S": "2",
            "BPO_PLATFORM__PROMETHEUS_SCRAPE_INTERVAL_S": str(SCRAPE_INTERVAL_S),
            "BPO_ENDPOINTS": json.dumps({
                route: {
                    "engine": "openai", "url": stub.url(route), "model": f"stub-{role}", "roles": [role],
                    "requests_per_second": rate, "usd_per_million_input_tokens": usd_in,
                    "usd_per_million_output_tokens": usd_out,
                }
                for route, (role, rate, usd_in, usd_out) in ENDPOINTS.items()
            }),
            "BPO_PLATFORM__TARGET_MODEL": "target",
            "BPO_PLATFORM__JUDGE_MODEL": "judge",
        },
    )  # fmt: skip
    base = int(env["BPO_PLATFORM__METRICS_PORT_BASE"])
    taken = {int(value) for key, value in env.items() if key.startswith("BPO_PLATFORM__") and key.endswith("_PORT")}
    port = free_port()
    while port in taken or base <= port < base + METRICS_SPAN:
        port = free_port()
    env["BPO_PLATFORM__PROMETHEUS_PORT"] = str(port)
    with platform_with_prometheus(env) as url:
        yield env, url


# -- Prometheus' HTTP API -------------------------------------------------------------------------------------


def api(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=30) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]


def instant(url: str, expr: str) -> list[dict[str, Any]]:
    data = api(url, "query", query=expr)
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    result: list[dict[str, Any]] = data["result"]
    return result


def has_data(result: list[dict[str, Any]]) -> bool:
    """What a panel shows as a number: at least one series whose value is finite."""
    return any(math.isfinite(float(series["value"][1])) for series in result)


def exported_series(url: str) -> set[str]:
    names: list[str] = api(url, "label/__name__/values")
    return {name for name in names if name.startswith("bpo_")}


def family(series: str) -> str:
    """The metric a series belongs to, as declared (no ``_total``, no histogram or ``_created`` suffix)."""
    for suffix in _SUFFIXES:
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def named_series(expr: str) -> set[str]:
    return set(re.findall(r"\bbpo_[a-z0-9_]+", expr))


def eventually(condition: Callable[[], bool], timeout_s: float, what: str, env: dict[str, str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g}s: {what}\n{platform_logs(env)}")
        time.sleep(0.5)


# -- the workload ---------------------------------------------------------------------------------------------


def submit(env: dict[str, str], path: Path, prompts: list[str], target: str = "target") -> str:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    result = bpo(env, "submit", str(path), "--seed", "1", "--target", target, "--judge", "judge",
                 "--max-failure-rate", "1")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr + platform_logs(env)
    return result.stdout.strip().splitlines()[0]


def wait_finished(env: dict[str, str], job_id: str, timeout_s: float = 180) -> pb.Job:
    def finished() -> bool:
        return bool(jobs_stub(env).GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).job.state in FINISHED)

    eventually(finished, timeout_s, f"job {job_id} to finish", env)
    return jobs_stub(env).GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).job


def run_workload(env: dict[str, str], stub: OpenAIStub, url: str, folder: Path) -> None:
    prompts = [f"Explain topic number {i} to a curious student, with one example." for i in range(8)]
    healthy = submit(env, folder / "a.jsonl", prompts)
    stub.route("strict").refuse_containing = "REFUSE-ME"
    refused = submit(env, folder / "b.jsonl", [*prompts[:3], "REFUSE-ME: explain something"], target="strict")
    # Failing until it has failed a request (retried, then parked), then answering again.
    stub.route("flaky").fail_for(120, 503)
    flaky = submit(env, folder / "c.jsonl", prompts[:4], target="flaky")
    eventually(lambda: stub.calls("flaky").failed > 0, 60, "the flaky endpoint to fail a request", env)
    stub.route("flaky").fail_for(0)
    producer = KafkaProducer(bootstrap_servers=state(env)["kafka_bootstrap"])
    topic = f"{env['BPO_PLATFORM__TOPIC_PREFIX']}.prompts"
    producer.send(topic, value=b"\xff\xfe not a protobuf", key=b"poison").get(timeout=30)
    producer.close()
    unserved = bpo(env, "submit", str(folder / "a.jsonl"), "--optimizer-model", "no-such-optimizer")
    assert unserved.returncode != 0 and "INVALID_ARGUMENT" in unserved.stderr, unserved.stderr
    optimizer = pb_grpc.OptimizerServiceStub(channel_to(env, "rewriter"))
    for prompt in ("Tell me about black holes.", "Write a haiku about the sea."):
        reply = optimizer.Optimize(pb.OptimizeRequest(prompt=prompt), timeout=60)
        assert reply.rewrite.optimized, reply
    assert wait_finished(env, healthy).state == pb.JOB_STATE_SUCCEEDED
    assert wait_finished(env, refused).state == pb.JOB_STATE_PARTIALLY_FAILED
    assert wait_finished(env, flaky).state == pb.JOB_STATE_SUCCEEDED
    eventually(lambda: has_data(instant(url, "sum(bpo_dead_letters_total) > 0")), 60, "the dead letter scraped", env)
    # Every process scraped at least twice after the last of the work.
    time.sleep(4 * SCRAPE_INTERVAL_S)


def dashboard_panels() -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        board = json.loads(path.read_text(encoding="utf-8"))
        found += [(board["uid"], panel) for panel in board["panels"] if panel["type"] != "row"]
    return found


def test_every_panel_and_alert_expression_has_data_from_a_real_scrape(
    platform: tuple[dict[str, str], str], stub: OpenAIStub, tmp_path: Path
) -> None:
    env, url = platform
    started = time.monotonic()
    jobs = {"bpo-jobs", "bpo-rewriter", "bpo-generator", "bpo-judge", "bpo-optimizer-worker"}

    def every_target_up() -> bool:
        # Ready Prometheus lists its targets once its scrape manager has applied the configuration (a moment).
        targets = api(url, "targets")["activeTargets"]
        listed = {t["labels"]["job"] for t in targets}
        assert listed <= jobs, f"targets the configuration does not name: {listed - jobs}"
        return listed == jobs and all(t["health"] == "up" for t in targets)

    eventually(every_target_up, 60, f"targets {sorted(jobs)} listed and up", env)
    run_workload(env, stub, url, tmp_path)
    # Windows long enough to hold the whole workload, as a dashboard's time range would.
    window = f"{math.ceil(time.monotonic() - started) + 120}s"
    exported = exported_series(url)
    exported_families = {family(name) for name in exported}

    checks: list[PanelCheck] = []
    charted: set[str] = set()
    for uid, panel in dashboard_panels():
        exprs = [t["expr"].replace("$__rate_interval", window).replace("$__range", window) for t in panel["targets"]]
        empty = [expr for expr in exprs if not has_data(instant(url, expr))]
        checks.append(PanelCheck(uid, panel["title"], exprs, empty))
        for expr in exprs:
            unknown = named_series(expr) - exported
            assert not unknown, f"{uid} / {panel['title']} names metrics the platform does not export: {unknown}"
            charted |= {family(name) for name in named_series(expr)}

    alerts = [rule for group in yaml.safe_load(rules_file().read_text())["groups"] for rule in group["rules"]]
    for rule in alerts:
        unknown = named_series(rule["expr"]) - exported
        assert not unknown, f"alert {rule['alert']} names metrics the platform does not export: {unknown}"
        instant(url, rule["expr"])  # evaluates (an invalid expression fails the API call)
    dead_letters = next(rule["expr"] for rule in alerts if rule["alert"] == "BpoDeadLetters")
    assert has_data(instant(url, dead_letters)), "the dead letter written above does not meet the alert's condition"

    with_data = sum(1 for check in checks if not check.empty)
    figure = f"panels with data / panels: {with_data} / {len(checks)}"
    print(f"\n{figure} (dashboards: {len({c.dashboard for c in checks})}, alert expressions: {len(alerts)})")
    if target := os.environ.get("BPO_SCRAPE_FIGURE"):
        Path(target).write_text(figure + "\n")
    assert with_data == len(checks), "\n".join(
        f"{c.dashboard} / {c.title}: no data from {c.empty}" for c in checks if c.empty
    )
    not_charted = exported_families - charted - set(NOT_CHARTED)
    assert not not_charted, f"exported but on no panel and not listed in NOT_CHARTED: {sorted(not_charted)}"
    stale = set(NOT_CHARTED) - exported_families
    assert not stale, f"NOT_CHARTED lists metrics the platform does not export: {sorted(stale)}"
