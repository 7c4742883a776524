"""Run one embedded service as a child process: start it, wait until it answers, stop it.

Every embedded service (Postgres, Redis, the Kafka-compatible broker) goes through ``ManagedProcess`` so
that they all log to a file, fail with the tail of that log when they do not come up, and stop the same way.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import random
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from bpo.errors import BpoError

__all__ = [
    "ManagedProcess",
    "ServiceStartError",
    "SystemUser",
    "ephemeral_port_range",
    "free_port",
    "last_line",
    "port_open",
    "read_tail",
    "resolve_user",
    "run_once",
    "user_can_access",
]

log = logging.getLogger(__name__)


class ServiceStartError(BpoError):
    """An embedded service did not start, or did not answer in time."""

    status_code = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class SystemUser:
    name: str
    uid: int
    gid: int

    @classmethod
    def named(cls, name: str) -> SystemUser:
        entry = pwd.getpwnam(name)
        return cls(name=name, uid=entry.pw_uid, gid=entry.pw_gid)

    def groups(self) -> frozenset[int]:
        return frozenset({self.gid, *(g.gr_gid for g in grp.getgrall() if self.name in g.gr_mem)})


def resolve_user(user: str | SystemUser | None) -> SystemUser | None:
    if user is None or isinstance(user, SystemUser):
        return user
    try:
        return SystemUser.named(user)
    except KeyError as exc:
        raise ServiceStartError(f"system user {user!r} does not exist") from exc


def user_can_access(path: Path, user: SystemUser, *, mode: int = os.R_OK | os.X_OK) -> bool:
    """Whether ``user`` can reach ``path`` (search permission on every parent) and has ``mode`` on it.

    ``os.access`` only answers for the current user; a root process that hands a path to an unprivileged
    child needs the answer for that child, so this walks the permission bits itself.
    """
    path = path.resolve()
    groups = user.groups()
    for parent in reversed(path.parents):
        if not _permits(parent.stat(), user, groups, os.X_OK):
            return False
    return _permits(path.stat(), user, groups, mode)


def _permits(st: os.stat_result, user: SystemUser, groups: frozenset[int], mode: int) -> bool:
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        bits = {os.R_OK: stat.S_IRUSR, os.W_OK: stat.S_IWUSR, os.X_OK: stat.S_IXUSR}
    elif st.st_gid in groups:
        bits = {os.R_OK: stat.S_IRGRP, os.W_OK: stat.S_IWGRP, os.X_OK: stat.S_IXGRP}
    else:
        bits = {os.R_OK: stat.S_IROTH, os.W_OK: stat.S_IWOTH, os.X_OK: stat.S_IXOTH}
    return all(st.st_mode & bit for flag, bit in bits.items() if mode & flag)


def _executable(pid: int) -> str | None:
    """The binary a live process runs, or None once it has exited (a zombie has none).

    The binary, not the command line: servers such as Redis rewrite their process title.
    """
    try:
        return str(Path(f"/proc/{pid}/exe").readlink())
    except OSError:
        return None


def read_tail(path: Path, max_chars: int = 4000) -> str:
    """The end of a log file ("" when it cannot be read)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_chars))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def last_line(path: Path) -> str:
    """The last non-blank line of a log file, stripped (a crashed Python process's is its exception)."""
    lines = [line.strip() for line in read_tail(path).splitlines() if line.strip()]
    return lines[-1] if lines else ""


# Linux's default, for systems without /proc (macOS hands out 49152-65535, above it).
_DEFAULT_EPHEMERAL_PORTS = (32768, 60999)
# Below it: the well-known and most registered service ports.
_LOWEST_PICKED_PORT = 10000
_PORT_ATTEMPTS = 200


def ephemeral_port_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The ports the kernel gives outgoing connections and port-0 binds (inclusive)."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL_PORTS
    return low, high


def free_port(count: int = 1, *, stride: int = 1, ephemeral: tuple[int, int] | None = None) -> int:
    """A loopback TCP port ``base`` such that ``base + i * stride`` for ``i < count`` can all be bound right now,
    chosen outside the ephemeral range: a port the OS picks from that range is released before the server binds
    it, and any client connecting meanwhile (the platform's processes open many) may be given it as its local
    port, so the server's bind then fails with "address in use"."""
    low, high = ephemeral or ephemeral_port_range()
    reach = (count - 1) * stride
    below = (_LOWEST_PICKED_PORT, low - reach)
    above = (high + 1, 65536 - reach)
    choices = [(first, stop) for first, stop in (below, above) if stop > first]
    if not choices:
        raise ServiceStartError(f"no room for {count} ports {stride} apart outside the ephemeral range {low}-{high}")
    rng = random.SystemRandom()
    for _ in range(_PORT_ATTEMPTS):
        first, stop = rng.choice(choices)
        base = rng.randrange(first, stop)
        if all(_bindable(base + i * stride) for i in range(count)):
            return base
    raise ServiceStartError(f"no {count} free loopback ports {stride} apart found in {_PORT_ATTEMPTS} tries")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def run_once(
    name: str,
    command: Sequence[str | os.PathLike[str]],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | SystemUser | None = None,
    timeout_s: float = 300.0,
) -> None:
    """Run a setup command (such as ``initdb``) to completion, logging like a service; fail with the log's tail."""
    process = ManagedProcess(name, command, log_path=log_path, env=env, cwd=cwd, user=user)
    process.start()
    code = process.wait_exit(timeout_s)
    if code != 0:
        raise ServiceStartError(f"{name} failed with status {code}; end of {log_path}:\n{process.log_tail()}")


class ManagedProcess:
    """One long-running child process with a log file, a readiness wait and a bounded stop.

    The child gets its own session, so a Ctrl-C in the platform's terminal does not reach it directly: the
    platform stops its services itself, in order, after its own workers. ``stop`` sends ``stop_signal`` to the
    child alone (a server such as Postgres shuts its own workers down), then SIGKILL to the whole group.

    With a ``pid_file``, a child left running by a platform process that was killed (its own session keeps it
    alive) is found on the next start, by pid and binary, and stopped before a new one starts:
    otherwise it would hold the port and, for Postgres, the data directory's lock.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str | os.PathLike[str]],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | SystemUser | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        pid_file: Path | None = None,
    ) -> None:
        self.name = name
        self.command = [os.fspath(part) for part in command]
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.user = resolve_user(user)
        self.stop_signal = stop_signal
        self.pid_file = pid_file
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running():
            raise ServiceStartError(f"{self.name} is already running (pid {self.pid})")
        self._stop_orphan()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        # Without group and extra_groups the child would keep root's groups after dropping its uid.
        drop = self.user is not None and self.user.uid != os.geteuid()
        log.info("starting %s: %s (log %s)", self.name, " ".join(self.command), self.log_path)
        try:
            self._process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                user=self.user.uid if drop and self.user is not None else None,
                group=self.user.gid if drop and self.user is not None else None,
                extra_groups=[] if drop else None,
            )
        except OSError as exc:
            self._close_log()
            raise ServiceStartError(f"cannot start {self.name} ({self.command[0]}): {exc}") from exc
        if self.pid_file is not None:
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.pid_file.write_text(f"{self._process.pid}\n")

    def wait_ready(self, check: Callable[[], bool], timeout_s: float, *, interval_s: float = 0.2) -> None:
        """Poll ``check`` until it returns True; fail early, with the log's tail, if the child exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.running():
                raise ServiceStartError(
                    f"{self.name} exited with status {self.returncode} before it was ready; "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            if check():
                return
            if time.monotonic() >= deadline:
                raise ServiceStartError(
                    f"{self.name} did not become ready within {timeout_s:g}s; end of {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(interval_s)

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for a one-shot command to finish; stop it and fail if it runs past ``timeout_s``."""
        process = self._process
        if process is None:
            raise ServiceStartError(f"{self.name} was never started")
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            self.stop()
            raise ServiceStartError(
                f"{self.name} did not finish within {timeout_s:g}s; end of {self.log_path}:\n{self.log_tail()}"
            ) from exc
        self._process = None
        self._close_log()
        self._forget_pid()
        return code

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """Ask the child to stop, kill its process group if it has not within ``timeout_s``; the exit status."""
        process = self._process
        if process is None:
            return None
        try:
            if process.poll() is None:
                process.send_signal(self.stop_signal)
                try:
                    process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored %s for %gs: killing it", self.name, process.pid,
                                self.stop_signal.name, timeout_s)  # fmt: skip
                    # Killed before it is reaped, so the group id cannot have been reused by anyone else;
                    # the group takes the server's own children (e.g. Postgres backends) with it.
                    self._kill_group(process.pid)
                    process.wait()
            log.info("%s stopped with status %s", self.name, process.returncode)
            return process.returncode
        finally:
            self._process = None
            self._close_log()
            self._forget_pid()

    def log_tail(self, max_chars: int = 4000) -> str:
        return read_tail(self.log_path, max_chars)

    def _stop_orphan(self, timeout_s: float = 30.0) -> None:
        if self.pid_file is None:
            return
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        binary = str(Path(self.command[0]).resolve())
        if _executable(pid) != binary:
            self._forget_pid()
            return
        log.warning("%s: stopping pid %d left running by an earlier process", self.name, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, self.stop_signal)
        deadline = time.monotonic() + timeout_s
        while _executable(pid) == binary and time.monotonic() < deadline:
            time.sleep(0.1)
        if _executable(pid) == binary:
            self._kill_group(pid)
            while _executable(pid) == binary:
                time.sleep(0.1)
        self._forget_pid()

    def _forget_pid(self) -> None:
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)

    def _kill_group(self, pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ManagedProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
