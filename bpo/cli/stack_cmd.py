"""``bpo up``, ``bpo status``, ``bpo down``, and the process entry points the supervisor starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Annotated

import redis
import typer

from bpo.errors import EngineUnavailableError, InvalidConfigurationError
from bpo.observability.prometheus import require_binary
from bpo.settings import BpoSettings
from bpo.stack.supervisor import ConnectionUrls, StackState, Supervisor, grpc_healthy, make_private
from services.optimizer_worker.presence import announced_nodes
from services.optimizer_worker.settings import WorkerSettings


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def up(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every service to be healthy.")] = 900,
    with_prometheus: Annotated[
        bool, typer.Option("--with-prometheus", help="Also run Prometheus scraping every process (its URL is printed).")
    ] = False,
    replicas: Annotated[
        int | None,
        typer.Option(min=1, help="Replicas of each stage service (rewriter, generator, judge); default 1."),
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Optimizer worker processes; default 1.")] = None,
) -> None:
    """Start the platform: embedded Postgres, Kafka and Redis unless configured, then services and workers."""
    # The supervisor reads its settings from the environment like every process: the options become variables.
    if replicas is not None:
        os.environ["BPO_PLATFORM__REPLICAS"] = str(replicas)
    if workers is not None:
        os.environ["BPO_PLATFORM__WORKERS"] = str(workers)
    settings = BpoSettings()
    if with_prometheus:
        require_binary("prometheus")  # fails now, before anything starts
    state = StackState.load(settings)
    if state is not None and _alive(state.supervisor_pid):
        typer.echo(f"platform already up (supervisor pid {state.supervisor_pid}); see `bpo status`")
        return
    StackState.path(settings).unlink(missing_ok=True)
    # The state directory holds credentials and logs: private to its owner from the first file on.
    make_private(settings.state_dir / "stack")
    log_path = settings.state_dir / "stack" / "logs" / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bpo.cli.main", "supervise", *(["--with-prometheus"] if with_prometheus else [])],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = StackState.load(settings)
        if state is not None and state.error:
            raise EngineUnavailableError(f"platform failed to start: {state.error} (logs: {log_path.parent})")
        if state is not None and state.ready:
            _print_state(state)
            return
        if process.poll() is not None:
            raise EngineUnavailableError(f"supervisor exited with {process.returncode}; see {log_path}")
        time.sleep(0.5)
    raise EngineUnavailableError(f"platform not ready within {timeout:g}s; see {log_path.parent}")


def _print_state(state: StackState) -> None:
    typer.echo(f"platform up (supervisor pid {state.supervisor_pid})")
    typer.echo(f"  postgres  {state.database_url}{' (embedded)' if 'postgres' in state.embedded else ''}")
    typer.echo(f"  kafka     {state.kafka_bootstrap}{' (embedded)' if 'kafka' in state.embedded else ''}")
    typer.echo(f"  redis     {state.redis_url}{' (embedded)' if 'redis' in state.embedded else ''}")
    for name, address in state.addresses.items():
        typer.echo(f"  {name:<9} {address}")
    if state.prometheus_url:
        typer.echo(f"  prometheus {state.prometheus_url} (dashboards to import: bpo/resources/grafana/)")


def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show what is running and whether each service answers its health check."""
    settings = BpoSettings()
    state = StackState.load(settings)
    if state is None or not _alive(state.supervisor_pid):
        typer.echo("platform is down")
        raise typer.Exit(1)
    report = {
        "supervisor_pid": state.supervisor_pid,
        "ready": state.ready,
        "services": {name: grpc_healthy(address, settings) for name, address in state.addresses.items()},
        "processes": {name: _alive(pid) for name, pid in state.pids.items()},
        "restarts": state.restarts,
        "components": state.components,
        "embedded": state.embedded,
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_state(state)
    for name, healthy in report["services"].items():  # type: ignore[attr-defined]
        typer.echo(f"  {name:<9} {'SERVING' if healthy else 'NOT SERVING'}")
    for name, component in state.components.items():
        pid = state.pids.get(name)
        where = f"pid {pid} " if pid is not None else ""
        last = f", last: {component['last_exit']}" if component.get("last_exit") else ""
        typer.echo(f"  {name:<9} {where}{component['status']} (restarts: {component['restarts']}{last})")


def down(timeout: Annotated[float, typer.Option(help="Seconds to wait for a clean stop.")] = 120) -> None:
    """Stop the platform; jobs and their data stay and resume at the next `bpo up`."""
    settings = BpoSettings()
    state = StackState.load(settings)
    if state is None or not _alive(state.supervisor_pid):
        typer.echo("platform is already down")
        return
    os.kill(state.supervisor_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(state.supervisor_pid) and time.monotonic() < deadline:
        time.sleep(0.3)
    if _alive(state.supervisor_pid):
        raise EngineUnavailableError(f"supervisor {state.supervisor_pid} did not stop within {timeout:g}s")
    typer.echo("platform down")


def migrate() -> None:
    """Apply the database migrations (BPO_PLATFORM__DATABASE_URL, or the running platform's database)."""
    from bpo.store.db import migrate_database, required_schema_version

    settings = BpoSettings()
    url = settings.platform.database_url
    if not url:
        state, running = StackState.load(settings), ConnectionUrls.load(settings)
        url = running.database_url if running and state is not None and _alive(state.supervisor_pid) else ""
    if not url:
        raise InvalidConfigurationError("no database: set BPO_PLATFORM__DATABASE_URL or start the platform (`bpo up`)")
    applied = migrate_database(url)
    typer.echo(f"schema at version {required_schema_version()}; applied now: {', '.join(applied) or 'nothing'}")


def supervise(
    with_prometheus: Annotated[bool, typer.Option("--with-prometheus", help="Also run Prometheus.")] = False,
) -> None:
    """(internal) Run the supervisor in the foreground; `bpo up` starts it detached."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    settings = BpoSettings()
    raise typer.Exit(
        Supervisor(settings, with_prometheus=with_prometheus, announced_workers=announced_workers(settings)).run()
    )


def announced_workers(settings: BpoSettings) -> Callable[[str], set[str]]:
    """Reads which of `bpo up`'s workers announced themselves, in the Redis their broker URL names (the
    platform's, given to the children as ``redis_url``, unless ``BPO_WORKER_BROKER_URL`` says otherwise)."""

    def read(redis_url: str) -> set[str]:
        platform = settings.platform.model_copy(update={"redis_url": redis_url})
        worker = WorkerSettings.for_platform(settings.model_copy(update={"platform": platform}))
        client = redis.Redis.from_url(worker.broker_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return announced_nodes(client)
        finally:
            client.close()

    return read


def serve(name: Annotated[str, typer.Argument(help="jobs, rewriter, generator or judge")]) -> None:
    """(internal) Run one platform service in the foreground."""
    import logging

    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s", force=True
    )
    settings = BpoSettings()
    if name == "jobs":
        from services.jobs.main import main
    elif name == "rewriter":
        from services.rewriter.main import main
    elif name == "generator":
        from services.generator.main import main
    elif name == "judge":
        from services.judge.main import main
    else:
        raise InvalidConfigurationError(f"unknown service {name!r}")
    main(settings)


def worker(name: Annotated[str, typer.Option(help="A name for this worker's logs and metrics.")] = "worker") -> None:
    """(internal) Run a Celery optimizer worker for the platform's optimizer model."""
    from services.optimizer_worker.worker import run_for_platform

    run_for_platform(BpoSettings(), name)
