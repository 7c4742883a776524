"""The platform as a new user meets it: the main job on embedded defaults, and real OpenAI-compatible endpoints.

(a) ``bpo up`` with nothing configured (embedded Postgres, Kafka-compatible broker and Redis; the default packaged
    models) and ``bpo eval`` on 3 Vicuna prompts: every item judged, exit 0; a job whose items fail exits non-zero
    and says why.
(b) A job whose optimizer, target and judge are all an OpenAI-compatible HTTP server (llama.cpp's, serving the
    packaged SmolLM2 under the plain name ``gpt-4o-mini``) behind a proxy that records each request: answers and
    verdicts for every item, exactly ``gpt-4o-mini`` on every request, and no optimizer call on a repeated job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpo.engines.llamacpp_server import serve_gguf
from bpo.settings import DEFAULT_MODEL
from bpo.stack.isolated import isolated_platform_env
from tests.integration.conftest import MODEL
from tests.integration.platform import bpo, platform_logs, running_platform, shared_models_dir
from tests.integration.recording_proxy import RecordingProxy, recording_proxy

pytestmark = pytest.mark.integration

SERVED_NAME = "gpt-4o-mini"
# The target and judge endpoints' API key: the operator's secret, which only those endpoints may ever see.
FIELD_KEY = "sk-field-" + "9f1c2e7a4b"


# -- (a) the main job's path on embedded defaults ---------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Nothing configured: ``bpo up`` starts its own Postgres, broker and Redis, as ``make run`` does. The
    default models (Qwen2.5-Coder-0.5B optimizer and judge, SmolLM2 target); shorter outputs keep it quick."""
    env = isolated_platform_env(
        tmp_path_factory.mktemp("embedded"),
        shared_models_dir(),
        model=DEFAULT_MODEL,
        extra={
            "BPO_PLATFORM__TARGET_MODEL": MODEL,
            "BPO_OPTIMIZER__MAX_NEW_TOKENS": "96",
            "BPO_ENGINE__THREADS": "1",
        },
    )
    with running_platform(env) as running:
        assert set(json.loads((Path(env["BPO_STATE_DIR"]) / "stack" / "state.json").read_text())["embedded"]) == {
            "postgres",
            "redis",
            "kafka",
        }
        yield running


def eval_args(out: Path, *extra: str) -> list[str]:
    return ["eval", "--set", "vicuna", "--limit", "3", "--seed", "0", "--target-max-tokens", "48",
            "--judge-max-tokens", "64", "--bootstrap", "200", "--out", str(out), *extra]  # fmt: skip


def test_the_main_job_judges_every_item(embedded_platform: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = bpo(embedded_platform, *eval_args(out))
    assert result.returncode == 0, result.stdout + result.stderr + platform_logs(embedded_platform)
    report = json.loads((out / "report.json").read_text())
    (comparison,) = report["comparisons"]
    summary = comparison["summary"]
    assert summary["n"] == 3 and comparison["failed"] == 0
    assert summary["wins"] + summary["ties"] + summary["losses"] == 3
    assert "| vicuna |" in result.stdout  # the results table was printed, with its row


def test_a_job_whose_items_fail_exits_non_zero_and_says_why(embedded_platform: dict[str, str], tmp_path: Path) -> None:
    result = bpo(embedded_platform, *eval_args(tmp_path / "report", "--target", "no-such-model"))
    assert result.returncode != 0, result.stdout + result.stderr
    # Refused up front: a target is an endpoint the operator declared, and this one is not.
    assert "NOT_FOUND" in result.stderr and "no endpoint named 'no-such-model' is declared" in result.stderr, (
        result.stderr
    )


# -- (b) a real OpenAI-compatible endpoint as optimizer, target and judge -----------------------------------------


@pytest.fixture(scope="module")
def endpoint(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordingProxy]:
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    try:
        with (
            serve_gguf(smollm2_gguf, alias=SERVED_NAME, threads=1, log_path=log_path) as base_url,
            recording_proxy(base_url) as proxy,
        ):
            yield proxy
    except Exception:
        print(log_path.read_text(errors="replace")[-4000:])
        raise


@pytest.fixture(scope="module")
def openai_platform(
    endpoint: RecordingProxy, postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    env = isolated_platform_env(
        tmp_path_factory.mktemp("openai"),
        shared_models_dir(),
        model=SERVED_NAME,
        extra={
            # The optimizer workers serve the endpoint's model through the openai engine (the production shape:
            # a vLLM server behind the workers), under the endpoint's own name.
            "BPO_ENGINE__NAME": "openai",
            "BPO_ENGINE__OPENAI_BASE_URL": endpoint.url("optimizer"),
            "BPO_OPTIMIZER__MAX_NEW_TOKENS": "64",
            # The operator declares the target and judge endpoints (jobs name them); the key is a secret by name.
            "BPO_ENDPOINTS": json.dumps({
                role: {"engine": "openai", "url": endpoint.url(role), "model": SERVED_NAME, "roles": [role],
                       "api_key_secret": "field-key"}
                for role in ("target", "judge")
            }),
            "BPO_SECRET_FIELD_KEY": FIELD_KEY,
            "BPO_PLATFORM__TARGET_MODEL": "target",
            "BPO_PLATFORM__JUDGE_MODEL": "judge",
        },
    )  # fmt: skip
    with running_platform(env) as running:
        yield running


def submit_to_endpoint(env: dict[str, str], endpoint: RecordingProxy, corpus: Path) -> str:
    result = bpo(
        env, "submit", str(corpus), "--seed", "1", "--wait",
        "--target", "target", "--target-max-tokens", "32", "--judge", "judge", "--judge-max-tokens", "48",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr + platform_logs(env)
    return result.stdout.strip().splitlines()[0]


def test_a_job_against_an_openai_compatible_endpoint(
    openai_platform: dict[str, str], endpoint: RecordingProxy, tmp_path: Path
) -> None:
    prompts = ["Tell me about black holes.", "Write a haiku about rain.", "How do I make tea?", "What is DNS?"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))

    first = submit_to_endpoint(openai_platform, endpoint, corpus)
    export = bpo(openai_platform, "jobs", "export", first)
    rows = [json.loads(line) for line in export.stdout.splitlines()]
    assert len(rows) == 4 and all(row["status"] == "done" for row in rows), rows
    for row in rows:
        assert row["answers"]["original_answer"] and row["answers"]["optimized_answer"]
        assert row["winner"] in ("optimized", "original", "tie") and row["verdict"]["answers"]
        assert row["rewrite"]["model"] == SERVED_NAME
        assert row["rewrite"]["model_version"] == f"{SERVED_NAME}@{endpoint.url('optimizer')}"
    optimizer_calls = len(endpoint.calls("optimizer"))
    assert optimizer_calls >= 4
    assert endpoint.calls("target") and endpoint.calls("judge")
    # Exactly the configured name reached the endpoint, from every role: no catalogue name, no "remote/" prefix.
    assert {r.model for r in endpoint.requests} == {SERVED_NAME}
    assert {r.path for r in endpoint.requests} == {"/v1/chat/completions"}
    # The declared secret went to the endpoints that declare it, and nowhere into the platform's logs.
    assert {r.authorization for r in endpoint.calls("target") + endpoint.calls("judge")} == {f"Bearer {FIELD_KEY}"}
    assert FIELD_KEY not in platform_logs(openai_platform, tail=None)

    # The same prompts again: every rewrite comes from the cache, the optimizer is not called once.
    second = submit_to_endpoint(openai_platform, endpoint, corpus)
    assert len(endpoint.calls("optimizer")) == optimizer_calls
    report = json.loads(bpo(openai_platform, "jobs", "report", second, "--json").stdout)
    assert int(report["cache_hits"]) == 4 and int(report["judged"]) == 4
