"""ManagedProcess and the readiness probes, with short-lived Python children and loopback sockets."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bpo.infra import process
from bpo.infra.kafka import kafka_reachable
from bpo.infra.process import (
    ManagedProcess,
    ServiceStartError,
    SystemUser,
    _permits,
    ephemeral_port_range,
    free_port,
    port_open,
    run_once,
    user_can_access,
)

pytestmark = pytest.mark.unit

SLEEPER = "import time; print('ready', flush=True); time.sleep(60)"
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def started(process: ManagedProcess) -> ManagedProcess:
    process.start()
    process.wait_ready(lambda: "ready" in process.log_tail(), timeout_s=20)
    return process


def test_stop_sends_the_stop_signal_and_reports_the_exit_status(tmp_path: Path) -> None:
    process = started(ManagedProcess("sleeper", python(SLEEPER), log_path=tmp_path / "sleeper.log"))
    pid = process.pid
    assert pid is not None and process.running()
    assert process.stop(timeout_s=10) == -signal.SIGTERM
    assert not process.running() and process.pid is None and not alive(pid)


def test_a_child_ignoring_the_stop_signal_is_killed_after_the_timeout(tmp_path: Path) -> None:
    process = started(ManagedProcess("stubborn", python(STUBBORN), log_path=tmp_path / "stubborn.log"))
    assert process.stop(timeout_s=0.5) == -signal.SIGKILL


def test_a_child_that_exits_early_fails_readiness_with_its_log(tmp_path: Path) -> None:
    process = ManagedProcess(
        "broken", python("print('bad config line 3'); raise SystemExit(3)"), log_path=tmp_path / "b.log"
    )
    process.start()
    with pytest.raises(ServiceStartError, match=r"(?s)status 3.*bad config line 3"):
        process.wait_ready(lambda: False, timeout_s=20)


def test_readiness_times_out_with_the_log(tmp_path: Path) -> None:
    process = started(ManagedProcess("slow", python(SLEEPER), log_path=tmp_path / "slow.log"))
    try:
        with pytest.raises(ServiceStartError, match=r"(?s)within 0.3s.*ready"):
            process.wait_ready(lambda: False, timeout_s=0.3)
    finally:
        process.stop()


def test_a_child_left_running_by_a_killed_parent_is_stopped_before_the_next_start(tmp_path: Path) -> None:
    pid_file = tmp_path / "svc.pid"
    first = started(ManagedProcess("svc", python(SLEEPER), log_path=tmp_path / "svc.log", pid_file=pid_file))
    orphan = first.pid
    assert orphan is not None and pid_file.read_text().strip() == str(orphan)
    # A new platform process knows only the pid file.
    second = started(ManagedProcess("svc", python(SLEEPER), log_path=tmp_path / "svc.log", pid_file=pid_file))
    try:
        assert not alive(orphan)
        assert pid_file.read_text().strip() == str(second.pid)
    finally:
        second.stop()
        first.stop()
    assert not pid_file.exists()


def test_a_pid_file_naming_another_program_is_ignored(tmp_path: Path) -> None:
    pid_file = tmp_path / "svc.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # this pytest process: not the binary the service runs
    other = ManagedProcess("svc", ["/bin/sleep", "60"], log_path=tmp_path / "svc.log", pid_file=pid_file)
    other.start()
    other.stop()
    assert alive(os.getpid())


def test_run_once_fails_with_the_commands_output(tmp_path: Path) -> None:
    run_once("ok", python("print('fine')"), log_path=tmp_path / "once.log")
    with pytest.raises(ServiceStartError, match=r"(?s)status 2.*initdb: cannot"):
        run_once("initdb", python("print('initdb: cannot'); raise SystemExit(2)"), log_path=tmp_path / "once.log")


def _stat(mode: int, uid: int, gid: int) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "owner", "group", "want", "allowed"),
    [
        (0o700, 1000, 1000, os.X_OK, True),  # the user's own directory
        (0o700, 0, 0, os.X_OK, False),  # like /root
        (0o750, 0, 1000, os.X_OK, True),  # through the user's group
        (0o751, 0, 0, os.X_OK, True),  # search permission for others
        (0o751, 0, 0, os.R_OK | os.X_OK, False),  # but no read
        (0o640, 1000, 0, os.R_OK | os.W_OK, True),
    ],
)
def test_permission_bits_are_read_for_the_target_user(
    mode: int, owner: int, group: int, want: int, allowed: bool
) -> None:
    user = SystemUser("svc", uid=1000, gid=1000)
    assert _permits(_stat(stat.S_IFDIR | mode, owner, group), user, frozenset({1000}), want) is allowed


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's own temporary root is private to its user)."""
    base = Path(tempfile.mkdtemp(prefix="bpo-unit-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def test_user_can_access_walks_every_parent(shared_dir: Path) -> None:
    nobody = SystemUser.named("nobody")
    private = shared_dir / "private"
    (private / "inner").mkdir(parents=True)
    target = private / "inner" / "file"
    target.write_text("x")
    private.chmod(0o700)
    (private / "inner").chmod(0o755)
    target.chmod(0o644)
    assert not user_can_access(target, nobody)
    private.chmod(0o755)
    assert user_can_access(target, nobody, mode=os.R_OK)
    assert not user_can_access(target, nobody, mode=os.R_OK | os.W_OK)


def test_port_open_sees_a_listener(tmp_path: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert port_open("127.0.0.1", server.getsockname()[1])
    assert not port_open("127.0.0.1", free_port())


def test_free_ports_avoid_the_ephemeral_range_and_are_bindable() -> None:
    low, high = ephemeral_port_range()
    for _ in range(20):
        base = free_port(4, stride=100)
        ports = [base + i * 100 for i in range(4)]
        assert not any(low <= port <= high for port in ports)
        for port in ports:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port(2)))
        taken = held.getsockname()[1]
        # Only the held port and the one after it are candidates.
        monkeypatch.setattr(process, "_LOWEST_PICKED_PORT", taken)
        assert {free_port(ephemeral=(taken + 2, 65535)) for _ in range(20)} == {taken + 1}


def test_the_ephemeral_range_is_read_or_defaulted(tmp_path: Path) -> None:
    (tmp_path / "range").write_text("20000\t40000\n")
    assert ephemeral_port_range(tmp_path / "range") == (20000, 40000)
    assert ephemeral_port_range(tmp_path / "missing") == (32768, 60999)


def test_no_room_outside_the_ephemeral_range_is_an_error() -> None:
    with pytest.raises(ServiceStartError, match="no room"):
        free_port(10, stride=10000, ephemeral=(1024, 65535))


@contextmanager
def one_shot_server(reply: Callable[[bytes], bytes]) -> Iterator[int]:
    """A loopback server that answers one request with ``reply(request)``."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            size = struct.unpack(">i", connection.recv(4))[0]
            connection.sendall(reply(connection.recv(size)))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        thread.join(timeout=5)
        server.close()


def api_versions_reply(request: bytes) -> bytes:
    api_key, version, correlation_id = struct.unpack(">hhi", request[:8])
    assert (api_key, version) == (18, 0)
    body = struct.pack(">ihi", correlation_id, 0, 0)  # no error, no api versions listed
    return struct.pack(">i", len(body)) + body


def test_kafka_probe_wants_an_api_versions_answer() -> None:
    with one_shot_server(api_versions_reply) as port:
        assert kafka_reachable(f"127.0.0.1:{free_port()},127.0.0.1:{port}")
    with one_shot_server(lambda request: b"HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        assert not kafka_reachable(f"127.0.0.1:{port}")
    assert not kafka_reachable(f"127.0.0.1:{free_port()}")
