"""Run llama.cpp's OpenAI-compatible server (llama-cpp-python's) on loopback for a GGUF.

Used to serve a packaged model to anything that speaks the OpenAI API, and by tests and benchmarks that
compare the ``openai`` engine with the in-process one on the same weights.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bpo.errors import EngineUnavailableError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineUnavailableError(f"server exited with {process.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise EngineUnavailableError(f"{url} did not answer within {timeout_s}s")


@contextmanager
def serve_gguf(
    gguf: Path,
    *,
    alias: str,
    threads: int,
    context_length: int = 4096,
    log_path: Path | None = None,
    start_timeout_s: float = 120,
) -> Iterator[str]:
    """Yields the server's OpenAI base URL (``http://127.0.0.1:PORT/v1``); stops the server on exit."""
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf), "--model_alias", alias,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(context_length), "--n_threads", str(threads), "--n_threads_batch", str(threads),
    ]  # fmt: skip
    log = log_path.open("wb") if log_path is not None else subprocess.DEVNULL
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v1/models", process, start_timeout_s)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log_path is not None and hasattr(log, "close"):
            log.close()
