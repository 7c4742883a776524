"""Prometheus beside a platform on one machine: where its binary is, what it scrapes, how it is run.

``bpo up --with-prometheus`` runs it under the supervisor with the configuration written here, and so does the
scrape test (tests/integration/test_observability.py). On Kubernetes the Prometheus Operator's monitors
(``k8s/components/monitoring``) scrape the same metrics ports.

The configuration is written as JSON, which Prometheus reads as the YAML it is a subset of.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from bpo.errors import InvalidConfigurationError
from bpo.settings import SERVICE_PROCESSES, STAGE_SERVICES, BpoSettings

# The alert rules (one copy; the PrometheusRule in k8s/ is generated from it).
RULES_RESOURCE = ("prometheus", "alerts.yaml")
# Scrape jobs, named as the Kubernetes Services and the workers' PodMonitor name them.
SERVICE_JOB = {process: f"bpo-{process}" for process in SERVICE_PROCESSES}
WORKER_JOB = "bpo-optimizer-worker"
# Addresses that mean "every interface" when bound; scraped through loopback.
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def rules_file() -> Path:
    """The alert rule file shipped in the package."""
    return Path(str(resources.files("bpo.resources").joinpath(*RULES_RESOURCE)))


def find_binary(name: str) -> Path | None:
    """``name`` beside the running Python (``make install`` puts prometheus and promtool in .venv/bin, which is
    not on PATH unless the virtualenv is activated), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def require_binary(name: str) -> Path:
    found = find_binary(name)
    if found is None:
        raise InvalidConfigurationError(
            f"no {name} binary beside {sys.executable} or on PATH: `make install` puts Prometheus' binaries in "
            ".venv/bin (from Debian's prometheus package); or install Prometheus and put it on PATH"
        )
    return found


def scrape_address(bind_host: str, port: int) -> str:
    host = "127.0.0.1" if bind_host in _ANY_ADDRESS else bind_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def scrape_targets(settings: BpoSettings) -> dict[str, list[str]]:
    """Scrape job -> metrics addresses of the platform ``bpo up`` starts with ``settings``: the four services and
    each optimizer worker and every further stage-service replica (which bind the services' metrics host on the ports
    the settings assign)."""
    platform = settings.platform
    targets = {
        SERVICE_JOB[service]: [
            scrape_address(platform.metrics_host, platform.metrics_port(platform.process_name(service, replica)))
            for replica in range(platform.replicas if service in STAGE_SERVICES else 1)
        ]
        for service in SERVICE_PROCESSES
    }
    targets[WORKER_JOB] = [
        scrape_address(platform.metrics_host, platform.metrics_port(f"worker-{index}"))
        for index in range(platform.workers)
    ]
    return targets


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def prometheus_config(
    targets: Mapping[str, Sequence[str]], *, scrape_interval_s: float, rule_files: Sequence[Path]
) -> dict[str, Any]:
    """Prometheus' configuration: every job's static targets, scraped and evaluated every ``scrape_interval_s``."""
    return {
        "global": {
            "scrape_interval": _duration(scrape_interval_s),
            # A scrape may not outlast its interval; ten seconds is plenty for a local endpoint.
            "scrape_timeout": _duration(min(scrape_interval_s, 10.0)),
            "evaluation_interval": _duration(scrape_interval_s),
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(addresses)}]} for job, addresses in targets.items()
        ],
    }


@dataclass(frozen=True, slots=True)
class LocalPrometheus:
    """A Prometheus server kept in ``folder`` (configuration and data, so its history outlives ``bpo down``)."""

    binary: Path
    folder: Path
    host: str
    port: int

    @classmethod
    def for_platform(cls, settings: BpoSettings, folder: Path) -> LocalPrometheus:
        platform = settings.platform
        return cls(require_binary("prometheus"), folder, platform.host, platform.prometheus_port)

    @property
    def url(self) -> str:
        return f"http://{scrape_address(self.host, self.port)}"

    @property
    def config_path(self) -> Path:
        return self.folder / "prometheus.yml"

    def write_config(self, settings: BpoSettings) -> Path:
        config = prometheus_config(
            scrape_targets(settings),
            scrape_interval_s=settings.platform.prometheus_scrape_interval_s,
            rule_files=[rules_file()],
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return self.config_path

    def command(self) -> list[str]:
        return [
            str(self.binary),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.folder / 'data'}",
            f"--web.listen-address={scrape_address(self.host, self.port)}",
            # A laptop's platform, not a monitoring system of record: two weeks of history is enough.
            "--storage.tsdb.retention.time=15d",
        ]

    def ready(self, timeout_s: float = 1.0) -> bool:
        """Whether the server answers its readiness endpoint (its storage loaded, scraping started)."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=timeout_s) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False
