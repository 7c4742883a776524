"""The whole platform on one machine, supervised by one process.

``bpo up`` starts this supervisor detached. It uses the Postgres, Kafka and Redis URLs it is given and starts
embedded ones for the rest (data kept under the state directory, so jobs survive ``bpo down`` / ``bpo up``),
migrates the database, then starts the services and the optimizer workers as child processes.

Every component is watched, the embedded infrastructure included: one that dies is restarted after a back-off
that doubles with each consecutive failure (1 s up to 30 s) and resets once it has run for a minute; each
restart is counted and reported in ``state.json`` (``bpo status``). SIGTERM stops everything in reverse order.
With ``with_prometheus`` (``bpo up --with-prometheus``) a Prometheus scraping every process's metrics port runs
beside them as one more supervised child, and its URL is recorded in ``state.json``.

The state directory holds credentials and logs that may quote what users sent: it is created private to its
owner (umask 077), and ``state.json`` never holds a password (URLs are masked).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bpo.errors import BpoError
from bpo.infra.kafka import EmbeddedKafka
from bpo.infra.postgres import EmbeddedPostgres
from bpo.infra.process import ManagedProcess, ServiceStartError, last_line
from bpo.infra.redis import EmbeddedRedis
from bpo.infra.urls import mask_url
from bpo.observability.prometheus import LocalPrometheus
from bpo.pipeline.client import admin_token_path, open_channel
from bpo.settings import SERVICE_PROCESSES, STAGE_SERVICES, BpoSettings
from bpo.store.db import migrate_database, open_pool
from bpo.store.repository import PipelineStore

log = logging.getLogger(__name__)
GRPC_SERVICES = SERVICE_PROCESSES
ADMIN_TEAM = "admin"
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0
# A component that ran this long since its last start is healthy again: its back-off starts over.
STABLE_AFTER_S = 60.0
WORKER_STOP_TIMEOUT_S = 40.0


def restart_delay_s(consecutive_failures: int) -> float:
    return float(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** max(0, consecutive_failures - 1)))


@dataclass
class ComponentState:
    status: str = "starting"
    restarts: int = 0
    last_exit: str = ""


@dataclass
class StackState:
    """Written to ``<state_dir>/stack/state.json`` for ``bpo status``, ``bpo down`` and clients. URLs are
    masked: the services get the real ones in their environment, never from this file."""

    supervisor_pid: int
    ready: bool = False
    database_url: str = ""
    kafka_bootstrap: str = ""
    redis_url: str = ""
    embedded: list[str] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The Prometheus `bpo up --with-prometheus` started ("" without one).
    prometheus_url: str = ""
    error: str = ""

    @staticmethod
    def path(settings: BpoSettings) -> Path:
        return settings.state_dir / "stack" / "state.json"

    def save(self, settings: BpoSettings) -> None:
        target = self.path(settings)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.chmod(0o600)
        tmp.replace(target)

    @classmethod
    def load(cls, settings: BpoSettings) -> StackState | None:
        target = cls.path(settings)
        if not target.exists():
            return None
        data: dict[str, Any] = json.loads(target.read_text())
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True)
class ConnectionUrls:
    """The real URLs of the running platform's Postgres, Kafka and Redis, for the ``bpo`` commands on this
    machine: kept beside ``state.json`` in a file only its owner can read (they may carry passwords)."""

    database_url: str
    kafka_bootstrap: str
    redis_url: str

    @staticmethod
    def path(settings: BpoSettings) -> Path:
        return settings.state_dir / "stack" / "connections.json"

    def save(self, settings: BpoSettings) -> None:
        target = self.path(settings)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = target.with_suffix(".tmp")
        tmp.touch(mode=0o600)
        tmp.chmod(0o600)
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(target)

    @classmethod
    def load(cls, settings: BpoSettings) -> ConnectionUrls | None:
        try:
            data = json.loads(cls.path(settings).read_text())
        except (OSError, ValueError):
            return None
        return cls(data.get("database_url", ""), data.get("kafka_bootstrap", ""), data.get("redis_url", ""))


def grpc_healthy(address: str, settings: BpoSettings, timeout_s: float = 1.0) -> bool:
    """Whether the service at ``address`` answers its health check with SERVING (over TLS when configured)."""
    try:
        with open_channel(address, settings, with_token=False) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs package omits the generated methods
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def make_private(root: Path) -> None:
    """The state directory and what is in it readable by its owner only (logs may quote prompts)."""
    os.umask(0o077)
    root.mkdir(parents=True, exist_ok=True)
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        try:
            if path.stat().st_uid != os.geteuid():
                continue  # e.g. a Postgres cluster owned by its own service user
            path.chmod(0o700 if path.is_dir() else 0o600)
        except OSError:
            continue


@dataclass
class Component:
    """One supervised thing: started, checked, stopped, restarted."""

    name: str
    start: Callable[[], None]
    running: Callable[[], bool]
    stop: Callable[[], None]
    pid: Callable[[], int | None]
    exit_status: Callable[[], str]
    consecutive_failures: int = 0
    started_at: float = 0.0
    restart_at: float | None = None


class Supervisor:
    def __init__(
        self,
        settings: BpoSettings,
        *,
        with_prometheus: bool = False,
        announced_workers: Callable[[str], set[str]] | None = None,
    ) -> None:
        self.settings = settings
        self.with_prometheus = with_prometheus
        # The worker nodes announced as serving, given the Redis URL the children get: the platform is ready
        # when they are too, so that an `Optimize` right after `bpo up` finds a worker (None: not waited for).
        self._announced_workers = announced_workers
        self.workers = settings.platform.workers
        self.root = settings.state_dir / "stack"
        self.logs = self.root / "logs"
        self.state = StackState(supervisor_pid=os.getpid())
        self._urls: dict[str, str] = {}
        self._states: dict[str, ComponentState] = {}
        self._infra: list[Component] = []
        self._children: list[Component] = []
        self._stop = threading.Event()

    # -- infrastructure ----------------------------------------------------------------------------------

    def _start_infra(self) -> None:
        platform = self.settings.platform
        self._urls["database"] = platform.database_url
        if not platform.database_url:
            postgres = EmbeddedPostgres(
                self.root / "postgres", platform.embedded_postgres_port, password=self._secret("postgres")
            )
            self._urls["database"] = postgres.start()
            self._infra.append(self._embedded("postgres", postgres))
        self._urls["redis"] = platform.redis_url
        if not platform.redis_url:
            redis = EmbeddedRedis(self.root / "redis", platform.embedded_redis_port, password=self._secret("redis"))
            self._urls["redis"] = redis.start()
            self._infra.append(self._embedded("redis", redis))
        self._urls["kafka"] = platform.kafka_bootstrap
        if not platform.kafka_bootstrap:
            kafka = EmbeddedKafka(platform.embedded_kafka_port, log_path=self.logs / "kafka.log")
            self._urls["kafka"] = kafka.start()
            self._infra.append(self._embedded("kafka", kafka))
        self.state.database_url = mask_url(self._urls["database"])
        self.state.redis_url = mask_url(self._urls["redis"])
        self.state.kafka_bootstrap = self._urls["kafka"]
        ConnectionUrls(self._urls["database"], self._urls["kafka"], self._urls["redis"]).save(self.settings)
        self.state.embedded = [component.name for component in self._infra]
        now = time.monotonic()
        for component in self._infra:
            component.started_at = now
            self._component_state(component.name).status = "running"

    def _secret(self, name: str) -> str:
        """The embedded service's password, generated at its first start and kept (0600) in the state directory."""
        path = self.root / "secrets" / f"{name}.password"
        if path.is_file():
            return path.read_text(encoding="utf-8").strip()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        password = secrets.token_urlsafe(24)
        path.touch(mode=0o600)
        path.write_text(password, encoding="utf-8")
        return password

    def _ensure_admin_token(self) -> None:
        """The platform's own admin team, and a token for it the ``bpo`` command on this machine uses when it is
        given no other (``stack/admin.token``, 0600); a missing or revoked one is replaced."""
        pool = open_pool(self._urls["database"], min_size=1, max_size=1)
        try:
            store = PipelineStore(pool)
            try:
                team = store.team(ADMIN_TEAM)
            except BpoError:
                team = store.create_team(ADMIN_TEAM, admin=True)
            path = admin_token_path(self.settings)
            current = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
            if current and (owner := store.team_for_token(current)) is not None and owner.team_id == team.team_id:
                return
            _, token = store.create_token(ADMIN_TEAM, "created by bpo up for the local bpo command")
            path.touch(mode=0o600)
            path.chmod(0o600)
            path.write_text(token, encoding="utf-8")
        finally:
            pool.close()

    @staticmethod
    def _embedded(name: str, service: EmbeddedPostgres | EmbeddedRedis | EmbeddedKafka) -> Component:
        def start() -> None:
            service.start()

        return Component(name, start, service.running, service.stop, lambda: service.pid, lambda: "exited")

    # -- services ----------------------------------------------------------------------------------------

    def _child_env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BPO_PLATFORM__DATABASE_URL=self._urls["database"],
            BPO_PLATFORM__KAFKA_BOOTSTRAP=self._urls["kafka"],
            BPO_PLATFORM__REDIS_URL=self._urls["redis"],
            BPO_STATE_DIR=str(self.settings.state_dir),
            PYTHONUNBUFFERED="1",
        )
        replica = self._replicas().get(name)
        if replica is not None:
            env["BPO_PLATFORM__REPLICA"] = str(replica[1])
        if name.startswith("worker"):
            # SIGTERM becomes Celery's cold shutdown, preceded by its soft shutdown: a running batch gets the
            # soft-shutdown time to finish, then is put back on its queue (late acks) instead of being killed
            # unacknowledged, which would strand it until the visibility timeout.
            env["REMAP_SIGTERM"] = "SIGQUIT"
            # Each worker its own metrics port, next to the services' (what the scrape configuration expects).
            env["BPO_WORKER_METRICS_PORT"] = str(self.settings.platform.metrics_port(name))
            env["BPO_WORKER_METRICS_HOST"] = self.settings.platform.metrics_host
        return env

    def _replicas(self) -> dict[str, tuple[str, int]]:
        """Process name -> (service, replica index) of every gRPC service process: each service once, then the
        further replicas of the stage services."""
        platform = self.settings.platform
        processes = {name: (name, 0) for name in GRPC_SERVICES}
        for replica in range(1, platform.replicas):
            for service in STAGE_SERVICES:
                processes[platform.process_name(service, replica)] = (service, replica)
        return processes

    def _commands(self) -> dict[str, list[str]]:
        cli = [sys.executable, "-m", "bpo.cli.main"]
        commands = {name: [*cli, "serve", service] for name, (service, _) in self._replicas().items()}
        for index in range(self.workers):
            commands[f"worker-{index}"] = [*cli, "worker", "--name", f"worker-{index}"]
        return commands

    def _child(self, name: str, command: list[str]) -> Component:
        holder: dict[str, ManagedProcess] = {}

        def start() -> None:
            process = ManagedProcess(
                name, command, log_path=self.logs / f"{name}.log", env=self._child_env(name),
                pid_file=self.root / "pids" / f"{name}.pid",
            )  # fmt: skip
            process.start()
            holder["process"] = process

        def running() -> bool:
            return "process" in holder and holder["process"].running()

        def stop() -> None:
            if "process" in holder:
                holder["process"].stop(timeout_s=WORKER_STOP_TIMEOUT_S if name.startswith("worker") else 30)

        def pid() -> int | None:
            return holder["process"].pid if "process" in holder else None

        def exit_status() -> str:
            code = holder["process"].returncode if "process" in holder else None
            if code is None:
                return "exited"
            return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"

        return Component(name, start, running, stop, pid, exit_status)

    def _addresses(self) -> dict[str, str]:
        platform = self.settings.platform
        return {
            name: f"{platform.host}:{platform.grpc_port(service, replica)}"
            for name, (service, replica) in self._replicas().items()
        }

    def _component_state(self, name: str) -> ComponentState:
        return self._states.setdefault(name, ComponentState())

    def _save(self) -> None:
        self.state.components = {name: asdict(view) for name, view in self._states.items()}
        self.state.save(self.settings)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def run(self, ready_timeout_s: float = 600.0) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        try:
            make_private(self.root)
            self._start_infra()
            # Before any child starts: none of them may query a table that does not exist yet.
            migrate_database(self._urls["database"])
            self._ensure_admin_token()
            self.state.addresses = self._addresses()
            prometheus = self._prometheus()
            commands = self._commands()
            if prometheus is not None:
                commands["prometheus"] = prometheus.command()
            for name, command in commands.items():
                child = self._child(name, command)
                child.start()
                child.started_at = time.monotonic()
                self._children.append(child)
                self._component_state(name).status = "running"
            self._record_pids()
            self._save()
            self._wait_ready(ready_timeout_s)
            if prometheus is not None:
                self._wait_prometheus(prometheus, ready_timeout_s)
            self.state.ready = True
            self._save()
            self._monitor()
            return 0
        except Exception as exc:
            log.exception("platform failed")
            self.state.error = str(exc)
            self._save()
            return 1
        finally:
            self._shutdown()

    def _prometheus(self) -> LocalPrometheus | None:
        """The Prometheus to run beside the platform, its configuration written; None unless asked for. Fails
        (the platform does not start) when asked for and its binary is missing."""
        if not self.with_prometheus:
            return None
        prometheus = LocalPrometheus.for_platform(self.settings, self.root / "prometheus")
        prometheus.write_config(self.settings)
        return prometheus

    def _wait_prometheus(self, prometheus: LocalPrometheus, timeout_s: float) -> None:
        child = next(child for child in self._children if child.name == "prometheus")
        deadline = time.monotonic() + timeout_s
        while not prometheus.ready():
            if not child.running() or self._stop.is_set():
                raise self._start_failure(child)
            if time.monotonic() > deadline:
                raise ServiceStartError(f"prometheus not ready within {timeout_s:g}s at {prometheus.url}")
            time.sleep(0.5)
        self.state.prometheus_url = prometheus.url

    def _record_pids(self) -> None:
        self.state.pids = {c.name: pid for c in (*self._infra, *self._children) if (pid := c.pid()) is not None}

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = dict(self.state.addresses)
        children = {child.name: child for child in self._children}
        while pending:
            if self._stop.is_set():
                raise ServiceStartError("stopped before the platform was ready")
            for name in list(pending):
                if not children[name].running():
                    raise self._start_failure(children[name])
                if grpc_healthy(pending[name], self.settings):
                    del pending[name]
            if time.monotonic() > deadline:
                raise ServiceStartError(f"not ready within {timeout_s:g}s: {', '.join(pending)}")
            time.sleep(0.5)
        self._wait_workers_announced(deadline)

    def _start_failure(self, child: Component) -> ServiceStartError:
        """Why ``child`` stopped before it was ready, with its log's last line (usually the exception), so that
        `bpo up` and a CI log say it without anyone opening the file."""
        log_path = self.logs / f"{child.name}.log"
        return ServiceStartError(
            f"{child.name} exited before it was ready ({child.exit_status()}): {last_line(log_path) or 'no output'}; "
            f"see {log_path}"
        )

    def _wait_workers_announced(self, deadline: float) -> None:
        if self._announced_workers is None:
            return
        children = {child.name: child for child in self._children}
        pending = {f"worker-{index}" for index in range(self.workers)}
        while pending:
            if self._stop.is_set():
                raise ServiceStartError("stopped before the platform was ready")
            for name in sorted(pending):
                if not children[name].running():
                    raise self._start_failure(children[name])
            try:
                pending -= self._announced_workers(self._urls["redis"])
            except Exception as exc:  # Redis not answering yet: asked again until the deadline
                log.debug("reading the workers' announcements failed: %s", exc)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise ServiceStartError(
                    f"optimizer workers not serving within the start timeout: {', '.join(sorted(pending))} "
                    f"(loading a model? see {self.logs})"
                )
            time.sleep(0.5)

    def _monitor(self) -> None:
        while not self._stop.wait(1.0):
            changed = False
            for component in (*self._infra, *self._children):
                changed = self._watch(component, time.monotonic()) or changed
            if changed:
                self._record_pids()
                self._save()

    def _watch(self, component: Component, now: float) -> bool:
        """Restart ``component`` when it died, after its back-off; True when its recorded state changed."""
        view = self._component_state(component.name)
        if component.running():
            if component.consecutive_failures and now - component.started_at > STABLE_AFTER_S:
                component.consecutive_failures = 0
            return False
        if component.restart_at is None:
            component.consecutive_failures += 1
            delay = restart_delay_s(component.consecutive_failures)
            component.restart_at = now + delay
            view.last_exit = component.exit_status()
            view.status = f"restarting in {delay:g}s"
            log.warning("%s %s; restarting in %gs", component.name, view.last_exit, delay)
            return True
        if now < component.restart_at:
            return False
        component.restart_at = None
        try:
            component.start()
        except Exception as exc:
            # Counted as another failure: the next attempt waits longer.
            log.error("restarting %s failed: %s", component.name, exc)
            view.status = f"failed to restart: {exc}"[:500]
            return True
        component.started_at = now
        view.restarts += 1
        view.status = "running"
        self.state.restarts[component.name] = view.restarts
        log.warning("%s restarted (restart %d)", component.name, view.restarts)
        return True

    def _shutdown(self) -> None:
        # Stages and workers first (they finish or abandon their batch; uncommitted work is redelivered),
        # then the jobs service, then the infrastructure they all depend on.
        order = {name: index for index, name in enumerate(["judge", "generator", "rewriter", "jobs"])}
        children = sorted(self._children, key=lambda c: (not c.name.startswith("worker"), order.get(c.name, 0)))
        for child in children:
            child.stop()
        for component in reversed(self._infra):
            component.stop()
        self._children.clear()
        self._infra.clear()
        self.state.ready = False
        self.state.pids = {}
        self._save()
