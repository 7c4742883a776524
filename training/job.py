"""Wiring for the entry points: the platform's catalogue, prepared models, Postgres pairs and model registry."""

from __future__ import annotations

from pathlib import Path

from bpo.errors import InvalidConfigurationError
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.settings import BpoSettings
from bpo.store.db import migrate, open_pool
from bpo.store.pairs import PairsStore
from bpo.store.repository import PipelineStore
from training.config import TrainConfig
from training.pairs import StorePairs
from training.train import TrainResult, resolve_base, train

NO_DATABASE = (
    "no database to read pairs from: pass --database-url, or set BPO_PLATFORM__DATABASE_URL "
    "(BPO_TRAIN_DATABASE_URL for the training job)"
)


def output_root(config: TrainConfig, settings: BpoSettings) -> Path:
    return config.output_dir or settings.state_dir / "optimizers"


def run_job(config: TrainConfig, settings: BpoSettings) -> TrainResult:
    if not config.database_url:
        raise InvalidConfigurationError(NO_DATABASE)
    base = resolve_base(config.base, ModelCatalogue(), ModelPreparer(settings.models_dir))
    pool = open_pool(config.database_url, min_size=1, max_size=2)
    try:
        # Idempotent and under an advisory lock: a job against a fresh database works, one against the
        # platform's changes nothing.
        migrate(pool)
        registry = PipelineStore(pool) if config.register_version else None
        return train(
            config,
            pairs=StorePairs(PairsStore(pool)),
            base=base,
            output_root=output_root(config, settings),
            registry=registry,
        )
    finally:
        pool.close()
