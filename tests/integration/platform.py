"""A whole platform (``bpo up``) driven from a test as a user drives it: through the ``bpo`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from bpo.v1 import bpo_pb2_grpc as pb_grpc


def shared_models_dir() -> Path:
    """Where ``make models`` prepared the weights; isolated platforms link it into their own state directory."""
    return Path(os.environ.get("BPO_STATE_DIR", Path.home() / ".cache" / "bpo")) / "models"


def bpo(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bpo.cli.main", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def platform_logs(env: dict[str, str]) -> str:
    folder = Path(env["BPO_STATE_DIR"]) / "stack" / "logs"
    if not folder.exists():
        return ""
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(folder.glob("*.log")))


def state(env: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(env["BPO_STATE_DIR"]) / "stack" / "state.json").read_text())
    return data


def jobs_stub(env: dict[str, str]) -> pb_grpc.JobsServiceStub:
    return pb_grpc.JobsServiceStub(grpc.insecure_channel(state(env)["addresses"]["jobs"]))


@contextmanager
def running_platform(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """``bpo up`` with ``env``, and ``bpo down`` afterwards whatever happened."""
    started = bpo(env, "up")
    assert started.returncode == 0, started.stdout + started.stderr + platform_logs(env)
    try:
        yield env
    finally:
        stopped = bpo(env, "down")
        assert stopped.returncode == 0, stopped.stderr
