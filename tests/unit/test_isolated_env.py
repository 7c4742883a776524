from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bpo.stack import isolated
from bpo.stack.isolated import METRICS_SPAN, isolated_platform_env

pytestmark = pytest.mark.unit

PORT_SETTINGS = (
    "JOBS_PORT", "OPTIMIZER_PORT", "GENERATOR_PORT", "JUDGE_PORT",
    "EMBEDDED_POSTGRES_PORT", "EMBEDDED_REDIS_PORT", "EMBEDDED_KAFKA_PORT",
)  # fmt: skip


def test_ports_are_distinct_even_when_the_os_repeats_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The metrics base first, then a port inside its span, then repeats, then fresh ones.
    offered: Iterator[int] = iter([40000, 40003, 40000, 41000, 41000, 41001, 40015, 41002, 41003, 41004, 41005, 41006])
    monkeypatch.setattr(isolated, "free_port", lambda: next(offered))
    (tmp_path / "state").mkdir()
    env = isolated_platform_env(tmp_path / "state", tmp_path / "models", model="m")
    base = int(env["BPO_PLATFORM__METRICS_PORT_BASE"])
    ports = [int(env[f"BPO_PLATFORM__{name}"]) for name in PORT_SETTINGS]
    assert base == 40000
    assert len(set(ports)) == len(ports)
    assert not any(base <= port < base + METRICS_SPAN for port in ports)
