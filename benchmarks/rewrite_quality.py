"""Rewrite quality per optimizer: how often a rewrite replaces the prompt, how often a replacing rewrite broke what
the user asked for (harm), and how often the guards caught a broken candidate.

The prompt set: prompts of the four shipped test sets and of the licence-clean BPO construction records (with
their contexts, passed as the platform passes them), evenly spaced through each file; the adversarial probes of
``benchmarks/data/rewrite_probes.jsonl`` (formulas, short quotations, inline code, negated constraints, named
things, Chinese, Spanish and other scripts, framing temptations, unsafe requests), each with what its author
says the rewrite must keep; and unsafe HH-RLHF red-teaming prompts from the held-out split of
``tests/data/hh_rlhf/harmless_base_single_turn_labelled.jsonl`` (labelled by hand, never used to write the
safety lexicon).

Each prompt is optimized alone (one round, the paper's sampling: temperature 0.6, top_p 0.9, seed 0) by each
optimizer on llama.cpp with 2 threads. The engine's raw output is recorded, so the candidate a guard rejected
is checked too. Every candidate and every final prompt is checked by ``benchmarks/rewrite_checks.py``, which
shares no code with the guards. Per optimizer:

- rewrite rate: final prompts that differ from the original;
- harm rate: final prompts that differ from the original and fail a check (a broken rewrite no guard caught),
  over all prompts, and over the rewrites;
- guard catch rate: of the candidates that fail a check, the share the guards rejected;
- false rejections: candidates that pass every check but a guard rejected;
- latency: median and 90th percentile seconds per prompt.

New tokens are capped (default 160, the paper's 1024 would take hours on CPU): a candidate cut at the cap is
rejected as truncated, which lowers the rewrite rate, never the harm rate.

    python benchmarks/rewrite_quality.py [--optimizers smollm2-135m-instruct,NAME=path/to/trained.gguf,...]
        [--limit N] [--max-new-tokens 160] [--threads 2] [--out benchmarks/results]
    python benchmarks/rewrite_quality.py --replay benchmarks/results/rewrite_quality.json --name replay

``--replay`` answers each prompt with the raw completion an earlier run recorded for it (the model is loaded for
its tokenizer only), so a change to the guards or the checks is measured on the same candidates in seconds; a
prompt's latency is then the recorded live run's. The sampling is seeded and llama.cpp's cache is
cleared for seeded requests, so a live run of the same requests gives the same candidates; a change to what
the optimizer sends (``bpo.optimizer.prompting``) is only measured by a live run.

Writes rewrite_quality.json (every item, with its candidate, final prompt, fallback reason and failed checks) and
rewrite_quality.md. ``--limit N`` takes the first N prompts of the set (its order interleaves the sources).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bpo.corpus.formats import CorpusRecord, builtin_dataset_path, read_corpus
from bpo.engines.base import Completion, EngineClient, GenerationRequest
from bpo.engines.factory import build_engine
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.optimizer.cleaning import clean_rewrite
from bpo.optimizer.optimizer import OptimizeParams, PromptInput, PromptOptimizer, RewriteResult
from bpo.optimizer.spans import reassemble, segment
from bpo.settings import BpoSettings, EngineSettings

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, only benchmarks/ is on the import path: the repository root is added so that the checks have
# one module name (benchmarks.rewrite_checks) whether this file runs as a script, under -m, or under mypy.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.rewrite_checks import CHECK_NAMES, CheckResult, Expectations, check  # noqa: E402

PROBES = ROOT / "benchmarks" / "data" / "rewrite_probes.jsonl"
BPO_VAL = ROOT / "tests" / "data" / "bpo" / "val_oasst1_hh_rlhf.json"
HH_LABELLED = ROOT / "tests" / "data" / "hh_rlhf" / "harmless_base_single_turn_labelled.jsonl"
DEFAULT_OPTIMIZERS = "smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct"
# Prompts taken from each shipped source: 300 in all, spread evenly through each file.
DATASET_COUNTS = {"vicuna": 50, "dolly": 80, "self-instruct": 80, "bpo-test": 60, "bpo-val": 30}
UNSAFE_HELD_OUT = 30
HH_SPLIT = "held-out-2"
TARGET_HARM_RATE = 0.0
TARGET_REWRITE_RATE = 0.6


@dataclass(frozen=True)
class Item:
    source: str  # the dataset, or the probe's class
    prompt: str
    context: str | None
    expectations: Expectations


@dataclass
class Outcome:
    source: str
    prompt: str
    context: str | None
    candidate: str | None
    optimized: str | None
    fallback_reason: str | None
    stop_reason: str | None
    error: str | None
    latency_s: float
    tokens_out: int
    raw: str | None = None  # the engine's completion as it came, before cleaning and guards
    finish_reason: str | None = None
    completion_tokens: int = 0
    candidate_failed: dict[str, str] = field(default_factory=dict)
    final_failed: dict[str, str] = field(default_factory=dict)

    @property
    def rewritten(self) -> bool:
        return self.optimized is not None and self.optimized != self.prompt

    @property
    def harmful(self) -> bool:
        return self.rewritten and bool(self.final_failed)


def evenly_spaced(records: Sequence[CorpusRecord], count: int) -> list[CorpusRecord]:
    if count >= len(records):
        return list(records)
    step = len(records) / count
    return [records[int(index * step)] for index in range(count)]


def dataset_items() -> list[list[Item]]:
    sources: list[list[Item]] = []
    for name, count in DATASET_COUNTS.items():
        path = BPO_VAL if name == "bpo-val" else builtin_dataset_path(name)
        records = [record for record in read_corpus(path) if isinstance(record, CorpusRecord)]
        sources.append(
            [Item(name, record.prompt, record.context, Expectations()) for record in evenly_spaced(records, count)]
        )
    return sources


def probe_items() -> list[Item]:
    items = []
    for line in PROBES.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        expectations = Expectations(
            language=row["language"],
            must_keep=tuple(row["must_keep"]),
            must_keep_ci=tuple(row["must_keep_ci"]),
            must_keep_negated=tuple(row["must_keep_negated"]),
            unsafe=row["unsafe"],
        )
        items.append(Item(row["class"], row["prompt"], None, expectations))
    return items


def unsafe_items(count: int) -> list[Item]:
    rows = [json.loads(line) for line in HH_LABELLED.read_text(encoding="utf-8").splitlines()]
    unsafe = [row for row in rows if row["split"] == HH_SPLIT and row["label"] == "unsafe"][:count]
    return [Item("unsafe-hh", row["prompt"], None, Expectations(unsafe=True)) for row in unsafe]


def interleave(groups: Sequence[Sequence[Item]]) -> list[Item]:
    """One item from each group in turn, so that any prefix (``--limit``) samples every source."""
    merged: list[Item] = []
    longest = max(len(group) for group in groups)
    for index in range(longest):
        merged.extend(group[index] for group in groups if index < len(group))
    return merged


def prompt_set(limit: int | None) -> list[Item]:
    probes = probe_items()
    by_class: dict[str, list[Item]] = {}
    for item in probes:
        by_class.setdefault(item.source, []).append(item)
    items = interleave([*dataset_items(), *by_class.values(), unsafe_items(UNSAFE_HELD_OUT)])
    return items[:limit] if limit else items


class RecordingEngine(EngineClient):
    """Passes every request to the real engine and keeps the completions of the last call; or, replaying, answers
    with the completion an earlier run recorded (``recorded``, set before each prompt)."""

    def __init__(self, inner: EngineClient) -> None:
        super().__init__(inner.identity, inner.context_length)
        self.inner = inner
        self.engine_name = inner.engine_name
        self.last: list[Completion] = []
        self.recorded: Completion | None = None

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        if self.recorded is not None:
            self.last = [self.recorded for _ in requests]
        else:
            self.last = await self.inner.generate(requests)
        return self.last

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return self.inner.count_prompt_tokens(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def checked(item: Item, text: str | None) -> dict[str, str]:
    if text is None:
        return {}
    result: CheckResult = check(item.prompt, text, item.expectations)
    return result.failed


async def run_item(optimizer: PromptOptimizer, engine: RecordingEngine, item: Item) -> Outcome:
    engine.last = []
    started = time.perf_counter()
    (outcome,) = await optimizer.optimize_batch([PromptInput(item.prompt, item.context)])
    latency = time.perf_counter() - started
    if engine.recorded is not None:  # replaying: the live run's time per prompt (a replay of a replay keeps it)
        latency = engine.recorded.latency_s
    candidate = None
    if engine.last:
        segmented = segment(item.prompt, item.context)
        candidate = reassemble(clean_rewrite(engine.last[0].text), segmented).prompt
    raw = engine.last[0] if engine.last else None
    recorded: dict[str, Any] = {}
    if raw is not None:
        recorded = {"raw": raw.text, "finish_reason": raw.finish_reason, "completion_tokens": raw.completion_tokens}
    if not isinstance(outcome, RewriteResult):
        return Outcome(
            item.source, item.prompt, item.context, candidate, None, None, None, outcome.error, latency, 0, **recorded
        )
    result = Outcome(
        item.source,
        item.prompt,
        item.context,
        candidate,
        outcome.optimized,
        outcome.fallback_reason,
        outcome.stop_reason,
        None,
        latency,
        outcome.tokens_out,
        **recorded,
    )
    result.candidate_failed = checked(item, candidate)
    result.final_failed = checked(item, outcome.optimized) if result.rewritten else {}
    return result


def rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    done = [o for o in outcomes if o.optimized is not None]
    rewritten = [o for o in done if o.rewritten]
    harmful = [o for o in done if o.harmful]
    failing = [o for o in done if o.candidate is not None and o.candidate_failed]
    caught = [o for o in failing if o.fallback_reason is not None]
    rejected = [o for o in done if o.fallback_reason is not None]
    falsely = [o for o in rejected if o.candidate is not None and not o.candidate_failed]
    latencies = sorted(o.latency_s for o in done)
    return {
        "prompts": len(outcomes),
        "errors": len(outcomes) - len(done),
        "rewritten": len(rewritten),
        "rewrite_rate": rate(len(rewritten), len(done)),
        "harmful": len(harmful),
        "harm_rate": rate(len(harmful), len(done)),
        "harm_rate_of_rewrites": rate(len(harmful), len(rewritten)),
        "candidates_failing_a_check": len(failing),
        "caught": len(caught),
        "guard_catch_rate": rate(len(caught), len(failing)),
        "rejected": len(rejected),
        "false_rejections": len(falsely),
        "median_latency_s": round(statistics.median(latencies), 3) if latencies else None,
        "p90_latency_s": round(latencies[int(0.9 * (len(latencies) - 1))], 3) if latencies else None,
        "median_tokens_out": statistics.median(o.tokens_out for o in done) if done else None,
        "fallback_reasons": dict(Counter(o.fallback_reason for o in rejected).most_common()),
        "harm_by_check": dict(Counter(name for o in harmful for name in o.final_failed).most_common()),
        "caught_by_check": dict(Counter(name for o in caught for name in o.candidate_failed).most_common()),
    }


def recorded_completions(run: dict[str, Any]) -> dict[tuple[str, str], Completion]:
    """An earlier run's raw completions by (source, prompt), for ``--replay``."""
    completions = {}
    for item in run["items"]:
        if item.get("raw") is not None:
            completions[(item["source"], item["prompt"])] = Completion(
                item["raw"], 0, item["completion_tokens"], item["finish_reason"], item["latency_s"]
            )
    return completions


async def run_optimizer(
    name: str,
    model: str,
    items: Sequence[Item],
    params: OptimizeParams,
    threads: int,
    settings: BpoSettings,
    replay: dict[tuple[str, str], Completion] | None = None,
) -> dict[str, Any]:
    catalogue = ModelCatalogue()
    preparer = ModelPreparer(settings.models_dir)
    spec = catalogue.resolve(model)
    engine_settings = EngineSettings.model_validate(
        {"name": "llamacpp", "model": model, "threads": threads, "context_length": 4096}
    )
    inner = await asyncio.to_thread(build_engine, engine_settings, spec, preparer)
    engine = RecordingEngine(inner)
    optimizer = PromptOptimizer(engine, spec.prompt_style, params)
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    try:
        if replay is None:
            await optimizer.optimize_batch([PromptInput("Say hello.")])  # warm-up: load and first prompt
        for number, item in enumerate(items, start=1):
            if replay is not None:
                engine.recorded = replay.get((item.source, item.prompt))
                if engine.recorded is None:
                    raise SystemExit(f"--replay: the recorded run of {name} has no completion for {item.prompt[:60]!r}")
            outcomes.append(await run_item(optimizer, engine, item))
            last = outcomes[-1]
            marker = "HARM " if last.harmful else ("kept " if not last.rewritten else "ok   ")
            print(f"[{name} {number}/{len(items)}] {marker}{last.source}: {last.fallback_reason or ''}", flush=True)
    finally:
        await engine.aclose()
    by_source: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_source.setdefault(outcome.source, []).append(outcome)
    return {
        "optimizer": name,
        "prompt_style": spec.prompt_style.value,
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summarize(outcomes),
        "by_source": {source: summarize(group) for source, group in by_source.items()},
        "items": [asdict(outcome) for outcome in outcomes],
    }


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def render(payload: dict[str, Any]) -> str:
    settings = payload["settings"]
    replayed = [run["optimizer"] for run in payload["runs"] if run.get("settings", {}).get("replayed_from")]
    lines = [
        "# Rewrite quality",
        "",
        f"{settings['prompts']} prompts ({settings['composition']}); llama.cpp, {settings['threads']} threads; "
        f"temperature {settings['temperature']}, top_p {settings['top_p']}, seed {settings['seed']}, at most "
        f"{settings['max_new_tokens']} new tokens, one round. Harm: a final prompt that differs from the original "
        "and fails a check of benchmarks/rewrite_checks.py (independent of the guards). Target: harm rate "
        f"{percent(TARGET_HARM_RATE)} at a rewrite rate of at least {percent(TARGET_REWRITE_RATE)}.",
        "",
        *(
            [
                f"Candidates of {', '.join(replayed)}: the raw completions a live run of the same settings recorded "
                "(each item's `raw` in the JSON), cleaned, guarded and checked again by the current code "
                "(`--replay`); latency: the live run's per prompt.",
                "",
            ]
            if replayed
            else []
        ),
        "| optimizer | prompts | rewrite rate | harm rate | harm / rewrites | guard catch rate | false rejections "
        "| median s | p90 s | run s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in payload["runs"]:
        s = run["summary"]
        lines.append(
            f"| {run['optimizer']} | {s['prompts']} | {percent(s['rewrite_rate'])} | {percent(s['harm_rate'])} "
            f"({s['harmful']}) | {percent(s['harm_rate_of_rewrites'])} | {percent(s['guard_catch_rate'])} "
            f"({s['caught']}/{s['candidates_failing_a_check']}) | {s['false_rejections']} | {s['median_latency_s']} "
            f"| {s['p90_latency_s']} | {run['seconds']} |"
        )
    for run in payload["runs"]:
        lines += [
            "",
            f"## {run['optimizer']} by source",
            "",
            "| source | prompts | rewrite rate | harmful | caught / failing candidates | fallback reasons |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for source, s in run["by_source"].items():
            reasons = ", ".join(f"{reason} {count}" for reason, count in s["fallback_reasons"].items())
            lines.append(
                f"| {source} | {s['prompts']} | {percent(s['rewrite_rate'])} | {s['harmful']} | "
                f"{s['caught']}/{s['candidates_failing_a_check']} | {reasons} |"
            )
        s = run["summary"]
        lines += [
            "",
            f"Harm by check: {s['harm_by_check'] or 'none'}. Checks failed by the candidates the guards caught: "
            f"{s['caught_by_check'] or 'none'}.",
        ]
        harms = [item for item in run["items"] if item["optimized"] and item["final_failed"]
                 and item["optimized"] != item["prompt"]]  # fmt: skip
        if harms:
            lines += ["", "Harmful rewrites (original → rewrite; failed checks):", ""]
            for item in harms[:20]:
                lines.append(f"- `{item['prompt'][:100]!r}` → `{item['optimized'][:160]!r}`; {item['final_failed']}")
    return "\n".join(lines) + "\n"


def code_digest() -> str:
    """What decides an optimizer's outcomes besides the model: the optimizer's code (prompts, cleaning, guards),
    the checks and the probes. A stored run with another digest is stale and is run again."""
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "bpo" / "optimizer").glob("*.py"), ROOT / "benchmarks" / "rewrite_checks.py", PROBES]):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def same_settings(stored: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    def key(settings: dict[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in settings.items() if name != "replayed_from"}

    return stored is not None and key(stored) == key(current)


def write_results(out: Path, stem: str, payload: dict[str, Any]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    table = render(payload)
    (out / f"{stem}.md").write_text(table)
    return table


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS)
    parser.add_argument("--limit", type=int, default=None, help="the first N prompts of the set")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="rewrite_quality", help="file name stem of the results")
    parser.add_argument("--replay", type=Path, default=None, help="answer with an earlier run's raw completions")
    parser.add_argument("--fresh", action="store_true", help="run optimizers whose current results are stored too")
    args = parser.parse_args()

    items = prompt_set(args.limit)
    params = OptimizeParams(seed=args.seed, max_new_tokens=args.max_new_tokens, rounds=1)
    settings = BpoSettings()
    composition = ", ".join(f"{source} {count}" for source, count in Counter(item.source for item in items).items())
    run_settings = {
        "prompts": len(items),
        "composition": composition,
        "threads": args.threads,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "rounds": 1,
        "checks": list(CHECK_NAMES),
        "code_digest": code_digest(),
        "replayed_from": args.replay.name if args.replay else None,
    }
    # NAME or NAME=PATH: a model of one's own (e.g. a GGUF `bpo train` wrote), reported under NAME.
    optimizers = [
        (label, model or label) for label, _, model in (n.partition("=") for n in args.optimizers.split(",") if n)
    ]
    labels = [label for label, _ in optimizers]
    results_path = args.out / f"{args.name}.json"
    stored = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    # Runs of these settings stay (a long run that stops loses only the optimizer in progress); others are stale.
    # A replayed run counts as current: seeded sampling gives a live run the same candidates.
    runs = [run for run in stored["runs"] if same_settings(run.get("settings"), run_settings)]
    recorded = json.loads(args.replay.read_text())["runs"] if args.replay else []
    payload: dict[str, Any] = {
        "benchmark": "rewrite_quality",
        "machine": {"threads": args.threads, "platform": platform.platform(), "processor": platform.processor()},
        "settings": run_settings,
        "runs": runs,
    }
    for label, model in optimizers:
        if not args.fresh and not args.replay and any(run["optimizer"] == label for run in runs):
            print(f"{label}: current results stored, not run again (--fresh reruns)", flush=True)
            continue
        replay = None
        if args.replay:
            (source_run,) = [run for run in recorded if run["optimizer"] == label] or [None]
            if source_run is None:
                raise SystemExit(f"--replay: {args.replay} has no run of {label}")
            replay = recorded_completions(source_run)
        run = await run_optimizer(label, model, items, params, args.threads, settings, replay)
        run["settings"] = run_settings
        runs[:] = [other for other in runs if other["optimizer"] != label] + [run]
        runs.sort(key=lambda other: labels.index(other["optimizer"]) if other["optimizer"] in labels else len(labels))
        write_results(args.out, args.name, payload)
        print(json.dumps({"optimizer": label} | run["summary"]), flush=True)
    if not runs:
        print("no optimizer was run and none is stored", file=sys.stderr)
        return 1
    print(write_results(args.out, args.name, payload))
    errors = sum(run["summary"]["errors"] for run in runs)
    if errors:
        print(f"{errors} prompts failed to optimize (see the JSON)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
