"""``bpo eval`` and ``bpo augment``: the paper's experiments as commands, run through the platform's jobs."""

from __future__ import annotations

import json
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from tqdm import tqdm

from bpo.cli.jobs_cmd import MaxFailureRate, endpoint, jobs_address, require_success
from bpo.corpus.formats import CorpusError
from bpo.errors import InvalidConfigurationError
from bpo.evaluation.augment import alpaca_record
from bpo.evaluation.calibration import calibration_status
from bpo.evaluation.report import EvalReport, write_report
from bpo.evaluation.runner import (
    VARIANT_BPO,
    VARIANT_NO_FEEDBACK,
    EvalPlan,
    EvalRunner,
    Variant,
    corpus_path,
    with_kept_by_round,
)
from bpo.judging.pairwise import DEFAULT_JUDGE_TEMPLATE, JUDGE_TEMPLATES
from bpo.pipeline.client import JobsClient, corpus_entries
from bpo.pipeline.jobspec import DEFAULT_JUDGE_TOKENS
from bpo.pipeline.outcome import JobOutcome
from bpo.settings import BpoSettings
from bpo.v1 import bpo_pb2 as pb

ABLATIONS = (VARIANT_NO_FEEDBACK,)


def _progress_bar(total_items: int) -> tuple[tqdm[Any], Any]:
    bar = tqdm(total=total_items, desc="items finished", unit="item", file=sys.stderr)

    def update(jobs: list[pb.Job]) -> None:
        bar.n = sum(job.progress.finished for job in jobs)
        bar.refresh()

    return bar, update


def _bad_line(set_name: str, entry: CorpusError) -> None:
    typer.secho(f"{set_name} line {entry.line}: {entry.reason}", fg=typer.colors.YELLOW, err=True)


def eval_(
    sets: Annotated[
        list[str],
        typer.Option("--set", help="vicuna, dolly, self-instruct, bpo-test, or a corpus file; repeatable."),
    ],
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N prompts of each set.")] = None,
    target: Annotated[str | None, typer.Option(help="Target: a declared endpoint (default: the platform's).")] = None,
    target_max_tokens: Annotated[int, typer.Option(help="Max new tokens of each answer (0: default).")] = 0,
    judge: Annotated[str | None, typer.Option(help="Judge: a declared endpoint (default: the platform's).")] = None,
    judge_max_tokens: Annotated[int, typer.Option(help="Max new tokens of each judgement (0: default).")] = 0,
    judge_template: Annotated[
        str,
        typer.Option(
            help="pair-v2 (MT-bench, as the paper ran it), ranking (AlpacaEval style), or either with prompting "
            "variants (+rubric, +verdict-first, +vote3; see `bpo judge calibrate`)."
        ),
    ] = DEFAULT_JUDGE_TEMPLATE,
    optimizer: Annotated[str | None, typer.Option(help="The trained optimizer (default: the platform's).")] = None,
    rounds: Annotated[int, typer.Option(min=1, max=5, help="Evaluate rounds 1..N of iterative rewriting.")] = 1,
    ablation: Annotated[
        str | None, typer.Option(help="no-feedback: also rewrite with an LLM told to improve the prompt.")
    ] = None,
    ablation_model: Annotated[
        str | None, typer.Option(help="The model prompted directly for the ablation (default: the platform's).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the optimizer's sampling and the bootstrap.")] = 0,
    bootstrap: Annotated[int, typer.Option(min=100, help="Bootstrap resamples for the 95% intervals.")] = 2000,
    out: Annotated[Path, typer.Option(help="Report folder (also holds plan.json for resuming).")] = Path("eval-report"),
    max_failure_rate: MaxFailureRate = 0.0,
) -> None:
    """Original vs optimized answers, judged in both orders (the paper's Table 3 protocol), as a report.

    The report shows the judge's calibration (`bpo judge calibrate`) beside every ΔWR and warns, in the report
    and on stderr, when there is none or the judge's accuracy interval includes 50%.
    Exits non-zero when a job's items failed beyond --max-failure-rate, or a comparison has no judged item."""
    settings = BpoSettings()
    if judge_template not in JUDGE_TEMPLATES:
        raise InvalidConfigurationError(f"--judge-template must be one of {', '.join(JUDGE_TEMPLATES)}")
    if ablation is not None and ablation not in ABLATIONS:
        raise InvalidConfigurationError(f"--ablation must be one of {', '.join(ABLATIONS)}")
    for set_name in sets:
        corpus_path(set_name)  # fail before submitting anything
    variants = [Variant(VARIANT_BPO, optimizer or settings.platform.optimizer_model)]
    if ablation == VARIANT_NO_FEEDBACK:
        variants.append(Variant(VARIANT_NO_FEEDBACK, ablation_model or settings.platform.optimizer_model))
    plan = EvalPlan(
        sets=tuple(sets),
        variants=tuple(variants),
        rounds=rounds,
        limit=limit,
        target=endpoint(target or settings.platform.target_model, target_max_tokens),
        judge=endpoint(judge or settings.platform.judge_model, judge_max_tokens),
        judge_template=judge_template,
        seed=seed,
    )
    calibration = calibration_status(
        settings, plan.judge.model, judge_template, judge_max_tokens or DEFAULT_JUDGE_TOKENS
    )
    with JobsClient(jobs_address(settings), settings) as client:
        runner = EvalRunner(client, out)
        jobs = runner.submit(plan, _bad_line)
        typer.secho(f"{len(jobs)} jobs: " + ", ".join(j.job_id for j in jobs), err=True)
        total = sum(client.get(job.job_id).progress.items for job in jobs)
        bar, update = _progress_bar(total)
        try:
            runner.wait(jobs, update)
        finally:
            bar.close()
        comparisons = with_kept_by_round(runner.comparisons(jobs))
        outcomes = [JobOutcome.of(client.report(job.job_id)) for job in jobs]
    report = EvalReport(
        title="BPO evaluation: " + ", ".join(sets),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        settings=plan.settings() | {"bootstrap": bootstrap, "command": shlex.join(["bpo", *sys.argv[1:]])},
        comparisons=tuple(comparisons),
        judge_calibration=calibration,
    )
    paths = write_report(report, out, bootstrap_samples=bootstrap, seed=seed)
    markdown = paths["markdown"].read_text(encoding="utf-8")
    typer.echo("## Results" + markdown.split("\n## Results", 1)[1].split("\n## ", 1)[0].rstrip())
    for warning in report.judge_warnings():
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.secho("report: " + ", ".join(str(p) for p in paths.values()), err=True)
    empty = [
        f"{c.set_name} / {c.variant} / {c.rounds} round(s) (job {c.job_id}): no item was judged, n = 0"
        for c in comparisons
        if not c.items
    ]
    require_success(outcomes, max_failure_rate, empty)


def augment(
    path: Annotated[Path, typer.Argument(help="Instruction dataset: Alpaca JSON/JSONL, or any prompt corpus.")],
    model: Annotated[str | None, typer.Option(help="The declared endpoint that regenerates the answers.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Max new tokens of each answer (0: default).")] = 0,
    optimizer: Annotated[str | None, typer.Option(help="Optimizer model (default: the platform's).")] = None,
    rounds: Annotated[int, typer.Option(min=1, max=5, help="Iterative rewriting rounds.")] = 1,
    seed: Annotated[int, typer.Option(help="Seeds the optimizer's sampling.")] = 0,
    field: Annotated[str | None, typer.Option(help="The instruction field (default: detected).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N records.")] = None,
    out: Annotated[Path, typer.Option(help="Alpaca-format JSONL to write.")] = Path("augmented.jsonl"),
    max_failure_rate: MaxFailureRate = 0.0,
) -> None:
    """Optimize a dataset's instructions, regenerate the answers, and write Alpaca-format JSONL.

    Each line: instruction (the original), input, output (the answer to the optimized instruction),
    optimized_instruction, and original_output (the same model's answer to the original instruction).
    """
    settings = BpoSettings()
    spec = pb.JobSpec(
        name=f"augment/{path.stem}",
        optimizer_model=optimizer or "",
        params=pb.OptimizeParams(rounds=rounds, seed=seed),
        target=endpoint(model, max_tokens),
        stages=[pb.STAGE_REWRITE, pb.STAGE_GENERATE],
    )
    with JobsClient(jobs_address(settings), settings) as client:
        reply = client.submit(spec, corpus_entries(path, field, limit), lambda e: _bad_line(path.name, e))
        typer.secho(f"job {reply.job_id}: accepted {reply.accepted}, rejected {reply.rejected}", err=True)
        bar, update = _progress_bar(int(reply.accepted))
        try:
            client.wait([reply.job_id], update)
        finally:
            bar.close()
        written = failed = 0
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as handle:
            for item in client.export(reply.job_id):
                record = alpaca_record(item)
                if record is None:
                    failed += 1
                    typer.secho(f"line {item.get('line')}: {item.get('error') or 'not answered'}", err=True)
                    continue
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
        outcome = JobOutcome.of(client.report(reply.job_id))
    typer.echo(json.dumps({"output": str(out), "written": written, "failed": failed + int(reply.rejected)}))
    require_success([outcome], max_failure_rate, [] if written else [f"job {reply.job_id}: nothing was written"])
