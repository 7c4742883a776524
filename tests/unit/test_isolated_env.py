from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bpo.infra.process import ServiceStartError, ephemeral_port_range
from bpo.settings import REPLICA_PORT_STRIDE
from bpo.stack import isolated
from bpo.stack.isolated import EMBEDDED_PORTS, GRPC_PORTS, ISOLATED_REPLICAS, METRICS_SPAN, isolated_platform_env

pytestmark = pytest.mark.unit


def platform_ports(env: dict[str, str]) -> dict[str, set[int]]:
    """Every port each setting stands for: the metrics span, each gRPC port's replicas, the embedded services."""
    base = int(env["BPO_PLATFORM__METRICS_PORT_BASE"])
    ports = {"METRICS_PORT_BASE": set(range(base, base + METRICS_SPAN))}
    for name in GRPC_PORTS:
        port = int(env[f"BPO_PLATFORM__{name}"])
        ports[name] = {port + replica * REPLICA_PORT_STRIDE for replica in range(ISOLATED_REPLICAS)}
    for name in EMBEDDED_PORTS:
        ports[name] = {int(env[f"BPO_PLATFORM__{name}"])}
    return ports


def test_ports_are_distinct_even_when_the_os_repeats_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The metrics base, then a port inside its span, a repeat, a port whose replica port lands in the metrics span,
    # then fresh ones with repeats among them.
    offered: Iterator[int] = iter([
        20000, 20003, 20000, 19950, 21000, 21000, 21001, 20050, 21002, 21003, 21003, 22000, 22001, 22002,
    ])  # fmt: skip
    monkeypatch.setattr(isolated, "free_port", lambda count=1, stride=1: next(offered))
    (tmp_path / "state").mkdir()
    env = isolated_platform_env(tmp_path / "state", tmp_path / "models", model="m")
    ports = platform_ports(env)
    assert env["BPO_PLATFORM__METRICS_PORT_BASE"] == "20000"
    assert env["BPO_PLATFORM__JOBS_PORT"] == "21000"
    every = [port for group in ports.values() for port in group]
    assert len(every) == len(set(every))


def test_a_platform_that_cannot_find_distinct_ports_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolated, "free_port", lambda count=1, stride=1: 20000)
    (tmp_path / "state").mkdir()
    with pytest.raises(ServiceStartError, match="clear of this platform's other ports"):
        isolated_platform_env(tmp_path / "state", tmp_path / "models", model="m")


def test_real_ports_lie_outside_the_ephemeral_range(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    low, high = ephemeral_port_range()
    env = isolated_platform_env(tmp_path / "state", tmp_path / "models", model="m")
    every = [port for group in platform_ports(env).values() for port in group]
    assert len(every) == len(set(every))
    assert not any(low <= port <= high for port in every)
