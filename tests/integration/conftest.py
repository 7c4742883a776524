"""Real weights, real engines, real servers: the packaged SmolLM2 model on CPU.

Models are prepared into the same state directory ``make models`` uses, so a prepared model is reused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bpo.engines.base import EngineClient
from bpo.engines.factory import build_engine
from bpo.engines.llamacpp_server import serve_gguf
from bpo.models.catalogue import ModelCatalogue, ModelSpec
from bpo.models.prepare import ModelPreparer
from bpo.settings import BpoSettings, EngineSettings
from tests.integration.services import postgres_server, redis_server

MODEL = "smollm2-135m-instruct"
THREADS = 2


@pytest.fixture(scope="session")
def settings() -> BpoSettings:
    return BpoSettings()


@pytest.fixture(scope="session")
def preparer(settings: BpoSettings) -> ModelPreparer:
    return ModelPreparer(settings.models_dir)


@pytest.fixture(scope="session")
def smollm2(preparer: ModelPreparer) -> ModelSpec:
    return ModelCatalogue().resolve(MODEL)


@pytest.fixture(scope="session")
def smollm2_gguf(preparer: ModelPreparer, smollm2: ModelSpec) -> Path:
    return preparer.gguf_path(smollm2)


def engine_settings(name: str, **overrides: object) -> EngineSettings:
    return EngineSettings.model_validate({"name": name, "model": MODEL, "threads": THREADS, **overrides})


@pytest.fixture(scope="session")
async def llamacpp_engine(smollm2: ModelSpec, preparer: ModelPreparer) -> AsyncIterator[EngineClient]:
    engine = build_engine(engine_settings("llamacpp"), smollm2, preparer)
    yield engine
    await engine.aclose()


@pytest.fixture(scope="session")
def llama_server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python's), on loopback, serving the same GGUF."""
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    try:
        with serve_gguf(smollm2_gguf, alias=MODEL, threads=THREADS, log_path=log_path) as base_url:
            yield base_url
    except Exception:
        print(log_path.read_text(errors="replace")[-4000:])
        raise


@pytest.fixture(scope="session")
def postgres_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server for the session (configured, or embedded): tests make their own databases on it."""
    with postgres_server(tmp_path_factory.mktemp("postgres-server")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server for the session (configured, or embedded): tests take their own database numbers."""
    with redis_server(tmp_path_factory.mktemp("redis-server")) as url:
        yield url
