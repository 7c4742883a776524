"""A remote endpoint's model names belong to the endpoint: sent exactly as given, versioned by endpoint, never
looked up in the catalogue (which only knows weights this process could load)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bpo.endpoints import EndpointConfig, Endpoints, Secrets
from bpo.engines.factory import build_engine, model_identity, resolve_spec, served_model_name
from bpo.engines.registry import EngineRegistry
from bpo.models.catalogue import ModelCatalogue, PromptStyle, SourceKind
from bpo.models.prepare import ModelPreparer
from bpo.pipeline.rewriting import ModelVersions
from bpo.settings import BpoSettings, EngineSettings
from services.optimizer_worker.settings import WorkerSettings

pytestmark = pytest.mark.unit

URL = "http://127.0.0.1:9/v1"


def openai_settings(model: str, **extra: object) -> EngineSettings:
    return EngineSettings.model_validate({"name": "openai", "model": model, "openai_base_url": URL, **extra})


@pytest.mark.parametrize("name", ["gpt-4o-mini", "stub", "smollm2-135m-instruct", "SmolLM2", "org/model-7b"])
def test_a_remote_name_is_never_resolved_through_the_catalogue(name: str) -> None:
    spec = resolve_spec(openai_settings(name), ModelCatalogue())
    assert spec.source is SourceKind.REMOTE
    assert spec.name == name  # not the catalogue's canonical name, not "remote/..."
    assert spec.prompt_style is PromptStyle.CHAT_INSTRUCTION
    assert spec.hub_id is None and spec.local_path is None


def test_a_served_bpo_model_can_use_the_papers_template() -> None:
    spec = resolve_spec(openai_settings("bpo", openai_prompt_style="bpo_template"), ModelCatalogue())
    assert spec.prompt_style is PromptStyle.BPO_TEMPLATE


def test_the_served_name_is_the_configured_one() -> None:
    assert served_model_name(openai_settings("gpt-4o-mini")) == "gpt-4o-mini"
    assert served_model_name(openai_settings("catalogue-name", openai_model="served-name")) == "served-name"


async def test_the_engine_sends_exactly_the_served_name(tmp_path: Path) -> None:
    settings = openai_settings("gpt-4o-mini")
    engine = build_engine(settings, resolve_spec(settings, ModelCatalogue()), ModelPreparer(tmp_path))
    try:
        assert engine._served_model == "gpt-4o-mini"  # type: ignore[attr-defined]
        assert engine.identity.name == "gpt-4o-mini"
        assert engine.identity.version == f"gpt-4o-mini@{URL}"
    finally:
        await engine.aclose()


def test_identity_of_a_remote_model_is_its_endpoint(tmp_path: Path) -> None:
    settings = openai_settings("stub")
    identity = model_identity(settings, resolve_spec(settings, ModelCatalogue()), ModelPreparer(tmp_path))
    assert identity.version == f"stub@{URL}"
    other = openai_settings("stub", openai_base_url="http://other:8000/v1")
    assert model_identity(other, resolve_spec(other, ModelCatalogue()), ModelPreparer(tmp_path)) != identity


class NoAliases:
    def resolve_alias(self, alias: str) -> tuple[str, str] | None:
        return None


def test_the_cache_looks_up_the_version_the_workers_report(tmp_path: Path) -> None:
    """The rewriter computes the version from the workers' own engine settings; an openai-engine worker's
    results carry exactly that version, so the cache files and finds them (it never hit before)."""
    platform = BpoSettings.model_validate(
        {"state_dir": tmp_path, "engine": {"name": "openai", "openai_base_url": URL, "model": "x"}}
    )
    workers = WorkerSettings.for_platform(platform)
    preparer = ModelPreparer(tmp_path)
    versions = ModelVersions(ModelCatalogue(), preparer, NoAliases(), workers.engine_settings_for)  # type: ignore[arg-type]
    version = versions.version_of("gpt-4o-mini")

    worker_engine = workers.engine_settings_for("gpt-4o-mini")
    produced = model_identity(worker_engine, resolve_spec(worker_engine, ModelCatalogue()), preparer).version
    assert version.cache_key == version.produced_by == produced == f"gpt-4o-mini@{URL}"


def test_an_in_process_version_is_the_pinned_hash(tmp_path: Path) -> None:
    platform = BpoSettings.model_validate({"state_dir": tmp_path})
    workers = WorkerSettings.for_platform(platform)
    versions = ModelVersions(ModelCatalogue(), ModelPreparer(tmp_path), NoAliases(), workers.engine_settings_for)  # type: ignore[arg-type]
    pinned = ModelCatalogue().resolve("smollm2-135m-instruct").sha256
    assert pinned is not None
    assert versions.version_of("smollm2-135m-instruct").cache_key == pinned[:12]


async def test_registry_endpoints_keep_the_served_name(tmp_path: Path) -> None:
    declared = {"gpt": EndpointConfig(name="gpt", engine="openai", model="gpt-4o-mini", url=URL, api_key_secret="k")}
    endpoints = Endpoints(declared, EngineSettings(), Secrets(None, {"BPO_SECRET_K": "sk-test"}))
    registry = EngineRegistry(endpoints, ModelCatalogue(), ModelPreparer(tmp_path))
    try:
        engine = await registry.get("gpt")
        assert engine.identity.name == "gpt-4o-mini"
        assert engine._served_model == "gpt-4o-mini"  # type: ignore[attr-defined]
        assert await registry.get("gpt") is engine
    finally:
        await registry.aclose()
