"""The environment of a platform that shares a machine with others: its own state directory, free ports and
topic prefix, one model everywhere. Tests and benchmarks start their platforms with it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from bpo.infra.process import ServiceStartError, free_port
from bpo.settings import REPLICA_METRICS_OFFSET, REPLICA_PORT_STRIDE, STAGE_SERVICES

# Replicas of each stage service an isolated platform has ports for (the default partition count).
ISOLATED_REPLICAS = 8
# Ports above the metrics base the platform's processes use: services, workers, then further stage replicas.
METRICS_SPAN = REPLICA_METRICS_OFFSET + (ISOLATED_REPLICAS - 1) * len(STAGE_SERVICES)
GRPC_PORTS = ("JOBS_PORT", "OPTIMIZER_PORT", "GENERATOR_PORT", "JUDGE_PORT")
EMBEDDED_PORTS = ("EMBEDDED_POSTGRES_PORT", "EMBEDDED_REDIS_PORT", "EMBEDDED_KAFKA_PORT")
_PICKS = 50


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
    taken: set[int] = set()
    for name in ("METRICS_PORT_BASE", *GRPC_PORTS, *EMBEDDED_PORTS):
        if name == "METRICS_PORT_BASE":
            count, stride = METRICS_SPAN, 1
        elif name in GRPC_PORTS:
            count, stride = ISOLATED_REPLICAS, REPLICA_PORT_STRIDE  # replica r listens on port + r * stride
        else:
            count, stride = 1, 1
        base = _distinct_port(taken, count, stride)
        taken.update(base + i * stride for i in range(count))
        env[f"BPO_PLATFORM__{name}"] = str(base)
    env.update(extra or {})
    return env


def _distinct_port(taken: set[int], count: int, stride: int) -> int:
    """A free port whose ``count`` ports ``stride`` apart miss ``taken``: ports stay free until bound, so two
    picks for one platform may overlap."""
    for _ in range(_PICKS):
        base = free_port(count, stride=stride)
        if taken.isdisjoint(base + i * stride for i in range(count)):
            return base
    raise ServiceStartError(f"no {count} ports {stride} apart clear of this platform's other ports")
