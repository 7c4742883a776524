"""The metrics the dashboards and alerts read are emitted where things happen: an endpoint's requests, retries
and rate-limit waits (from the engine), the optimizer workers' rewrite outcomes and the versions they serve, and
the one layout of metrics ports every process and the scrape configuration share."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest
from celery.signals import worker_process_init, worker_process_shutdown  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry

from bpo.engines.base import ChatMessage, GenerationRequest, ModelIdentity, SamplingParams
from bpo.engines.observer import ENDPOINT_OUTCOMES
from bpo.engines.openai_compat import OpenAICompatEngine
from bpo.engines.ratelimit import RateLimiter
from bpo.engines.retry import RetryPolicy
from bpo.errors import InvalidPromptError
from bpo.metrics import EndpointMetrics
from bpo.optimizer.guards import FallbackReason
from bpo.settings import STAGE_SERVICES, PlatformSettings
from services.optimizer_worker.tasks import NO_FALLBACK, rewrite_outcome
from tests.unit.fakes import FAKE_IDENTITY
from tests.unit.test_optimizer_worker import COPPER, MODEL, PARIS, FakeLoader, Worker

pytestmark = pytest.mark.unit

ENDPOINT = "gpt-test"


def chat_reply(text: str) -> dict[str, object]:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "served",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


async def test_an_endpoints_requests_retries_and_waits_are_counted() -> None:
    """One request answered after a 503 (a retry), one refused with a 400: each attempt counted by outcome."""
    attempts = {"n": 0}

    def handler(request: httpx2.Request) -> httpx2.Response:
        attempts["n"] += 1
        if b"refuse" in request.content:
            return httpx2.Response(400, json={"error": {"message": "refused"}})
        if attempts["n"] == 1:
            return httpx2.Response(503, json={"error": {"message": "busy"}})
        return httpx2.Response(200, content=json.dumps(chat_reply("hi")).encode())

    registry = CollectorRegistry()
    metrics = EndpointMetrics(registry)
    client = openai.AsyncOpenAI(
        base_url="http://endpoint.test/v1",
        api_key="k",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )
    engine = OpenAICompatEngine(
        client,
        "served",
        ModelIdentity("m", "v"),
        context_length=4096,
        max_concurrency=1,
        retry_policy=RetryPolicy(max_attempts=3, base_delay_s=0.0, max_delay_s=0.0),
        rate_limiter=RateLimiter(1000.0, 1000),
        observer=metrics.observer(ENDPOINT),
    )

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"endpoint": ENDPOINT, **labels})

    # Every outcome's series exists from the start, so that the first error shows in rates.
    assert all(sample("bpo_endpoint_requests_total", outcome=o) == 0 for o in ENDPOINT_OUTCOMES)
    params = SamplingParams(temperature=0.0)
    answered = GenerationRequest(messages=(ChatMessage("user", "hello"),), params=params)
    refused = GenerationRequest(messages=(ChatMessage("user", "refuse this"),), params=params)
    outcomes = await engine.generate_each([answered, refused])
    await engine.aclose()
    assert isinstance(outcomes[1], InvalidPromptError)
    assert sample("bpo_endpoint_requests_total", outcome="ok") == 1
    assert sample("bpo_endpoint_requests_total", outcome="server_error") == 1
    assert sample("bpo_endpoint_requests_total", outcome="client_error") == 1
    assert sample("bpo_endpoint_retries_total") == 1
    assert sample("bpo_endpoint_request_seconds_count") == 3
    assert sample("bpo_endpoint_rate_limit_wait_seconds_count") == 3  # every attempt passed the limiter


def test_an_unknown_outcome_is_counted_as_an_error() -> None:
    registry = CollectorRegistry()
    EndpointMetrics(registry).observer(ENDPOINT).request_done("teapot", 0.1)
    assert registry.get_sample_value("bpo_endpoint_requests_total", {"endpoint": ENDPOINT, "outcome": "error"}) == 1


def test_metrics_ports_follow_one_layout() -> None:
    platform = PlatformSettings(metrics_port_base=9500)
    ports = [platform.metrics_port(p) for p in ("jobs", "rewriter", "generator", "judge", "worker-0", "worker-3")]
    assert ports == [9500, 9501, 9502, 9503, 9504, 9507]
    with pytest.raises(ValueError, match="no metrics port"):
        platform.metrics_port("worker-x")
    with pytest.raises(ValueError, match="no metrics port"):
        platform.metrics_port("jobs-1")  # the jobs service runs the sweep: never replicated


def test_every_process_of_a_scaled_platform_gets_its_own_ports() -> None:
    platform = PlatformSettings(metrics_port_base=9500, workers=8, replicas=8)
    processes = [
        *(platform.process_name(service, replica) for service in STAGE_SERVICES for replica in range(8)),
        "jobs",
        *(f"worker-{index}" for index in range(8)),
    ]
    metrics = [platform.metrics_port(process) for process in processes]
    assert len(set(metrics)) == len(processes)
    grpc = [platform.grpc_port(service, replica) for service in STAGE_SERVICES for replica in range(8)]
    grpc.append(platform.grpc_port("jobs"))
    assert len(set(grpc)) == len(grpc)
    assert platform.process_name("judge", 0) == "judge" and platform.process_name("judge", 2) == "judge-2"
    assert platform.grpc_port("rewriter", 0) == platform.optimizer_port


def test_replicas_beyond_the_partitions_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot exceed kafka_partitions"):
        PlatformSettings(replicas=5, kafka_partitions=4)


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ({"original": "a", "optimized": "b", "fallback_reason": None}, ("rewritten", NO_FALLBACK)),
        ({"original": "a", "optimized": "a", "fallback_reason": "refusal"}, ("kept_original", "refusal")),
        ({"original": "a", "optimized": "a", "fallback_reason": None}, ("kept_original", NO_FALLBACK)),
        # A later round refused, an earlier round's rewrite kept.
        ({"original": "a", "optimized": "b", "fallback_reason": "truncated"}, ("rewritten", "truncated")),
        # Never a label value that is not a known reason.
        ({"original": "a", "optimized": "a", "fallback_reason": "free text"}, ("kept_original", NO_FALLBACK)),
    ],
)
def test_rewrite_outcomes_are_bounded_classes(result: dict[str, object], expected: tuple[str, str]) -> None:
    assert rewrite_outcome(result) == expected


def test_workers_count_rewrite_outcomes_and_the_versions_they_serve() -> None:
    worker = Worker(FakeLoader())
    for reason in FallbackReason:
        assert worker.registry.get_sample_value(
            "bpo_worker_rewrites_total", {"model": MODEL, "outcome": "kept_original", "fallback_reason": reason}
        ) == 0  # fmt: skip
    worker.app.set_current()
    worker_process_init.send(sender="node")
    assert worker.sample("bpo_worker_model_version", model=MODEL, version=FAKE_IDENTITY.version) == 1
    worker.run([{"prompt": PARIS}, {"prompt": COPPER}])
    assert worker.sample("bpo_worker_rewrites_total", model=MODEL, outcome="rewritten", fallback_reason="none") == 2
    worker_process_shutdown.send(sender="node", pid=None, exitcode=0)
    assert worker.sample("bpo_worker_model_version", model=MODEL, version=FAKE_IDENTITY.version) == 0


def test_the_worker_command_loads_no_metrics_library_before_choosing_its_mode() -> None:
    """`bpo worker` enables prometheus_client's multiprocess mode first thing; anything the CLI imports before
    that must not load prometheus_client (the worker refuses to start if it did)."""
    import subprocess
    import sys

    probe = "import sys, bpo.cli.main, services.optimizer_worker.worker; print('prometheus_client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False", result.stderr
