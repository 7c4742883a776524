"""Which optimizer models live workers serve, from heartbeats in the broker's Redis.

A worker's parent process keeps the key ``bpo:optimizer-worker:<node>`` holding the models it serves, refreshed
every third of its time to live: a worker that dies drops out of the list within ``ttl_s``. Clients read the list
before sending work, so a model no live worker serves is known at once, instead of after the task's timeout,
and tasks are not queued where nobody takes them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

log = logging.getLogger(__name__)

KEY_PREFIX = "bpo:optimizer-worker:"
DEFAULT_TTL_S = 30.0
# Bounds the scan of a shared Redis: far more worker keys than any deployment runs.
_MAX_WORKER_KEYS = 10_000


class PresenceBeacon:
    """The worker side: announce ``models`` under ``node`` until ``stop``."""

    def __init__(self, client: redis.Redis, node: str, models: Sequence[str], *, ttl_s: float = DEFAULT_TTL_S) -> None:
        self._client = client
        self._key = f"{KEY_PREFIX}{node}"
        self._value = json.dumps({"models": list(models), "node": node})
        self._ttl_s = ttl_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="presence-beacon", daemon=True)

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self._client.delete(self._key)
        except redis.RedisError:
            log.warning("could not withdraw %s; it expires within %gs", self._key, self._ttl_s)

    def _beat(self) -> None:
        try:
            self._client.set(self._key, self._value, ex=max(1, round(self._ttl_s)))
        except redis.RedisError as exc:
            # Redis away: the key expires and clients see no worker, which is the truth as far as they can tell.
            log.warning("presence heartbeat failed: %s", exc)

    def _run(self) -> None:
        while not self._stopped.wait(self._ttl_s / 3):
            self._beat()


def announced_nodes(client: redis.Redis) -> set[str]:
    """The nodes of the workers announced now (whose heartbeat has not expired). Raises ``redis.RedisError``."""
    nodes: set[str] = set()
    for key in client.scan_iter(match=f"{KEY_PREFIX}*", count=500):
        nodes.add((key.decode() if isinstance(key, bytes) else str(key)).removeprefix(KEY_PREFIX))
        if len(nodes) >= _MAX_WORKER_KEYS:
            break
    return nodes


class ServedModels:
    """The client side: which models live workers serve now (cached for ``cache_s``)."""

    def __init__(
        self, client: redis.Redis, *, cache_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._client = client
        self._cache_s = cache_s
        self._clock = clock
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._served: dict[str, int] = {}

    def live(self, *, fresh: bool = False) -> dict[str, int]:
        """Model -> how many live workers serve it (``fresh``: read now, not from the cache). Raises
        ``redis.RedisError`` when Redis is unreachable."""
        now = self._clock()
        with self._lock:
            if not fresh and self._read_at is not None and now - self._read_at < self._cache_s:
                return dict(self._served)
        served = self._read()
        with self._lock:
            self._served, self._read_at = served, now
        return dict(served)

    def _read(self) -> dict[str, int]:
        keys: list[Any] = []
        for key in self._client.scan_iter(match=f"{KEY_PREFIX}*", count=500):
            keys.append(key)
            if len(keys) >= _MAX_WORKER_KEYS:
                break
        served: dict[str, int] = {}
        for raw in self._client.mget(keys) if keys else []:
            if raw is None:
                continue
            try:
                models = json.loads(raw)["models"]
            except (ValueError, KeyError, TypeError):
                continue
            for model in models if isinstance(models, list) else []:
                if isinstance(model, str):
                    served[model] = served.get(model, 0) + 1
        return served
