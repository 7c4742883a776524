from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bpo.settings import DEFAULT_MODEL, BpoSettings, EngineSettings, OptimizerSettings

pytestmark = pytest.mark.unit


def test_paper_defaults() -> None:
    settings = BpoSettings()
    assert settings.optimizer.temperature == 0.6
    assert settings.optimizer.top_p == 0.9
    assert settings.optimizer.max_new_tokens == 1024
    assert settings.optimizer.rounds == 1
    assert settings.optimizer.seed is None
    assert settings.engine.name == "llamacpp"
    assert settings.engine.model == DEFAULT_MODEL


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BPO_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BPO_ENGINE__NAME", "openai")
    monkeypatch.setenv("BPO_ENGINE__OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    monkeypatch.setenv("BPO_ENGINE__OPENAI_MODEL", "served-name")
    monkeypatch.setenv("BPO_ENGINE__MAX_ATTEMPTS", "2")
    monkeypatch.setenv("BPO_ENGINE__CONTEXT_LENGTH", "2048")
    monkeypatch.setenv("BPO_OPTIMIZER__TEMPERATURE", "0.2")
    monkeypatch.setenv("BPO_OPTIMIZER__TOP_P", "0.75")
    monkeypatch.setenv("BPO_OPTIMIZER__MAX_NEW_TOKENS", "256")
    monkeypatch.setenv("BPO_OPTIMIZER__ROUNDS", "3")
    monkeypatch.setenv("BPO_OPTIMIZER__SEED", "42")
    monkeypatch.setenv("BPO_OPTIMIZER__BATCH_SIZE", "16")
    settings = BpoSettings()
    assert settings.state_dir == tmp_path / "state"
    assert settings.models_dir == tmp_path / "state" / "models"
    assert settings.engine.name == "openai"
    assert settings.engine.openai_base_url == "http://127.0.0.1:8000/v1"
    assert settings.engine.openai_model == "served-name"
    assert settings.engine.max_attempts == 2
    assert settings.engine.context_length == 2048
    assert settings.optimizer == OptimizerSettings(
        temperature=0.2, top_p=0.75, max_new_tokens=256, rounds=3, seed=42, batch_size=16
    )


def test_openai_engine_needs_a_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="openai_base_url"):
        EngineSettings(name="openai")
    monkeypatch.setenv("BPO_ENGINE__NAME", "openai")
    with pytest.raises(ValidationError, match="BPO_ENGINE__OPENAI_BASE_URL"):
        BpoSettings()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BPO_OPTIMIZER__TOP_P", "1.5"),
        ("BPO_OPTIMIZER__TEMPERATURE", "-0.1"),
        ("BPO_OPTIMIZER__ROUNDS", "0"),
        ("BPO_OPTIMIZER__ROUNDS", "11"),
        ("BPO_ENGINE__NAME", "gpt4all"),
        ("BPO_ENGINE__CONTEXT_LENGTH", "128"),
    ],
)
def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError):
        BpoSettings()


def test_api_key_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EngineSettings().resolved_api_key() == "not-needed"
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai-env")
    assert EngineSettings().resolved_api_key() == "from-openai-env"
    monkeypatch.setenv("BPO_ENGINE__OPENAI_API_KEY", "sk-secret-value")
    settings = BpoSettings()
    assert settings.engine.resolved_api_key() == "sk-secret-value"
    assert "sk-secret-value" not in repr(settings)


def test_default_state_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert BpoSettings().state_dir == tmp_path / "bpo"


def test_resolved_threads() -> None:
    assert EngineSettings(threads=3).resolved_threads() == 3
    assert EngineSettings(threads=0).resolved_threads() >= 1
