"""``bpo train`` (fine-tune an optimizer on kept pairs), ``bpo models register`` and ``bpo models alias``.

    bpo train --pairs bpo-val --base smollm2-135m-instruct --out bpo-smollm2 --lora --alias latest
    bpo train --pairs bpo-val --eval-pairs bpo-test --base smollm2-135m-instruct --out bpo-smollm2 --epochs 3
    bpo models register ~/.cache/bpo/optimizers/bpo-smollm2/<version> --alias latest
    bpo models alias latest bpo-smollm2 <version>       # point the alias back (a rollback)

Unset options fall back to ``BPO_TRAIN_*`` and then to the paper's defaults (``training.config``); the database
is ``--database-url``, else ``BPO_TRAIN_DATABASE_URL``, else ``BPO_PLATFORM__DATABASE_URL``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from bpo.errors import InvalidConfigurationError, ModelNotFoundError
from bpo.settings import BpoSettings
from bpo.store.db import migrate, open_pool
from bpo.store.repository import PipelineStore


def _comma_list(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def train(
    pairs: Annotated[str, typer.Option(help="Datasets whose kept pairs train the optimizer: NAME[,NAME...].")],
    out: Annotated[str, typer.Option(help="Name of the optimizer to produce (registered under it).")],
    base: Annotated[
        str | None, typer.Option(help="Catalogue name or local Hugging Face folder (default: smollm2-135m-instruct).")
    ] = None,
    lora: Annotated[
        bool, typer.Option("--lora", help="Train LoRA adapters (merged on export), not every weight.")
    ] = False,
    eval_pairs: Annotated[
        str | None, typer.Option(help="Datasets held out whole for evaluation (instead of --eval-fraction).")
    ] = None,
    eval_fraction: Annotated[float | None, typer.Option(help="Share of pairs held out, by record hash.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Passes over the training pairs (default: 3).")] = None,
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="Stop after N optimizer steps (overrides epochs).")
    ] = None,
    keep_best_epoch: Annotated[
        bool | None,
        typer.Option(
            "--keep-best-epoch/--keep-last-epoch",
            help="Save the epoch with the lowest eval loss (default), or the last one.",
        ),
    ] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate (default: 2e-5).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Examples per step (default: 4).")] = None,
    grad_accumulation: Annotated[int | None, typer.Option(min=1, help="Micro-batches per optimizer step.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the initialisation and batch order (default: 66).")] = None,
    threads: Annotated[int | None, typer.Option(min=0, help="CPU threads (0 = all cores).")] = None,
    gguf: Annotated[bool | None, typer.Option("--gguf/--no-gguf", help="Also export a GGUF where possible.")] = None,
    alias: Annotated[str | None, typer.Option(help="Point this alias (e.g. latest) at the new version.")] = None,
    register: Annotated[
        bool | None, typer.Option("--register/--no-register", help="Register the version in Postgres.")
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="Where runs are written (default: <BPO_STATE_DIR>/optimizers).")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Postgres with the pairs and the registry (default: BPO_PLATFORM__DATABASE_URL).")
    ] = None,
) -> None:
    """Fine-tune an optimizer on kept prompt pairs, export it, and register the version."""
    import logging

    from training.config import TrainConfig
    from training.job import run_job

    given: dict[str, Any] = {
        "pairs": _comma_list(pairs),
        "out": out,
        "base": base,
        "method": "lora" if lora else None,
        "eval_pairs": _comma_list(eval_pairs),
        "eval_fraction": eval_fraction,
        "epochs": epochs,
        "max_steps": max_steps,
        "keep_best_epoch": keep_best_epoch,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "grad_accumulation": grad_accumulation,
        "seed": seed,
        "threads": threads,
        "gguf": gguf,
        "alias": alias,
        "register_version": register,
        "output_dir": output_dir,
        "database_url": database_url,
    }
    try:
        config = TrainConfig(**{key: value for key, value in given.items() if value is not None})
    except ValidationError as exc:
        raise InvalidConfigurationError(f"invalid training options:\n{exc}") from None
    # Progress (per epoch and every 10 steps) is the point of a long run: shown without --verbose.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    training_log = logging.getLogger("training")
    training_log.setLevel(logging.INFO)
    training_log.addHandler(handler)
    result = run_job(config, BpoSettings())
    summary = result.metrics.summary()
    typer.echo(f"{result.name} version {result.version}: {result.run_dir}")
    typer.echo(
        f"eval loss {summary['eval_loss_before']} -> {summary['eval_loss_after']} (epoch {summary['kept_epoch']} of "
        f"{summary['epochs']} kept) over {summary['steps']} steps ({summary['train_seconds']}s); "
        f"gguf: {result.manifest['gguf'].get('status')}"
    )
    if config.alias and config.register_version:
        typer.echo(f"alias {config.alias} -> {result.name}@{result.version}")


def _store(database_url: str | None) -> PipelineStore:
    url = database_url or BpoSettings().platform.database_url
    if not url:
        raise InvalidConfigurationError("no database: pass --database-url or set BPO_PLATFORM__DATABASE_URL")
    pool = open_pool(url, min_size=1, max_size=1)
    migrate(pool)
    return PipelineStore(pool)


def register(
    run_dir: Annotated[Path, typer.Argument(help="A training run's folder (holds bpo_optimizer.json).")],
    alias: Annotated[str | None, typer.Option(help="Also point this alias at the version.")] = None,
    database_url: Annotated[str | None, typer.Option(help="(default: BPO_PLATFORM__DATABASE_URL)")] = None,
) -> None:
    """Register a trained optimizer folder (trained elsewhere, or re-registered after a database reset)."""
    manifest_path = run_dir / "bpo_optimizer.json"
    if not manifest_path.is_file():
        raise ModelNotFoundError(f"{run_dir} has no bpo_optimizer.json: not a training run's folder")
    manifest = json.loads(manifest_path.read_text())
    store = _store(database_url)
    store.register_model(
        manifest["name"],
        manifest["version"],
        base_model=manifest.get("base_model", ""),
        source=str(run_dir.resolve()),
        manifest_hash=manifest.get("data_manifest_hash", ""),
        metrics=manifest.get("metrics", {}),
    )
    typer.echo(f"registered {manifest['name']} version {manifest['version']}")
    if alias:
        store.set_alias(alias, manifest["name"], manifest["version"])
        typer.echo(f"alias {alias} -> {manifest['name']}@{manifest['version']}")


def set_alias(
    alias: Annotated[str, typer.Argument(help="The alias, e.g. latest.")],
    name: Annotated[str, typer.Argument(help="A registered optimizer name.")],
    version: Annotated[str, typer.Argument(help="One of its registered versions.")],
    database_url: Annotated[str | None, typer.Option(help="(default: BPO_PLATFORM__DATABASE_URL)")] = None,
) -> None:
    """Point an alias at a registered version; workers serving the alias switch to it between batches."""
    import psycopg

    store = _store(database_url)
    try:
        store.set_alias(alias, name, version)
    except psycopg.errors.ForeignKeyViolation:
        raise ModelNotFoundError(f"{name} version {version} is not registered") from None
    typer.echo(f"alias {alias} -> {name}@{version}")
