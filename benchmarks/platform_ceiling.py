"""The platform's own ceiling: how many items per second it moves when the models cost nothing.

A zero-latency OpenAI-compatible stub (``bpo.testing.openai_stub``) serves the optimizer, the target and the
judge, so every second measured is the platform's: the Jobs service, the three stage services, the Celery
optimizer workers, the embedded Postgres, Kafka-compatible broker and Redis (``bpo up`` with nothing
configured). For each corpus size and replica count a fresh platform is started, a corpus of distinct prompts
(no cache hits) is submitted over gRPC, and the job is followed until every item is judged.

Reported per run: items/s of the submission, of each stage (items over the time from the stage's first to its
last output) and end to end (submit start to the last verdict); CPU seconds per item of each process (from
/proc, the platform's children and the embedded services' process trees); and each process's peak resident
memory (the kernel's high-water mark, VmHWM). With ``--replicas 1,2`` the same corpus also runs with two
replicas of every stage service and two optimizer workers, and the table gives the scaling ratio.

    python benchmarks/platform_ceiling.py                      # 10,000 and 100,000 prompts, 1 and 2 replicas
    python benchmarks/platform_ceiling.py --sizes 2000 --replicas 1

Writes ``benchmarks/results/platform_ceiling.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bpo.corpus.formats import CorpusRecord
from bpo.pipeline.client import ADMIN_TOKEN_FILE, JobsClient
from bpo.settings import BpoSettings
from bpo.stack.isolated import isolated_platform_env
from bpo.testing.openai_stub import OpenAIStub
from bpo.v1 import bpo_pb2 as pb

RESULTS = Path(__file__).parent / "results"
OPTIMIZER = "stub-optimizer"
STAGES = ("rewrite", "generate", "judge")
STAGE_OF = {pb.STAGE_REWRITE: "rewrite", pb.STAGE_GENERATE: "generate", pb.STAGE_JUDGE: "judge"}
POLL_S = 0.5
# A run that makes no progress for this long has stalled: the benchmark fails rather than waiting forever.
STALL_S = 300.0
# Stage batches and optimizer tasks sized for throughput rather than latency; stated in the output.
TUNING = {
    "BPO_PLATFORM__STAGE_BATCH_SIZE": "256",
    "BPO_OPTIMIZER__BATCH_SIZE": "256",
    "BPO_OPTIMIZER__MAX_NEW_TOKENS": "64",
}


@dataclass
class ProcessUsage:
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0


@dataclass
class Run:
    prompts: int
    replicas: int
    submit_s: float = 0.0
    end_to_end_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)
    processes: dict[str, ProcessUsage] = field(default_factory=dict)
    # Messages the jobs service's sweep published again, by why (bpo_items_republished_total): a clean run has
    # none but the unpublished ones, each item's first hand-off.
    republished: dict[str, int] = field(default_factory=dict)

    def rates(self) -> dict[str, float]:
        rates = {"submit": self.prompts / self.submit_s, "end_to_end": self.prompts / self.end_to_end_s}
        rates.update({stage: self.prompts / seconds for stage, seconds in self.stage_s.items()})
        return {name: round(rate, 1) for name, rate in rates.items()}


def corpus(path: Path, count: int) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for i in range(count):
            prompt = f"Explain topic number {i} to a curious student, with one example and one common mistake."
            out.write(json.dumps({"id": f"p{i}", "prompt": prompt}) + "\n")
    return path


def records(path: Path) -> Iterator[CorpusRecord]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            data = json.loads(line)
            yield CorpusRecord(number, data["id"], data["prompt"], None, None)


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def peak_rss_mb(process: psutil.Process) -> float:
    """The kernel's high-water mark of the process's resident memory (VmHWM), in MB."""
    try:
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Usage:
    """CPU time and peak memory of every process of the platform, grouped by component."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._start: dict[str, float] = self._cpu()
        self._peak: dict[str, float] = {}

    def _cpu(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for name, pid in self._pids.items():
            seconds = 0.0
            for process in process_tree(pid):
                try:
                    times = process.cpu_times()
                    seconds += times.user + times.system
                except psutil.NoSuchProcess:
                    continue
            totals[name] = seconds
        return totals

    def sample(self) -> None:
        for name, pid in self._pids.items():
            tree = process_tree(pid)
            # A component's memory is its largest process (Postgres backends share most of theirs).
            peak = max((peak_rss_mb(p) for p in tree), default=0.0)
            self._peak[name] = max(self._peak.get(name, 0.0), peak)

    def finish(self) -> dict[str, ProcessUsage]:
        self.sample()
        end = self._cpu()
        return {
            name: ProcessUsage(round(end[name] - self._start.get(name, 0.0), 2), round(self._peak.get(name, 0.0), 1))
            for name in self._pids
        }


def bpo(env: dict[str, str], *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "bpo.cli.main", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bpo {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


def republished(metrics_url: str) -> dict[str, int]:
    """The jobs service's count of re-published items by reason, read from its Prometheus endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "bpo_items_republished":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["reason"]] = int(sample.value)
    return counts


def run_once(count: int, replicas: int, workdir: Path, stub: OpenAIStub, overrides: dict[str, str]) -> Run:
    state_dir = workdir / f"state-{count}-{replicas}"
    state_dir.mkdir()
    models = BpoSettings().models_dir
    models.mkdir(parents=True, exist_ok=True)
    declared = {
        role: {"engine": "openai", "url": stub.url(role), "model": f"stub-{role}", "roles": [role]}
        for role in ("target", "judge")
    }
    env = isolated_platform_env(
        state_dir,
        models,
        model=OPTIMIZER,
        extra={
            "BPO_ENGINE__NAME": "openai",
            "BPO_ENGINE__OPENAI_BASE_URL": stub.url("optimizer"),
            "BPO_ENDPOINTS": json.dumps(declared),
            "BPO_PLATFORM__TARGET_MODEL": "target",
            "BPO_PLATFORM__JUDGE_MODEL": "judge",
            "BPO_PLATFORM__WORKERS": str(replicas),
            "BPO_PLATFORM__REPLICAS": str(replicas),
            **TUNING,
            **overrides,
        },
    )
    path = corpus(workdir / f"corpus-{count}.jsonl", count)
    bpo(env, "up")
    try:
        stack = json.loads((state_dir / "stack" / "state.json").read_text())
        token = (state_dir / "stack" / ADMIN_TOKEN_FILE).read_text().strip()
        settings = BpoSettings.model_validate({"state_dir": state_dir, "client": {"token": token}})
        # This process too: it runs the stub every model call goes to, and the client following the job.
        usage = Usage({**stack["pids"], "benchmark (stub + client)": os.getpid()})
        run = Run(count, replicas)
        with JobsClient(stack["addresses"]["jobs"], settings) as client:
            started = time.perf_counter()
            reply = client.submit(pb.JobSpec(name=f"ceiling-{count}", params=pb.OptimizeParams(seed=0)), records(path))
            run.submit_s = time.perf_counter() - started
            assert reply.accepted == count, reply
            run.stage_s, run.end_to_end_s = follow(client, reply.job_id, count, started, usage)
        run.processes = usage.finish()
        run.republished = republished(f"http://127.0.0.1:{env['BPO_PLATFORM__METRICS_PORT_BASE']}/metrics")
        return run
    finally:
        bpo(env, "down")


def follow(client: JobsClient, job_id: str, count: int, started: float, usage: Usage) -> tuple[dict[str, float], float]:
    """Poll the job until it is done; when each stage wrote its first and its last output."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    progress_at, done_before = time.perf_counter(), -1
    while True:
        job = client.get(job_id)
        now = time.perf_counter()
        usage.sample()
        done = 0
        for stage in job.progress.stages:
            name = STAGE_OF[stage.stage]
            done += stage.done + stage.failed
            if stage.done and name not in first:
                first[name] = now
            if stage.done + stage.failed >= count and name not in last:
                last[name] = now
            if stage.failed:
                raise RuntimeError(f"{stage.failed} items failed in {name}: the benchmark measures clean runs")
        if job.state != pb.JOB_STATE_RUNNING:
            if job.state != pb.JOB_STATE_SUCCEEDED:
                raise RuntimeError(f"job ended {pb.JobState.Name(job.state)}")
            return {s: last[s] - first[s] for s in STAGES}, now - started
        if done != done_before:
            progress_at, done_before = now, done
        elif now - progress_at > STALL_S:
            raise RuntimeError(f"no progress for {STALL_S:.0f} s at {done} stage outputs of {3 * count}")
        time.sleep(POLL_S)


def markdown(runs: list[Run], overrides: dict[str, str]) -> str:
    lines = [
        "| prompts | replicas | submit items/s | rewrite items/s | generate items/s | judge items/s "
        "| end to end items/s | re-published (idle, parked) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        r = run.rates()
        again = f"{run.republished.get('idle', 0):,}, {run.republished.get('parked', 0):,}"
        lines.append(
            f"| {run.prompts:,} | {run.replicas} | {r['submit']} | {r['rewrite']} | {r['generate']} | {r['judge']} "
            f"| {r['end_to_end']} | {again} |"
        )
    lines += ["", "CPU ms per item and peak RSS (MB) per process:", ""]
    names = sorted({name for run in runs for name in run.processes})
    lines.append("| prompts | replicas | " + " | ".join(names) + " |")
    lines.append("|---:|---:|" + "---:|" * len(names))
    for run in runs:
        cells = []
        for name in names:
            use = run.processes.get(name)
            cells.append(f"{1000 * use.cpu_s / run.prompts:.2f} ms, {use.peak_rss_mb:.0f} MB" if use else "-")
        lines.append(f"| {run.prompts:,} | {run.replicas} | " + " | ".join(cells) + " |")
    by_size: dict[int, dict[int, Run]] = {}
    for run in runs:
        by_size.setdefault(run.prompts, {})[run.replicas] = run
    scaling = []
    for size, by_replicas in sorted(by_size.items()):
        if 1 in by_replicas and 2 in by_replicas:
            one, two = by_replicas[1].rates(), by_replicas[2].rates()
            ratios = ", ".join(f"{s} {two[s] / one[s]:.2f}x" for s in (*STAGES, "end_to_end"))
            scaling.append(f"- {size:,} prompts, 2 replicas / 1: {ratios}")
    if scaling:
        lines += ["", "Scaling:", "", *scaling]
    settings = ", ".join(f"{k}={v}" for k, v in (TUNING | overrides).items())
    lines += ["", f"Settings: {settings}; stub answers instantly; {os.cpu_count()} CPUs."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated corpus sizes")
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    parser.add_argument(
        "--runs",
        default="",
        help="explicit SIZE:REPLICAS pairs instead of every size with every replica count, e.g. "
        "10000:1,10000:2,100000:1",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="BPO_NAME=VALUE",
        help="a platform setting for every run, on top of the benchmark's own (stated in the output), e.g. "
        "BPO_PLATFORM__SWEEP_IDLE_S=20 to see whether a queued backlog is published again",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    overrides = dict(setting.split("=", 1) for setting in args.set)
    if not all(name.startswith("BPO_") for name in overrides):
        parser.error("--set takes BPO_ settings only")
    if args.runs:
        plan = [(int(size), int(replicas)) for size, replicas in (pair.split(":") for pair in args.runs.split(","))]
    else:
        plan = [(int(s), int(r)) for s in args.sizes.split(",") for r in args.replicas.split(",")]
    runs: list[Run] = []
    with OpenAIStub() as stub, tempfile.TemporaryDirectory(prefix="bpo-ceiling-") as tmp:
        for size, replicas in plan:
            run = run_once(size, replicas, Path(tmp), stub, overrides)
            print(json.dumps({"prompts": size, "replicas": replicas, "rates": run.rates()}), flush=True)
            runs.append(run)
            # After every run, so that a long plan stopped part-way still leaves the runs it finished.
            write_results(args.out, runs, overrides, complete=len(runs) == len(plan))
    print(markdown(runs, overrides))


def write_results(out: Path, runs: list[Run], overrides: dict[str, str], *, complete: bool) -> None:
    payload: dict[str, Any] = {
        "benchmark": "platform_ceiling",
        "complete": complete,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": TUNING | overrides,
        "runs": [asdict(run) | {"rates": run.rates()} for run in runs],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "platform_ceiling.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "platform_ceiling.md").write_text(markdown(runs, overrides))


if __name__ == "__main__":
    main()
