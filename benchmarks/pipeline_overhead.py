"""What the distributed pipeline costs on top of the optimizer itself.

The same 64 BPO-test prompts, the same engine and model (llama.cpp in-process, SmolLM2-135M-Instruct, 2
threads), the same sampling (the paper's, seed 0, at most 128 new tokens), rewritten twice in one run:

1. directly: ``PromptOptimizer.optimize_batch`` in this process, batches of 8;
2. through the whole platform: ``bpo up`` (embedded Kafka; Postgres and Redis from the machine when
   reachable, else embedded), a job submitted over gRPC with the rewrite stage only, flowing through the
   prompts topic, the rewrite stage (stage batches of 32 messages, each sent to the optimizer worker as tasks
   of 8 prompts, the engine batch of the direct run), the Celery optimizer worker, Postgres and the rewrites
   topic.

Each path runs ``--repeats`` times (default 3), alternating; reports the median prompts/s of each, their
ratio, and the per-item overhead ((pipeline s - direct s) / prompts). The
rewrite cache is cleared by using a fresh database and topic prefix, so every prompt costs a model call.

    python benchmarks/pipeline_overhead.py        # writes benchmarks/results/pipeline_overhead.{json,md}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import psycopg

from bpo.corpus.formats import CorpusRecord, builtin_dataset_path, read_corpus
from bpo.engines.factory import build_engine
from bpo.infra.postgres import postgres_reachable
from bpo.infra.redis import redis_reachable
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.optimizer.optimizer import OptimizeParams, PromptInput, PromptOptimizer, RewriteResult
from bpo.pipeline.client import ADMIN_TOKEN_FILE, with_bearer_token
from bpo.settings import BpoSettings, EngineSettings
from bpo.stack.isolated import isolated_platform_env
from bpo.v1 import bpo_pb2 as pb
from bpo.v1 import bpo_pb2_grpc as pb_grpc

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-135m-instruct"
PROMPTS = 64
BATCH = 8
STAGE_BATCH = 32
MAX_NEW_TOKENS = 128
THREADS = 2
MACHINE_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
MACHINE_REDIS = "redis://127.0.0.1:6379/11"


def prompts() -> list[str]:
    records = [r for r in read_corpus(builtin_dataset_path("bpo-test")) if isinstance(r, CorpusRecord)]
    return [r.prompt for r in records[:PROMPTS]]


async def direct(texts: list[str]) -> dict[str, Any]:
    settings = BpoSettings()
    spec = ModelCatalogue().resolve(MODEL)
    engine = build_engine(
        EngineSettings(name="llamacpp", model=MODEL, threads=THREADS), spec, ModelPreparer(settings.models_dir)
    )
    optimizer = PromptOptimizer(engine, spec.prompt_style, OptimizeParams(seed=0, max_new_tokens=MAX_NEW_TOKENS))
    started = time.perf_counter()
    tokens = 0
    for start in range(0, len(texts), BATCH):
        for outcome in await optimizer.optimize_batch([PromptInput(t) for t in texts[start : start + BATCH]]):
            assert isinstance(outcome, RewriteResult)
            tokens += outcome.tokens_out
    elapsed = time.perf_counter() - started
    await engine.aclose()
    return {"seconds": round(elapsed, 2), "prompts_per_s": round(len(texts) / elapsed, 3), "output_tokens": tokens}


def pipeline(texts: list[str]) -> dict[str, Any]:
    state_dir = Path(tempfile.mkdtemp(prefix="bpo-bench-"))
    database = ""
    if postgres_reachable(MACHINE_POSTGRES):
        name = f"bpo_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(MACHINE_POSTGRES, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        database = MACHINE_POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    env = isolated_platform_env(
        state_dir,
        BpoSettings().models_dir,
        model=MODEL,
        database_url=database,
        redis_url=MACHINE_REDIS if redis_reachable(MACHINE_REDIS) else "",
        extra={
            "BPO_PLATFORM__STAGE_BATCH_SIZE": str(STAGE_BATCH),
            "BPO_OPTIMIZER__BATCH_SIZE": str(BATCH),
            "BPO_OPTIMIZER__MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
            "BPO_ENGINE__THREADS": str(THREADS),
        },
    )
    jobs_port = int(env["BPO_PLATFORM__JOBS_PORT"])
    cli = [sys.executable, "-m", "bpo.cli.main"]
    up = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True, check=False)
    if up.returncode != 0:
        raise RuntimeError(up.stdout + up.stderr)
    try:
        token = (state_dir / "stack" / ADMIN_TOKEN_FILE).read_text(encoding="utf-8").strip()
        stub = pb_grpc.JobsServiceStub(with_bearer_token(grpc.insecure_channel(f"127.0.0.1:{jobs_port}"), token))
        spec = pb.JobSpec(name="pipeline-overhead", params=pb.OptimizeParams(seed=0), stages=[pb.STAGE_REWRITE])
        requests = [pb.SubmitJobRequest(spec=spec)] + [
            pb.SubmitJobRequest(item=pb.PromptItem(source_id=str(i), prompt=t, line=i + 1)) for i, t in enumerate(texts)
        ]
        started = time.perf_counter()
        job_id = stub.SubmitJob(iter(requests)).job_id
        for _ in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
            pass
        elapsed = time.perf_counter() - started
        report = stub.GetJobReport(pb.GetJobReportRequest(job_id=job_id)).report
        tokens = next(t.tokens_out for t in report.tokens if t.role == "rewrite")
        assert report.rewritten == len(texts) and report.cache_hits == 0, report
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, check=False)
        if database:
            with psycopg.connect(MACHINE_POSTGRES, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {database.rsplit('/', 1)[1]} WITH (FORCE)")
    return {"seconds": round(elapsed, 2), "prompts_per_s": round(len(texts) / elapsed, 3), "output_tokens": tokens}


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = statistics.median(row["seconds"] for row in rows)
    return {
        "seconds": round(seconds, 2),
        "prompts_per_s": round(PROMPTS / seconds, 3),
        "output_tokens": rows[0]["output_tokens"],
        "runs_seconds": [row["seconds"] for row in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path, alternating; medians reported")
    args = parser.parse_args()
    texts = prompts()
    # Alternating the two paths spreads this machine's drift over both; one run of each differed by as much as
    # the overhead being measured.
    directs, pipelines = [], []
    for _ in range(args.repeats):
        directs.append(asyncio.run(direct(texts)))
        print("direct", json.dumps(directs[-1]), flush=True)
        pipelines.append(pipeline(texts))
        print("pipeline", json.dumps(pipelines[-1]), flush=True)
    direct_row, pipeline_row = median_row(directs), median_row(pipelines)
    ratio = pipeline_row["prompts_per_s"] / direct_row["prompts_per_s"]
    overhead_ms = (pipeline_row["seconds"] - direct_row["seconds"]) / len(texts) * 1000
    payload = {
        "benchmark": "pipeline_overhead",
        "model": MODEL,
        "prompts": len(texts),
        "batch_size": BATCH,
        "stage_batch_size": STAGE_BATCH,
        "max_new_tokens": MAX_NEW_TOKENS,
        "threads": THREADS,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "direct": direct_row,
        "pipeline": pipeline_row,
        "throughput_ratio": round(ratio, 3),
        "overhead_ms_per_item": round(overhead_ms, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline_overhead.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = "\n".join(
        [
            "| path | seconds | prompts/s | output tokens |",
            "|---|---:|---:|---:|",
            f"| direct (one process), median of {args.repeats} | {direct_row['seconds']} "
            f"| {direct_row['prompts_per_s']} | {direct_row['output_tokens']} |",
            f"| whole pipeline, median of {args.repeats} | {pipeline_row['seconds']} "
            f"| {pipeline_row['prompts_per_s']} | {pipeline_row['output_tokens']} |",
            "",
            f"throughput ratio (pipeline / direct): {ratio:.3f}; overhead per item: {overhead_ms:.0f} ms",
        ]
    )
    (RESULTS / "pipeline_overhead.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
