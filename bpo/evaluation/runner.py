"""Running an evaluation through the platform's jobs: one job per (set, optimizer variant, rounds).

Every job rewrites the set's prompts with its variant's optimizer for its number of rounds, has the target
answer the original and the rewritten prompt, and has the judge compare the two in both orders. The jobs run
side by side on the platform; their stored items become :class:`Comparison` objects.

Rounds: the job for ``r`` rounds rewrites each prompt ``r`` times. The optimizer's per-item seed depends
on the round's input text, so the job for ``r`` rounds passes through the same intermediate rewrites as the
job for ``r + 1``: "round ``r`` kept the prompt unchanged" is read by comparing the two jobs' rewrites.
Answers are greedy, so the original prompt gets the same answer in every job.

The plan (which job serves which comparison) is written to ``plan.json`` in the output folder as soon as a
job is submitted: running the same evaluation again with that folder waits for those jobs instead of
submitting new ones, so a client that was stopped loses nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from bpo.corpus.formats import BUILTIN_DATASETS, CorpusError, builtin_dataset_path
from bpo.errors import InvalidConfigurationError
from bpo.evaluation.outcomes import Comparison, ItemOutcome, Winner
from bpo.pipeline.client import JobsClient, corpus_entries
from bpo.v1 import bpo_pb2 as pb

PLAN_FILE = "plan.json"
VARIANT_BPO = "bpo"
VARIANT_NO_FEEDBACK = "no-feedback"


@dataclass(frozen=True, slots=True)
class Variant:
    """An optimizer under evaluation: ``bpo`` (the preference-trained one) or an ablation."""

    name: str
    optimizer_model: str


@dataclass(frozen=True, slots=True)
class EvalPlan:
    sets: tuple[str, ...]
    variants: tuple[Variant, ...]
    rounds: int
    limit: int | None
    target: pb.ModelEndpoint
    judge: pb.ModelEndpoint
    judge_template: str
    seed: int

    def settings(self) -> dict[str, Any]:
        return {
            "sets": list(self.sets),
            "variants": [asdict(v) for v in self.variants],
            "rounds": self.rounds,
            "limit": self.limit,
            "target": json_format.MessageToDict(self.target, preserving_proto_field_name=True),
            "judge": json_format.MessageToDict(self.judge, preserving_proto_field_name=True),
            "judge_template": self.judge_template,
            "seed": self.seed,
        }


@dataclass(frozen=True, slots=True)
class PlannedJob:
    set_name: str
    variant: str
    optimizer_model: str
    rounds: int
    job_id: str


def corpus_path(set_name: str) -> Path:
    """A shipped test set by name, or any corpus file (JSONL, JSON or CSV)."""
    if set_name in BUILTIN_DATASETS:
        return builtin_dataset_path(set_name)
    path = Path(set_name)
    if not path.is_file():
        raise InvalidConfigurationError(
            f"--set {set_name!r} is neither a shipped set ({', '.join(BUILTIN_DATASETS)}) nor a file"
        )
    return path


def set_label(set_name: str) -> str:
    return set_name if set_name in BUILTIN_DATASETS else Path(set_name).stem


def job_spec(plan: EvalPlan, set_name: str, variant: Variant, rounds: int) -> pb.JobSpec:
    params = pb.OptimizeParams(rounds=rounds, seed=plan.seed)
    return pb.JobSpec(
        name=f"eval/{set_label(set_name)}/{variant.name}/r{rounds}",
        optimizer_model=variant.optimizer_model,
        params=params,
        target=plan.target,
        judge=plan.judge,
        judge_template=plan.judge_template,
    )


def item_outcome(item: dict[str, Any]) -> ItemOutcome | None:
    """An exported item as an outcome; ``None`` when it has no verdict (it failed, or was cancelled)."""
    verdict = item.get("verdict")
    if not isinstance(verdict, dict):
        return None
    rewrite = item.get("rewrite") or {}
    answers = verdict.get("answers") or item.get("answers") or {}
    judgements = verdict.get("judgements") or []
    winner: Winner = item.get("winner") or "tie"
    return ItemOutcome(
        item_id=str(item["item_id"]),
        source_id=str(item["source_id"]),
        category=item.get("category") or "",
        prompt=item["prompt"],
        optimized_prompt=rewrite.get("optimized", item["prompt"]),
        original_answer=answers.get("original_answer", ""),
        optimized_answer=answers.get("optimized_answer", ""),
        winner=winner,
        judged_orders=len(judgements),
        position_consistent=bool(verdict.get("position_consistent", False)),
        verdicts=tuple(str(j.get("verdict", "")) for j in judgements),
        rounds_done=int(rewrite.get("rounds_done", 1) or 1),
        fallback_reason=rewrite.get("fallback_reason", "") or "",
    )


def _failure(item: dict[str, Any]) -> str:
    return f"line {item.get('line')}: [{item.get('failed_stage') or 'unknown'}] {item.get('error') or 'failed'}"


class EvalRunner:
    def __init__(self, client: JobsClient, out_dir: Path) -> None:
        self._client = client
        self._out_dir = out_dir

    def _load_plan(self, plan: EvalPlan) -> dict[str, PlannedJob]:
        path = self._out_dir / PLAN_FILE
        if not path.exists():
            return {}
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("settings") != plan.settings():
            raise InvalidConfigurationError(
                f"{path} belongs to an evaluation with other settings; use another --out folder"
            )
        return {job["key"]: PlannedJob(**job["job"]) for job in saved.get("jobs", [])}

    def _save_plan(self, plan: EvalPlan, jobs: dict[str, PlannedJob]) -> None:
        self._out_dir.mkdir(parents=True, exist_ok=True)
        payload = {"settings": plan.settings(), "jobs": [{"key": k, "job": asdict(j)} for k, j in jobs.items()]}
        tmp = self._out_dir / (PLAN_FILE + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        tmp.replace(self._out_dir / PLAN_FILE)

    def submit(self, plan: EvalPlan, on_bad_line: Callable[[str, CorpusError], None] | None = None) -> list[PlannedJob]:
        """Submit every job the plan needs that an earlier run with this output folder has not."""
        jobs = self._load_plan(plan)
        for set_name in plan.sets:
            corpus = corpus_path(set_name)
            for variant in plan.variants:
                for rounds in range(1, plan.rounds + 1):
                    key = f"{set_name}|{variant.name}|{rounds}"
                    if key in jobs:
                        continue
                    spec = job_spec(plan, set_name, variant, rounds)
                    report = None if on_bad_line is None else (lambda e, s=set_name: on_bad_line(s, e))
                    reply = self._client.submit(spec, corpus_entries(corpus, None, plan.limit), report)
                    jobs[key] = PlannedJob(set_name, variant.name, variant.optimizer_model, rounds, reply.job_id)
                    self._save_plan(plan, jobs)
        return list(jobs.values())

    def wait(
        self, jobs: Sequence[PlannedJob], on_progress: Callable[[list[pb.Job]], None] | None = None
    ) -> list[pb.Job]:
        return self._client.wait([job.job_id for job in jobs], on_progress)

    def comparisons(self, jobs: Sequence[PlannedJob]) -> list[Comparison]:
        """Each job's items as a comparison, in plan order (set, variant, rounds)."""
        result = []
        for job in jobs:
            outcomes: list[ItemOutcome] = []
            failures: list[str] = []
            for item in self._client.export(job.job_id):
                outcome = item_outcome(item)
                if outcome is not None:
                    outcomes.append(outcome)
                elif item.get("status") == "failed":
                    failures.append(_failure(item))
            report = self._client.report(job.job_id)
            rejected = [f"line {f.line}: {f.reason}" for f in report.failures if not f.item_id]
            result.append(
                Comparison(
                    set_name=set_label(job.set_name),
                    variant=job.variant,
                    optimizer_model=job.optimizer_model,
                    rounds=job.rounds,
                    job_id=job.job_id,
                    items=tuple(outcomes),
                    failed=len(failures) + len(rejected),
                    failures=tuple(rejected + failures),
                )
            )
        return result


def with_kept_by_round(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """Fill ``kept_by_last_round``: the share of items whose round-``r`` rewrite equals round ``r - 1``'s
    (round 0 being the original prompt). Needs the round ``r - 1`` comparison of the same set and variant."""
    by_key = {(c.set_name, c.variant, c.rounds): {i.source_id: i for i in c.items} for c in comparisons}
    result = []
    for comparison in comparisons:
        previous = by_key.get((comparison.set_name, comparison.variant, comparison.rounds - 1))
        pairs = []
        for outcome in comparison.items:
            if comparison.rounds == 1:
                pairs.append((outcome.prompt, outcome.optimized_prompt))
            elif previous is not None and outcome.source_id in previous:
                pairs.append((previous[outcome.source_id].optimized_prompt, outcome.optimized_prompt))
        share = sum(before == after for before, after in pairs) / len(pairs) if pairs else None
        result.append(replace(comparison, kept_by_last_round=share))
    return result
