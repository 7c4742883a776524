"""The environment of a platform that shares a machine with others: its own state directory, free ports and
topic prefix, one model everywhere. Tests and benchmarks start their platforms with it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from bpo.infra.process import free_port

# Ports above the metrics base the platform's processes use (services and workers).
METRICS_SPAN = 16


def isolated_platform_env(
    state_dir: Path,
    models_dir: Path,
    *,
    model: str,
    database_url: str = "",
    redis_url: str = "",
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Empty URLs mean embedded services; prepared weights are shared by linking ``models_dir`` in."""
    link = state_dir / "models"
    if not link.exists():
        link.symlink_to(models_dir)
    env = {
        **os.environ,
        "BPO_STATE_DIR": str(state_dir),
        "BPO_PLATFORM__DATABASE_URL": database_url,
        "BPO_PLATFORM__REDIS_URL": redis_url,
        "BPO_PLATFORM__KAFKA_BOOTSTRAP": "",
        "BPO_PLATFORM__TOPIC_PREFIX": f"p{uuid.uuid4().hex[:8]}",
        "BPO_PLATFORM__OPTIMIZER_MODEL": model,
        "BPO_PLATFORM__TARGET_MODEL": model,
        "BPO_PLATFORM__JUDGE_MODEL": model,
    }
    # The OS may hand out the same free port twice, and services add up to METRICS_SPAN to the metrics base.
    taken: set[int] = set()
    for name in (
        "METRICS_PORT_BASE", "JOBS_PORT", "OPTIMIZER_PORT", "GENERATOR_PORT", "JUDGE_PORT",
        "EMBEDDED_POSTGRES_PORT", "EMBEDDED_REDIS_PORT", "EMBEDDED_KAFKA_PORT",
    ):  # fmt: skip
        port = free_port()
        while port in taken:
            port = free_port()
        taken.update(range(port, port + METRICS_SPAN) if name == "METRICS_PORT_BASE" else (port,))
        env[f"BPO_PLATFORM__{name}"] = str(port)
    env.update(extra or {})
    return env
