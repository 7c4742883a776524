"""What one call to an OpenAI-compatible endpoint costs the caller's CPU, by HTTP client.

Every stage service and optimizer worker that talks to a remote model (``engine = openai``) spends this on each
request, whatever the endpoint's own latency; with a fast endpoint (a GPU server batching well, or the
instant stub of ``platform_ceiling.py``) it is most of what the process does. The stub
(``bpo.testing.openai_stub``) runs in a process of its own, so only the client is measured.

Clients, each sending the same chat requests through ``OpenAICompatEngine.generate_each`` (the platform's
path: retry policy, concurrency bound, usage accounting) with 64 requests in flight:

- ``sdk-aiohttp``: the engine as ``build_engine`` makes it (the openai SDK over its aiohttp transport);
- ``sdk-httpx``: the same SDK over its default httpx client (the platform before this benchmark);
- ``aiohttp-floor``: a bare aiohttp POST and ``json.loads`` per request, no SDK: what any client must spend.

Each client runs ``--repeats`` times, alternating; the table gives the median CPU milliseconds per request of
this process (``time.process_time``) and the median requests per second, and each client's CPU relative to
``sdk-httpx``.

    python benchmarks/openai_client.py        # writes benchmarks/results/openai_client.{json,md}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai

from bpo.engines.base import ChatMessage, EngineClient, GenerationRequest, ModelIdentity, SamplingParams
from bpo.engines.factory import build_engine, resolve_spec
from bpo.engines.openai_compat import OpenAICompatEngine
from bpo.engines.retry import RetryPolicy
from bpo.infra.process import ManagedProcess, free_port, port_open
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.settings import BpoSettings, EngineSettings

RESULTS = Path(__file__).parent / "results"
IN_FLIGHT = 64
BASELINE = "sdk-httpx"
STUB_START_S = 30.0


def start_stub(port: int, log_dir: Path) -> ManagedProcess:
    """The stub in its own process, returned once it accepts connections."""
    stub = ManagedProcess(
        "openai-stub", [sys.executable, "-m", "bpo.testing.openai_stub", "--port", str(port)],
        log_path=log_dir / "openai-stub.log",
    )  # fmt: skip
    stub.start()
    try:
        stub.wait_ready(lambda: port_open("127.0.0.1", port), STUB_START_S)
    except BaseException:
        stub.stop()
        raise
    return stub


def requests_for(count: int) -> list[GenerationRequest]:
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=64)
    return [
        GenerationRequest(messages=(ChatMessage("user", f"Explain item {i} briefly."),), params=params)
        for i in range(count)
    ]


def engine_settings(base_url: str) -> EngineSettings:
    return EngineSettings(name="openai", model="stub", openai_base_url=base_url, max_concurrency=IN_FLIGHT)


def httpx_engine(base_url: str) -> OpenAICompatEngine:
    """The engine as it was built before: the same SDK on its default httpx client."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="benchmark", max_retries=0)
    return OpenAICompatEngine(
        client, "stub", ModelIdentity("stub", "stub"), context_length=4096, max_concurrency=IN_FLIGHT,
        retry_policy=RetryPolicy(max_attempts=1),
    )  # fmt: skip


def engine_run(engine: EngineClient) -> Callable[[list[GenerationRequest]], Awaitable[int]]:
    async def run(requests: list[GenerationRequest]) -> int:
        outcomes = await engine.generate_each(requests)
        failures = [o for o in outcomes if isinstance(o, Exception)]
        if failures:
            raise SystemExit(f"{len(failures)} of {len(requests)} requests failed; the first: {failures[0]}")
        return len(outcomes)

    return run


def floor_run(session: aiohttp.ClientSession, base_url: str) -> Callable[[list[GenerationRequest]], Awaitable[int]]:
    bound = asyncio.Semaphore(IN_FLIGHT)

    async def one(request: GenerationRequest) -> str:
        body = {"model": "stub", "messages": request.messages_as_dicts(), "max_tokens": 64, "temperature": 0.0}
        async with bound, session.post(f"{base_url}/chat/completions", json=body) as response:
            response.raise_for_status()
            return str(json.loads(await response.read())["choices"][0]["message"]["content"])

    async def run(requests: list[GenerationRequest]) -> int:
        return len([text for text in await asyncio.gather(*(one(r) for r in requests)) if text])

    return run


async def measure(args: argparse.Namespace, base_url: str) -> dict[str, list[dict[str, float]]]:
    requests = requests_for(args.requests)
    settings = engine_settings(base_url)
    engine = build_engine(settings, resolve_spec(settings, ModelCatalogue()), ModelPreparer(BpoSettings().models_dir))
    old = httpx_engine(base_url)
    session = aiohttp.ClientSession()
    clients = {
        "sdk-aiohttp": engine_run(engine),
        BASELINE: engine_run(old),
        "aiohttp-floor": floor_run(session, base_url),
    }
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in clients}
    try:
        for run in clients.values():  # warm-up: connections, imports, first-call caches
            await run(requests[: IN_FLIGHT * 2])
        for _ in range(args.repeats):
            for name, run in clients.items():
                cpu, wall = time.process_time(), time.perf_counter()
                done = await run(requests)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                samples[name].append({"cpu_ms_per_request": 1000 * cpu / done, "requests_per_s": done / wall})
    finally:
        await engine.aclose()
        await old.aclose()
        await session.close()
    return samples


def summarise(samples: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    medians = {
        name: {key: statistics.median(s[key] for s in runs) for key in ("cpu_ms_per_request", "requests_per_s")}
        for name, runs in samples.items()
    }
    baseline = medians[BASELINE]["cpu_ms_per_request"]
    for figures in medians.values():
        figures["cpu_vs_sdk_httpx"] = figures["cpu_ms_per_request"] / baseline
    return medians


def markdown(summary: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    lines = [
        "# OpenAI-compatible client cost",
        "",
        f"{args.requests} chat requests, {IN_FLIGHT} in flight, to the instant stub in another process; medians of "
        f"{args.repeats} alternating runs; {os.cpu_count()} CPUs.",
        "",
        "| client | CPU ms / request | requests / s | CPU vs sdk-httpx |",
        "|---|---:|---:|---:|",
    ]
    for name, figures in summary.items():
        lines.append(
            f"| {name} | {figures['cpu_ms_per_request']:.3f} | {figures['requests_per_s']:.0f} | "
            f"{figures['cpu_vs_sdk_httpx']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bpo-openai-client-") as log_dir:
        stub = start_stub(port, Path(log_dir))
        try:
            samples = asyncio.run(measure(args, f"http://127.0.0.1:{port}/benchmark/v1"))
        finally:
            stub.stop()
    summary = summarise(samples)
    payload: dict[str, Any] = {
        "benchmark": "openai_client",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {"requests": args.requests, "repeats": args.repeats, "in_flight": IN_FLIGHT},
        "medians": summary,
        "runs": samples,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openai_client.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    text = markdown(summary, args)
    (args.out / "openai_client.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
