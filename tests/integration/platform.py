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

from bpo.pipeline.client import ADMIN_TOKEN_FILE, with_bearer_token
from bpo.v1 import bpo_pb2_grpc as pb_grpc


def shared_models_dir() -> Path:
    """Where ``make models`` prepared the weights; isolated platforms link it into their own state directory."""
    return Path(os.environ.get("BPO_STATE_DIR", Path.home() / ".cache" / "bpo")) / "models"


def bpo(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bpo.cli.main", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def platform_logs(env: dict[str, str], tail: int | None = 3000) -> str:
    """Every service's log (the last ``tail`` characters of each; ``None``: all of it)."""
    folder = Path(env["BPO_STATE_DIR"]) / "stack" / "logs"
    if not folder.exists():
        return ""
    start = -tail if tail is not None else 0
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[start:]}" for p in sorted(folder.glob("*.log")))


def state(env: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(env["BPO_STATE_DIR"]) / "stack" / "state.json").read_text())
    return data


def admin_token(env: dict[str, str]) -> str:
    """The token of the admin team ``bpo up`` created (what the ``bpo`` command uses on this machine)."""
    return (Path(env["BPO_STATE_DIR"]) / "stack" / ADMIN_TOKEN_FILE).read_text(encoding="utf-8").strip()


def channel_to(env: dict[str, str], service: str, token: str | None = None) -> grpc.Channel:
    """A plaintext channel to one of the platform's services, as the admin team unless ``token`` is given."""
    channel = grpc.insecure_channel(state(env)["addresses"][service])
    return with_bearer_token(channel, token or admin_token(env))


def jobs_stub(env: dict[str, str], token: str | None = None) -> pb_grpc.JobsServiceStub:
    return pb_grpc.JobsServiceStub(channel_to(env, "jobs", token))


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
