"""``bpo optimize``: one prompt, a corpus file, or a shipped test set."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import textwrap
from itertools import islice
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from tqdm import tqdm

from bpo.corpus.formats import (
    CorpusError,
    CorpusRecord,
    ResultWriter,
    builtin_dataset_path,
    completed_ids,
    count_records,
    read_corpus,
)
from bpo.corpus.run import CorpusRunSummary, optimize_corpus
from bpo.engines.factory import open_engine, resolve_spec
from bpo.errors import InvalidConfigurationError
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.optimizer.optimizer import PromptInput, PromptOptimizer, RewriteResult
from bpo.settings import BpoSettings, EngineName


def _settings_with_overrides(
    engine: EngineName | None,
    model: str | None,
    overrides: dict[str, Any],
) -> BpoSettings:
    settings = BpoSettings()
    engine_update: dict[str, Any] = {k: v for k, v in {"name": engine, "model": model}.items() if v is not None}
    if model is not None:
        # --model names exactly what an endpoint receives; a served name from the environment gives way to it.
        engine_update["openai_model"] = None
    optimizer_update = {k: v for k, v in overrides.items() if v is not None}
    return BpoSettings.model_validate(
        {
            "state_dir": settings.state_dir,
            "engine": settings.engine.model_dump() | engine_update,
            "optimizer": settings.optimizer.model_dump() | optimizer_update,
        }
    )


def side_by_side(results: list[tuple[str, RewriteResult]]) -> str:
    width = max(60, min(shutil.get_terminal_size((160, 40)).columns, 200))
    column = (width - 7) // 2
    lines = [f"{'ORIGINAL':<{column}} | OPTIMIZED", "-" * width]
    for label, result in results:
        note = f" [kept original: {result.fallback_reason}]" if result.fallback_reason else ""
        left = textwrap.wrap(f"({label}) {result.original}", column) or [""]
        right = textwrap.wrap(result.optimized + note, column) or [""]
        for index in range(max(len(left), len(right))):
            a = left[index] if index < len(left) else ""
            b = right[index] if index < len(right) else ""
            lines.append(f"{a:<{column}} | {b}")
        lines.append("-" * width)
    return "\n".join(lines)


def optimize(
    text: Annotated[str | None, typer.Argument(help="A prompt to optimize (or use --in / --dataset).")] = None,
    input_path: Annotated[Path | None, typer.Option("--in", help="Corpus file: JSONL, JSON or CSV.")] = None,
    output_path: Annotated[Path | None, typer.Option("--out", help="JSONL results; a re-run skips done ids.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="A shipped test set: vicuna, dolly, self-instruct or bpo-test.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N records of the corpus.", min=1)] = None,
    field: Annotated[str | None, typer.Option(help="The prompt field (default: prompt, text or instruction).")] = None,
    context: Annotated[str | None, typer.Option(help="A passage kept byte-for-byte beside TEXT.")] = None,
    engine: Annotated[EngineName | None, typer.Option(help="Inference engine.")] = None,
    model: Annotated[str | None, typer.Option(help="Catalogue name, local path or hub id.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Iterative rounds (stops early when unchanged).", min=1)] = None,
    seed: Annotated[int | None, typer.Option(help="Makes sampling reproducible.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Default 0.6 (the paper).", min=0)] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Default 0.9 (the paper).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default 1024 (the paper).", min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per engine batch.", min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable results.")] = False,
    max_failure_rate: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of a corpus's prompts allowed to fail before exiting non-zero."),
    ] = 0.0,
) -> None:
    """Rewrite prompts the way the paper's optimizer does, with context preservation and fallbacks.

    A corpus run exits non-zero when more than --max-failure-rate of its prompts failed (each is reported)."""
    sources = [x for x in (text, input_path, dataset) if x is not None]
    if len(sources) != 1:
        raise InvalidConfigurationError("give exactly one of TEXT, --in FILE or --dataset NAME")
    settings = _settings_with_overrides(
        engine,
        model,
        {
            "rounds": rounds,
            "seed": seed,
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
        },
    )
    if input_path is not None and output_path is None:
        raise InvalidConfigurationError("--in needs --out (results are written as JSONL)")
    corpus = input_path if input_path is not None else (builtin_dataset_path(dataset) if dataset else None)
    summary = asyncio.run(_run(settings, text, context, corpus, output_path, field, limit, as_json))
    problem = summary.problem(max_failure_rate) if summary is not None else None
    if problem is not None:
        typer.secho(problem, fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


async def _run(
    settings: BpoSettings,
    text: str | None,
    context: str | None,
    corpus: Path | None,
    output_path: Path | None,
    field: str | None,
    limit: int | None,
    as_json: bool,
) -> CorpusRunSummary | None:
    """Optimize one prompt (printed) or a corpus; a corpus run returns its summary."""
    catalogue = ModelCatalogue()
    preparer = ModelPreparer(settings.models_dir)
    spec = resolve_spec(settings.engine, catalogue)
    params = settings.optimizer.params()
    async with open_engine(settings.engine, catalogue, preparer) as engine_client:
        optimizer = PromptOptimizer(engine_client, spec.prompt_style, params)
        if text is not None:
            result = await optimizer.optimize(text, context)
            typer.echo(json.dumps(result.to_dict(), ensure_ascii=False, indent=2) if as_json else result.optimized)
            return None
        assert corpus is not None
        if output_path is None:
            return await _print_corpus(optimizer, corpus, field, limit, as_json, settings.optimizer.batch_size)
        return await _write_corpus(optimizer, corpus, output_path, field, limit, settings.optimizer.batch_size, as_json)


async def _print_corpus(
    optimizer: PromptOptimizer,
    corpus: Path,
    field: str | None,
    limit: int | None,
    as_json: bool,
    batch_size: int,
) -> CorpusRunSummary:
    entries = list(islice(read_corpus(corpus, field), limit))
    records = [e for e in entries if isinstance(e, CorpusRecord)]
    for error in (e for e in entries if isinstance(e, CorpusError)):
        typer.secho(f"line {error.line}: {error.reason}", fg=typer.colors.YELLOW, err=True)
    shown: list[tuple[str, RewriteResult]] = []
    summary = CorpusRunSummary(failed=len(entries) - len(records))
    with tqdm(total=len(records), desc="optimizing", unit="prompt", file=_stderr()) as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            outcomes = await optimizer.optimize_batch([PromptInput(r.prompt, r.context) for r in chunk])
            for record, outcome in zip(chunk, outcomes, strict=True):
                if isinstance(outcome, RewriteResult):
                    shown.append((record.id, outcome))
                    summary.done += 1
                else:
                    summary.failed += 1
                    typer.secho(f"line {record.line}: {outcome.error}", fg=typer.colors.YELLOW, err=True)
            bar.update(len(chunk))
    if as_json:
        for label, result in shown:
            typer.echo(json.dumps({"id": label, **result.to_dict()}, ensure_ascii=False))
    else:
        typer.echo(side_by_side(shown))
    return summary


async def _write_corpus(
    optimizer: PromptOptimizer,
    corpus: Path,
    output_path: Path,
    field: str | None,
    limit: int | None,
    batch_size: int,
    as_json: bool,
) -> CorpusRunSummary:
    done = completed_ids(output_path)
    total = count_records(corpus)
    if limit is not None:
        total = min(total, limit) if total is not None else limit
    with (
        ResultWriter(output_path) as writer,
        tqdm(total=total, desc="optimizing", unit="prompt", file=_stderr()) as bar,
    ):
        summary = await optimize_corpus(
            optimizer,
            islice(read_corpus(corpus, field), limit),
            writer,
            batch_size=batch_size,
            already_done=done,
            on_error=lambda e: tqdm.write(f"line {e.line}: {e.reason}", file=_stderr()),
            on_progress=lambda n: _advance(bar, n),
        )
    report = {
        "output": str(output_path),
        "optimized": summary.done,
        "skipped_already_done": summary.skipped,
        "failed": summary.failed,
        "kept_original": summary.fell_back,
        "failures": [{"line": f.line, "reason": f.reason} for f in summary.failures],
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(
            f"{summary.done} optimized ({summary.fell_back} kept the original), {summary.skipped} already done, "
            f"{summary.failed} failed -> {output_path}"
        )
    return summary


def _advance(bar: tqdm[Any], count: int) -> None:
    bar.update(count)


def _stderr() -> TextIO:
    return sys.stderr
