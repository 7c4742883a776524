"""``bpo pairs import | build | stats``: preference data in, optimized-prompt pairs out (the paper's step 1)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import psycopg
import typer
from tqdm import tqdm

from bpo.engines.factory import open_engine
from bpo.errors import EngineUnavailableError, InvalidConfigurationError
from bpo.infra.redis import redis_reachable
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.pairs.build import DEFAULT_SELF_BLEU_THRESHOLD, BuildConfig, BuildReport, build_pairs, decide_bpo_records
from bpo.pairs.filters import DEFAULT_MIN_CHARS, DEFAULT_MIN_WORDS, RuleConfig
from bpo.pairs.generation import EngineGenerator, Generator
from bpo.pairs.importers import FORMATS, read_records
from bpo.pairs.records import ImportIssue, PreferenceRecord, Skipped
from bpo.pairs.stats import pairs_stats
from bpo.settings import BpoSettings, EngineName
from bpo.stack.supervisor import ConnectionUrls
from bpo.store.db import migrate, open_pool
from bpo.store.pairs import PairsStore

app = typer.Typer(
    help="Import preference data, construct optimized-prompt pairs, and count them.", no_args_is_help=True
)

IMPORT_CHUNK = 500

MinWords = Annotated[int, typer.Option(min=1, help="Rule filter: fewer words in the instruction is too short.")]
MinChars = Annotated[int, typer.Option(min=1, help="Rule filter: fewer characters is too short.")]
SelfBleu = Annotated[
    float, typer.Option("--self-bleu", min=0, max=100, help="Drop an instruction whose BLEU against one kept "
                        "before exceeds this (0-100).")
]  # fmt: skip


def _platform_url(configured: str, from_state: str | None, what: str) -> str:
    if configured:
        return configured
    if from_state:
        return from_state
    raise EngineUnavailableError(
        f"no {what} is configured (BPO_PLATFORM__{what.upper()}_URL) and the platform is not up: run `bpo up`"
    )


def database_url(settings: BpoSettings) -> str:
    running = ConnectionUrls.load(settings)
    return _platform_url(settings.platform.database_url, running.database_url if running else None, "database")


@contextmanager
def open_store(settings: BpoSettings) -> Iterator[PairsStore]:
    url = database_url(settings)
    try:
        # Fails in seconds with the reason, where the pool would wait out its whole timeout.
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        raise EngineUnavailableError(f"cannot reach Postgres at {url}: {exc} (is the platform up? `bpo up`)") from exc
    pool = open_pool(url, min_size=1, max_size=4)
    try:
        migrate(pool)
        yield PairsStore(pool)
    finally:
        pool.close()


def _config(
    min_words: int,
    min_chars: int,
    self_bleu: float,
    **sampling: Any,
) -> BuildConfig:
    try:
        return BuildConfig(RuleConfig(min_words, min_chars), self_bleu, **sampling)
    except ValueError as exc:
        raise InvalidConfigurationError(str(exc)) from exc


@app.command("import")
def import_file(
    path: Annotated[Path, typer.Argument(help="A JSON Lines file or one JSON array.", exists=True, dir_okay=False)],
    fmt: Annotated[str, typer.Option("--format", help=f"One of: {', '.join(FORMATS)}.")],
    dataset: Annotated[str, typer.Option(help="The dataset name the records go into.")],
    licence: Annotated[
        str | None, typer.Option(help="Licence of every record (default: the format's own; required for generic).")
    ] = None,
    lang: Annotated[
        list[str] | None, typer.Option(help="Keep only these languages (oasst1 'lang', chatbot-arena 'language').")
    ] = None,
    min_words: MinWords = DEFAULT_MIN_WORDS,
    min_chars: MinChars = DEFAULT_MIN_CHARS,
    self_bleu: SelfBleu = DEFAULT_SELF_BLEU_THRESHOLD,
) -> None:
    """Import preference records; idempotent. BPO records also get their published pairs, filtered as ours."""
    settings = BpoSettings()
    config = _config(min_words, min_chars, self_bleu)
    read = inserted = 0
    skipped: Counter[str] = Counter()
    malformed = 0
    with open_store(settings) as store:
        chunk: list[PreferenceRecord] = []
        for item in read_records(path, fmt, dataset, licence=licence, languages=lang or ()):
            if isinstance(item, ImportIssue):
                malformed += 1
                typer.secho(f"line {item.line}: {item.reason} (skipped)", fg=typer.colors.YELLOW, err=True)
            elif isinstance(item, Skipped):
                skipped[item.reason] += 1
            else:
                read += 1
                chunk.append(item)
                if len(chunk) >= IMPORT_CHUNK:
                    inserted += store.add_records(chunk)
                    chunk = []
        inserted += store.add_records(chunk)
        skipped_text = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items())) or "none"
        typer.echo(
            f"{path.name} -> {dataset}: {read} records ({inserted} new, {read - inserted} already there); "
            f"skipped: {skipped_text}; malformed: {malformed}"
        )
        if fmt == "bpo":
            report = decide_bpo_records(store, dataset, config)
            typer.echo(_render_report(report))


@app.command("build")
def build(
    dataset: Annotated[str, typer.Option(help="The dataset to construct pairs for.")],
    engine: Annotated[
        EngineName | None, typer.Option(help="Engine of --local (workers run the engine they were started with).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Constructor model (default: the platform's optimizer model, or the engine's).")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Decide at most N more records.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Records per batch (one Celery task).")] = 8,
    temperature: Annotated[float, typer.Option(min=0, help="Sampling temperature (the paper: 0.9).")] = 0.9,
    top_p: Annotated[float, typer.Option("--top-p", min=0, max=1, help="Nucleus sampling (the paper: 1).")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens of each constructor answer.")] = 1024,
    seed: Annotated[int | None, typer.Option(help="Makes each record's sample reproducible.")] = None,
    layout_seed: Annotated[int, typer.Option(help="Seeds each record's context layout.")] = 0,
    min_words: MinWords = DEFAULT_MIN_WORDS,
    min_chars: MinChars = DEFAULT_MIN_CHARS,
    self_bleu: SelfBleu = DEFAULT_SELF_BLEU_THRESHOLD,
    local: Annotated[bool, typer.Option("--local", help="Run the engine in this process instead of on workers.")] = (
        False
    ),
    as_json: Annotated[bool, typer.Option("--json", help="The report as JSON.")] = False,
) -> None:
    """Construct pairs with an LLM for the records of DATASET that have no decision yet (resumable)."""
    settings = BpoSettings()
    config = _config(
        min_words, min_chars, self_bleu, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        seed=seed, layout_seed=layout_seed, batch_size=batch_size, limit=limit,
    )  # fmt: skip
    with open_store(settings) as store:
        runner = _build_local if local else _build_on_workers
        report = asyncio.run(runner(settings, store, dataset, engine, model, config))
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else _render_report(report))
    if report.failed:
        raise typer.Exit(1)


async def _run_with_progress(store: PairsStore, dataset: str, generator: Generator, config: BuildConfig) -> BuildReport:
    with tqdm(total=0, desc="pairs", unit="record", file=sys.stderr) as bar:

        def set_total(total: int) -> None:
            bar.total = total
            bar.refresh()

        def advance(count: int) -> None:
            bar.update(count)

        return await build_pairs(store, dataset, generator, config, on_total=set_total, on_progress=advance)


async def _build_local(
    settings: BpoSettings, store: PairsStore, dataset: str, engine: str | None, model: str | None, config: BuildConfig
) -> BuildReport:
    update = {k: v for k, v in {"name": engine, "model": model}.items() if v is not None}
    engine_settings = settings.engine.model_validate(settings.engine.model_dump() | update)
    catalogue, preparer = ModelCatalogue(), ModelPreparer(settings.models_dir)
    async with open_engine(engine_settings, catalogue, preparer) as client:
        return await _run_with_progress(store, dataset, EngineGenerator(client, engine_settings.model), config)


async def _build_on_workers(
    settings: BpoSettings, store: PairsStore, dataset: str, engine: str | None, model: str | None, config: BuildConfig
) -> BuildReport:
    # Celery is only needed here: --local and the other commands do without importing it.
    from services.optimizer_worker.app import make_celery_app, queue_for_model
    from services.optimizer_worker.generation_tasks import GenerationWorkersClient, WorkersGenerator
    from services.optimizer_worker.settings import WorkerSettings

    running = ConnectionUrls.load(settings)
    try:
        redis_url = _platform_url(settings.platform.redis_url, running.redis_url if running else None, "redis")
    except EngineUnavailableError as exc:
        raise EngineUnavailableError(f"{exc}, or pass --local to construct in this process") from None
    if not redis_reachable(redis_url):
        raise EngineUnavailableError(
            f"the workers' broker at {redis_url} does not answer (is the platform up? `bpo up`); "
            "pass --local to construct in this process"
        )
    served = model or settings.platform.optimizer_model
    platform = settings.platform.model_copy(update={"redis_url": redis_url})
    worker_settings = WorkerSettings.for_platform(settings.model_copy(update={"platform": platform}))
    client = GenerationWorkersClient(make_celery_app(worker_settings), timeout_s=settings.platform.worker_timeout_s)
    try:
        workers = await client.serving_workers(served)
        if not workers:
            raise EngineUnavailableError(
                f"no worker consumes {queue_for_model(served)} at {redis_url}: start one for this model "
                f"(BPO_PLATFORM__OPTIMIZER_MODEL={served} bpo up), or pass --local to construct in this process"
            )
        generator = WorkersGenerator(client, served, max_in_flight=2 * len(workers))
        try:
            report = await _run_with_progress(store, dataset, generator, config)
        except EngineUnavailableError as exc:
            raise EngineUnavailableError(
                f"{exc}; every batch finished before is stored: run again to go on, or pass --local to construct "
                "in this process"
            ) from exc
    finally:
        client.close()
    engines = sorted({name for name, _ in generator.engines_seen if name})
    if engine is not None and engines and engines != [engine]:
        typer.secho(f"note: the workers ran engine {', '.join(engines)}, not {engine} (--engine applies to --local)",
                    fg=typer.colors.YELLOW, err=True)  # fmt: skip
    return report


def _render_report(report: BuildReport) -> str:
    decisions = ", ".join(f"{name} {count}" for name, count in sorted(report.decisions.items())) or "none"
    lines = [
        f"{report.dataset}: {report.constructor_model}, prompts {report.prompt_version}",
        f"  decided now {report.decided} ({decisions}); decided before {report.already_decided}; "
        f"records {report.records}",
    ]
    if report.undecided_left:
        lines.append(f"  {report.undecided_left} records left undecided (--limit); run again to go on")
    if report.failed:
        lines.append(f"  {report.failed} failed and stay undecided for the next run: {'; '.join(report.errors)}")
    return "\n".join(lines)


@app.command("stats")
def stats(
    dataset: Annotated[str | None, typer.Option(help="Only this dataset.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """Records per source and licence; decisions per source and filter; distinct-1/2 of the kept pairs."""
    with open_store(BpoSettings()) as store:
        result = pairs_stats(store, dataset)
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.render())
