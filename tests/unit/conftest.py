from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BPO_* or OpenAI variables from the developer's shell leak into a test."""
    for name in list(os.environ):
        if name.startswith("BPO_") or name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
            monkeypatch.delenv(name, raising=False)
