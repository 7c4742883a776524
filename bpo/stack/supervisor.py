"""The whole platform on one machine, supervised by one process.

``bpo up`` starts this supervisor detached. It uses the Postgres, Kafka and Redis URLs it is given and starts
embedded ones for the rest (data kept under the state directory, so jobs survive ``bpo down`` / ``bpo up``),
then the services and the optimizer workers as child processes. A child that dies is restarted, so a crashed
stage consumer resumes from its last committed offset. SIGTERM stops everything in reverse order.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bpo.infra.kafka import EmbeddedKafka
from bpo.infra.postgres import EmbeddedPostgres
from bpo.infra.process import ManagedProcess, ServiceStartError
from bpo.infra.redis import EmbeddedRedis
from bpo.settings import BpoSettings
from bpo.store.db import migrate_database

log = logging.getLogger(__name__)
GRPC_SERVICES = ("jobs", "rewriter", "generator", "judge")
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class StackState:
    """Written to ``<state_dir>/stack/state.json`` for ``bpo status``, ``bpo down`` and clients."""

    supervisor_pid: int
    ready: bool = False
    database_url: str = ""
    kafka_bootstrap: str = ""
    redis_url: str = ""
    embedded: list[str] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    error: str = ""

    @staticmethod
    def path(settings: BpoSettings) -> Path:
        return settings.state_dir / "stack" / "state.json"

    def save(self, settings: BpoSettings) -> None:
        target = self.path(settings)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(target)

    @classmethod
    def load(cls, settings: BpoSettings) -> StackState | None:
        target = cls.path(settings)
        if not target.exists():
            return None
        data: dict[str, Any] = json.loads(target.read_text())
        return cls(**data)


def grpc_healthy(address: str, timeout_s: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs package omits the generated methods
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class Supervisor:
    def __init__(self, settings: BpoSettings) -> None:
        self.settings = settings
        self.workers = settings.platform.workers
        self.root = settings.state_dir / "stack"
        self.logs = self.root / "logs"
        self.state = StackState(supervisor_pid=os.getpid())
        self._infra: list[EmbeddedPostgres | EmbeddedKafka | EmbeddedRedis] = []
        self._children: dict[str, ManagedProcess] = {}
        self._stop = threading.Event()

    # -- infrastructure ----------------------------------------------------------------------------------

    def _start_infra(self) -> None:
        platform = self.settings.platform
        self.state.database_url = platform.database_url
        if not self.state.database_url:
            postgres = EmbeddedPostgres(self.root / "postgres", platform.embedded_postgres_port)
            self._infra.append(postgres)
            self.state.database_url = postgres.start()
            self.state.embedded.append("postgres")
        self.state.redis_url = platform.redis_url
        if not self.state.redis_url:
            redis = EmbeddedRedis(self.root / "redis", platform.embedded_redis_port)
            self._infra.append(redis)
            self.state.redis_url = redis.start()
            self.state.embedded.append("redis")
        self.state.kafka_bootstrap = platform.kafka_bootstrap
        if not self.state.kafka_bootstrap:
            kafka = EmbeddedKafka(platform.embedded_kafka_port, log_path=self.logs / "kafka.log")
            self._infra.append(kafka)
            self.state.kafka_bootstrap = kafka.start()
            self.state.embedded.append("kafka")

    # -- services ----------------------------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BPO_PLATFORM__DATABASE_URL=self.state.database_url,
            BPO_PLATFORM__KAFKA_BOOTSTRAP=self.state.kafka_bootstrap,
            BPO_PLATFORM__REDIS_URL=self.state.redis_url,
            BPO_STATE_DIR=str(self.settings.state_dir),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _commands(self) -> dict[str, list[str]]:
        cli = [sys.executable, "-m", "bpo.cli.main"]
        commands = {name: [*cli, "serve", name] for name in GRPC_SERVICES}
        for index in range(self.workers):
            commands[f"worker-{index}"] = [*cli, "worker", "--name", f"worker-{index}"]
        return commands

    def _start_child(self, name: str, command: list[str]) -> None:
        process = ManagedProcess(
            name, command, log_path=self.logs / f"{name}.log", env=self._child_env(),
            pid_file=self.root / "pids" / f"{name}.pid",
        )  # fmt: skip
        process.start()
        self._children[name] = process
        assert process.pid is not None
        self.state.pids[name] = process.pid

    def _addresses(self) -> dict[str, str]:
        platform = self.settings.platform
        ports = {
            "jobs": platform.jobs_port,
            "rewriter": platform.optimizer_port,
            "generator": platform.generator_port,
            "judge": platform.judge_port,
        }
        return {name: f"{platform.host}:{port}" for name, port in ports.items()}

    # -- lifecycle ---------------------------------------------------------------------------------------

    def run(self, ready_timeout_s: float = 600.0) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        try:
            self._start_infra()
            # Before any child starts: none of them may query a table that does not exist yet.
            migrate_database(self.state.database_url)
            self.state.addresses = self._addresses()
            commands = self._commands()
            for name, command in commands.items():
                self._start_child(name, command)
            self.state.save(self.settings)
            self._wait_ready(ready_timeout_s)
            self.state.ready = True
            self.state.save(self.settings)
            self._monitor(commands)
            return 0
        except Exception as exc:
            log.exception("platform failed")
            self.state.error = str(exc)
            self.state.save(self.settings)
            return 1
        finally:
            self._shutdown()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = dict(self.state.addresses)
        while pending:
            if self._stop.is_set():
                raise ServiceStartError("stopped before the platform was ready")
            for name in list(pending):
                child = self._children[name]
                if not child.running():
                    raise ServiceStartError(f"{name} exited before it was ready:\n{child.log_tail()}")
                if grpc_healthy(pending[name]):
                    del pending[name]
            if time.monotonic() > deadline:
                raise ServiceStartError(f"not ready within {timeout_s:g}s: {', '.join(pending)}")
            time.sleep(0.5)

    def _monitor(self, commands: dict[str, list[str]]) -> None:
        next_restart: dict[str, float] = {}
        while not self._stop.wait(1.0):
            for name, child in list(self._children.items()):
                if child.running():
                    continue
                now = time.monotonic()
                if name not in next_restart:
                    count = self.state.restarts.get(name, 0)
                    delay = RESTART_BACKOFF_S[min(count, len(RESTART_BACKOFF_S) - 1)]
                    log.warning("%s exited with %s; restarting in %.0fs", name, child.returncode, delay)
                    next_restart[name] = now + delay
                elif now >= next_restart.pop(name):
                    self.state.restarts[name] = self.state.restarts.get(name, 0) + 1
                    self._start_child(name, commands[name])
                    self.state.save(self.settings)

    def _shutdown(self) -> None:
        # Stages and workers first (they finish or abandon their batch; uncommitted work is redelivered),
        # then the jobs service, then the infrastructure they all depend on.
        order = [n for n in self._children if n.startswith("worker")] + ["judge", "generator", "rewriter", "jobs"]
        for name in order:
            child = self._children.pop(name, None)
            if child is not None:
                child.stop(timeout_s=30)
        for service in reversed(self._infra):
            service.stop()
        self._infra.clear()
        self.state.ready = False
        self.state.pids = {}
        self.state.save(self.settings)
