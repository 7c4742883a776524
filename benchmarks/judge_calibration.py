"""Judge calibration per (judge model, judge template): how often each packaged model, prompted each way, agrees
with recorded human preferences on known pairs, judged in both orders.

Every configuration judges the same pairs: ``--limit`` known pairs (default 40, half BPO construction records
of OASST1/HH-RLHF origin, half HH-RLHF harmless-base; at most 600 words each) chosen with ``--seed``, through
the same code as ``bpo judge calibrate`` (the endpoint's engine in this process, llama.cpp on the CPU by
default). Reasoning-first templates get ``--reasoning-tokens`` new tokens a judgement (default 160),
verdict-first ones ``--verdict-tokens`` (default 24), ranking ``--ranking-tokens`` (default 64). Each
calibration is also stored for ``bpo eval`` reports, as ``bpo judge calibrate`` stores it.

Results are written after every configuration, and a configuration already in the results with the same pairs
and settings is not run again (``--fresh`` reruns everything): a long run that stops loses only the
configuration in progress.

    python benchmarks/judge_calibration.py [--configs MODEL:TEMPLATE,...] [--limit 80] [--seed 0] [--fresh]

Writes benchmarks/results/judge_calibration.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bpo.evaluation.calibration import (
    CHANCE_ACCURACY,
    CalibrationStore,
    CalibrationSummary,
    calibrate_endpoint,
    percent,
    rate_ci,
)
from bpo.judging.calibration import DEFAULT_MAX_PAIR_WORDS, packaged_pairs, select_pairs
from bpo.judging.pairwise import JudgeTemplateSpec
from bpo.settings import BpoSettings

RESULTS = Path(__file__).parent / "results"
RESULTS_JSON = RESULTS / "judge_calibration.json"
RESULTS_MARKDOWN = RESULTS / "judge_calibration.md"

SMOLLM2 = "smollm2-135m-instruct"
QWEN_05B = "qwen2.5-coder-0.5b-instruct"
QWEN_15B = "qwen2.5-coder-1.5b-instruct"
# Cheapest first: a run that stops early has measured the most configurations. Each reasoning-first judgement
# costs about three verdict-first ones on this CPU, a 1.5B one about three 0.5B ones.
DEFAULT_CONFIGS = (
    f"{SMOLLM2}:pair-v2+verdict-first,{QWEN_05B}:pair-v2+verdict-first,{QWEN_05B}:pair-v2+rubric+verdict-first,"
    f"{QWEN_05B}:pair-v2,{QWEN_15B}:pair-v2+verdict-first,{QWEN_15B}:pair-v2+rubric+verdict-first,"
    f"{QWEN_05B}:pair-v2+rubric+verdict-first+vote3,{QWEN_15B}:pair-v2"
)


@dataclass(frozen=True, slots=True)
class Config:
    model: str
    template: str
    max_tokens: int

    @property
    def key(self) -> str:
        return f"{self.model}|{self.template}|{self.max_tokens}"


def parse_configs(text: str, reasoning_tokens: int, verdict_tokens: int, ranking_tokens: int) -> list[Config]:
    """``MODEL:TEMPLATE`` items, comma-separated; the template decides the token budget."""
    configs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        model, _, template = item.partition(":")
        spec = JudgeTemplateSpec.parse(template)
        if spec.base == "ranking":
            tokens = ranking_tokens
        else:
            tokens = verdict_tokens if spec.verdict_first else reasoning_tokens
        configs.append(Config(model, spec.name, tokens))
    return configs


def load_results(fresh: bool, run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run with the same pairs and settings, by configuration key; none with ``fresh``."""
    if fresh or not RESULTS_JSON.exists():
        return {}
    saved = json.loads(RESULTS_JSON.read_text(encoding="utf-8"))
    if saved.get("run") != run:
        return {}
    return {row["config"]: row for row in saved.get("rows", [])}


def render_table(rows: list[dict[str, Any]], run: dict[str, Any]) -> str:
    lines = [
        "# Judge calibration of the packaged models",
        "",
        f"{run['pairs']} known pairs (BPO construction records of OASST1/HH-RLHF origin and HH-RLHF harmless-base "
        f"single-turn pairs, half each, at most {run['max_pair_words']} words, seed {run['seed']}), each judged in "
        "both orders; llama.cpp on this machine's CPU. Accuracy counts a tie as half (chance: 50%). Intervals: "
        f"95% percentile bootstrap over pairs ({run['bootstrap_samples']} resamples).",
        "",
        "| judge model | template | max tokens | n | accuracy [95% CI] | accuracy when decided | position consistency "
        "| tie rate | first-shown picks | unreadable orders | s/pair | above chance |",
        "|---|---|---:|---:|---|---|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        summary = CalibrationSummary.from_dict(row["summary"])
        lines.append(
            f"| {row['model']} | {row['template']} | {row['max_tokens']} | {summary.n} "
            f"| {rate_ci(summary.accuracy, summary.accuracy_ci)} "
            f"| {rate_ci(summary.decided_accuracy, summary.decided_accuracy_ci)} "
            f"| {rate_ci(summary.position_consistency, summary.position_consistency_ci)} "
            f"| {rate_ci(summary.tie_rate, summary.tie_rate_ci)} "
            f"| {'—' if summary.first_shown_share is None else percent(summary.first_shown_share)} "
            f"| {percent(summary.unreadable_rate)} | {row['seconds'] / max(summary.n, 1):.1f} "
            f"| {'yes' if summary.accuracy_ci[0] > CHANCE_ACCURACY else 'no'} |"
        )
    lines += ["", "By source of the preference (accuracy [95% CI], n):", ""]
    groups = sorted({name for row in rows for name in row["groups"]})
    lines += ["| judge model | template | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
    for row in rows:
        cells = []
        for name in groups:
            group = row["groups"].get(name)
            if group is None:
                cells.append("—")
                continue
            summary = CalibrationSummary.from_dict(group)
            cells.append(f"{rate_ci(summary.accuracy, summary.accuracy_ci)}, n={summary.n}")
        lines.append(f"| {row['model']} | {row['template']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict[str, Any]], run: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "benchmark": "judge_calibration",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "run": run,
        "rows": rows,
    }
    RESULTS_JSON.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    RESULTS_MARKDOWN.write_text(render_table(rows, run), encoding="utf-8")


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="MODEL:TEMPLATE, comma-separated")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-pair-words", type=int, default=DEFAULT_MAX_PAIR_WORDS)
    parser.add_argument("--reasoning-tokens", type=int, default=160)
    parser.add_argument("--verdict-tokens", type=int, default=24)
    parser.add_argument("--ranking-tokens", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--fresh", action="store_true", help="Rerun configurations already in the results.")
    args = parser.parse_args()

    configs = parse_configs(args.configs, args.reasoning_tokens, args.verdict_tokens, args.ranking_tokens)
    settings = BpoSettings()
    pairs = select_pairs(packaged_pairs(), limit=args.limit, seed=args.seed, max_words=args.max_pair_words)
    if not pairs:
        raise SystemExit(f"no known pair of at most {args.max_pair_words} words")
    run = {
        "pairs": len(pairs),
        "pair_ids": sorted(f"{p.dataset}:{p.position}" for p in pairs),
        "max_pair_words": args.max_pair_words,
        "seed": args.seed,
        "bootstrap_samples": args.bootstrap,
        "engine": settings.engine.name,
        "threads": settings.engine.resolved_threads(),
    }
    done = load_results(args.fresh, run)
    store = CalibrationStore.under(settings.state_dir)
    rows: list[dict[str, Any]] = []
    for config in configs:
        row = done.get(config.key)
        if row is None:
            print(
                f"calibrating {config.model} with {config.template} ({config.max_tokens} tokens) ...", file=sys.stderr
            )
            calibration = await calibrate_endpoint(
                settings,
                config.model,
                config.template,
                pairs,
                max_tokens=config.max_tokens,
                seed=args.seed,
                run_settings={"limit": args.limit, "max_pair_words": args.max_pair_words, "benchmark": True},
                bootstrap_samples=args.bootstrap,
            )
            if calibration.summary.n == 0:
                first = calibration.failures[0].reason if calibration.failures else "none recorded"
                raise SystemExit(f"{config.key}: no pair was judged; first failure: {first}")
            store.save(calibration)
            row = {
                "config": config.key,
                "model": config.model,
                "template": config.template,
                "max_tokens": config.max_tokens,
                "model_version": calibration.key.model_version,
                "seconds": round(calibration.seconds, 1),
                "failures": len(calibration.failures),
                "tokens_out": sum(j.tokens_out for j in calibration.judgements),
                "summary": calibration.summary.to_dict(),
                "groups": {name: group.to_dict() for name, group in calibration.groups.items()},
            }
        rows.append(row)
        # Finished rows of an earlier run that this one has not reached yet stay in the file until it does.
        measured = {r["config"] for r in rows}
        write(rows + [r for key, r in done.items() if key not in measured], run)
        print(json.dumps({k: row[k] for k in ("config", "seconds")} | {"summary": row["summary"]}), flush=True)
    write(rows, run)
    print(RESULTS_MARKDOWN.read_text(encoding="utf-8"))


if __name__ == "__main__":
    asyncio.run(main())
