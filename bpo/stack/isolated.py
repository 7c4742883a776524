"""The environment of a platform that shares a machine with others: its own state directory, free ports and
topic prefix, one model everywhere. Tests and benchmarks start their platforms with it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from bpo.infra.process import free_port


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
    for name in (
        "JOBS_PORT", "OPTIMIZER_PORT", "GENERATOR_PORT", "JUDGE_PORT", "METRICS_PORT_BASE",
        "EMBEDDED_POSTGRES_PORT", "EMBEDDED_REDIS_PORT", "EMBEDDED_KAFKA_PORT",
    ):  # fmt: skip
        env[f"BPO_PLATFORM__{name}"] = str(free_port())
    env.update(extra or {})
    return env
