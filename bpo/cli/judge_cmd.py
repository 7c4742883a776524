"""``bpo judge calibrate``: how often a judge agrees with people, measured on known preference pairs, in process."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from tqdm import tqdm

from bpo.errors import InvalidConfigurationError
from bpo.evaluation.calibration import (
    SUMMARY_HEADER,
    CalibrationStore,
    JudgeCalibration,
    calibrate_endpoint,
    calibration_warnings,
    markdown_table,
    percent,
    render_markdown,
    summary_cells,
)
from bpo.judging.calibration import (
    CALIBRATION_SETS,
    DEFAULT_MAX_PAIR_WORDS,
    CalibrationSet,
    packaged_pairs,
    select_pairs,
)
from bpo.judging.pairwise import DEFAULT_JUDGE_TEMPLATE, JudgeTemplateSpec
from bpo.pairs.records import PreferenceRecord
from bpo.pipeline.jobspec import DEFAULT_JUDGE_TOKENS
from bpo.settings import BpoSettings

app = typer.Typer(help="Judges: measure how far their verdicts can be trusted.", no_args_is_help=True)

CALIBRATION_JSON = "calibration.json"
CALIBRATION_MARKDOWN = "calibration.md"


def template_of(name: str) -> str:
    """A judge template name as given, refused with the valid names when it is none of them."""
    try:
        return JudgeTemplateSpec.parse(name).name
    except ValueError as exc:
        raise InvalidConfigurationError(str(exc)) from None


def _calibration_sets(names: list[str]) -> list[CalibrationSet]:
    chosen: list[CalibrationSet] = []
    for name in names:
        match = next((known for known in CALIBRATION_SETS if known == name), None)
        if match is None:
            raise InvalidConfigurationError(f"--set {name!r}: choose from {', '.join(CALIBRATION_SETS)}")
        chosen.append(match)
    return chosen


def _summary_table(calibration: JudgeCalibration) -> str:
    summary = calibration.summary
    rows = [("all", summary.n, *summary_cells(summary))]
    rows += [(name, group.n, *summary_cells(group)) for name, group in calibration.groups.items()]
    table = markdown_table(("pairs from", "n", *SUMMARY_HEADER), rows)
    extra = (
        f"unreadable orders {percent(summary.unreadable_rate)}, truncated orders {percent(summary.truncated_rate)}, "
        f"{len(calibration.failures)} pairs failed, {calibration.seconds:.0f} s"
    )
    return "\n".join([*table, "", extra])


@app.command("calibrate")
def calibrate(
    judge: Annotated[str | None, typer.Option(help="Judge: a declared endpoint (default: the platform's).")] = None,
    template: Annotated[
        str,
        typer.Option(
            help="pair-v2 (MT-bench, as the paper ran it) or ranking (AlpacaEval style), optionally with prompting "
            "variants in this order: +rubric, +verdict-first (pair-v2 only), +vote3 or +vote5; e.g. "
            "pair-v2+rubric+verdict-first."
        ),
    ] = DEFAULT_JUDGE_TEMPLATE,
    limit: Annotated[int, typer.Option(min=1, help="Known pairs to judge, shared equally among the sets.")] = 100,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="bpo (BPO construction records) or hh-rlhf (harmless-base); repeatable."),
    ] = None,
    max_pair_words: Annotated[
        int, typer.Option(min=1, help="Skip pairs whose question and two responses exceed this many words.")
    ] = DEFAULT_MAX_PAIR_WORDS,
    max_tokens: Annotated[
        int, typer.Option(min=0, help=f"Max new tokens of each judgement (0: the platform's, {DEFAULT_JUDGE_TOKENS}).")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seeds the choice of pairs, a vote's samples and the bootstrap.")] = 0,
    bootstrap: Annotated[int, typer.Option(min=100, help="Bootstrap resamples for the 95% intervals.")] = 2000,
    out: Annotated[Path, typer.Option(help="Folder for calibration.json and calibration.md.")] = Path(
        "judge-calibration"
    ),
    max_failure_rate: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of pairs allowed to fail before exiting non-zero (0: none)."),
    ] = 0.0,
) -> None:
    """Judge known preference pairs in both orders with the judge loaded in this process; report accuracy
    against the recorded preference, position consistency and tie rate with bootstrap intervals, and store
    the result for `bpo eval` reports.

    Exits non-zero when no pair was judged or more than --max-failure-rate of them failed."""
    settings = BpoSettings()
    name = judge or settings.platform.judge_model
    template_name = template_of(template)
    chosen_sets = _calibration_sets(sets) if sets else list(CALIBRATION_SETS)
    pool = packaged_pairs(chosen_sets)
    pairs = select_pairs(pool, limit=limit, seed=seed, max_words=max_pair_words)
    if not pairs:
        raise InvalidConfigurationError(f"no known pair of at most {max_pair_words} words in {', '.join(chosen_sets)}")
    run_settings: dict[str, Any] = {
        "sets": chosen_sets,
        "pool": len(pool),
        "limit": limit,
        "max_pair_words": max_pair_words,
        "command": shlex.join(["bpo", *sys.argv[1:]]),
    }
    tokens = max_tokens or DEFAULT_JUDGE_TOKENS
    calibration = asyncio.run(_calibrate(settings, name, template_name, pairs, tokens, seed, bootstrap, run_settings))
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / CALIBRATION_JSON
    json_path.write_text(json.dumps(calibration.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    markdown_path = out / CALIBRATION_MARKDOWN
    markdown_path.write_text(render_markdown(calibration), encoding="utf-8")
    typer.echo(f"## {name} with {template_name} ({calibration.judge_model} {calibration.key.model_version})\n")
    typer.echo(_summary_table(calibration))
    for warning in calibration_warnings(calibration):
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.secho(f"report: {json_path}, {markdown_path}", err=True)
    problems = _problems(calibration, max_failure_rate)
    if not problems:
        stored = CalibrationStore.under(settings.state_dir).save(calibration)
        typer.secho(f"stored for `bpo eval` reports: {stored}", err=True)
    else:
        for problem in problems:
            typer.secho(problem, fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def _problems(calibration: JudgeCalibration, max_failure_rate: float) -> list[str]:
    attempted = calibration.summary.n + len(calibration.failures)
    problems = []
    if calibration.summary.n == 0:
        problems.append(f"no known pair was judged: all {attempted} failed")
    elif len(calibration.failures) > max_failure_rate * attempted:
        problems.append(
            f"{len(calibration.failures)} of {attempted} pairs failed (allowed: {max_failure_rate:.0%}); "
            "the first: " + calibration.failures[0].reason
        )
    return problems


async def _calibrate(
    settings: BpoSettings,
    judge: str,
    template: str,
    pairs: list[PreferenceRecord],
    max_tokens: int,
    seed: int,
    bootstrap: int,
    run_settings: dict[str, Any],
) -> JudgeCalibration:
    with tqdm(total=len(pairs), desc="pairs judged", unit="pair", file=sys.stderr) as bar:

        def advance(count: int) -> None:
            bar.update(count)

        return await calibrate_endpoint(
            settings,
            judge,
            template,
            pairs,
            max_tokens=max_tokens,
            seed=seed,
            run_settings=run_settings,
            bootstrap_samples=bootstrap,
            on_batch=advance,
        )
