"""A real Celery optimizer worker started as its own process group, for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """One worker: the Celery parent and its pool process, in a process group of their own, configured by
    ``env`` on top of this process's environment; its output goes to ``log_path``."""

    def __init__(self, log_path: Path, env: Mapping[str, str]) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.optimizer_worker.worker"],
                cwd=REPO_ROOT,
                env=os.environ.copy() | dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_group(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process.poll() is None:
            # The parent's warm shutdown; its pool processes follow it.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill_group()
        return int(self.process.returncode)
