"""Engines for targets and judges named per job: built on first use, kept, and closed together.

A job names where its target and judge run (an engine and model, or an OpenAI-compatible endpoint); the
generator and judge services hold one engine per distinct endpoint. In-process models stay loaded; the
number of in-process models held at once is bounded because each costs memory. Given a cache, every engine
answers repeated greedy requests from it (``bpo/engines/cached.py``).
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from bpo.engines.base import EngineClient
from bpo.engines.cached import CachingEngine, CompletionCache
from bpo.engines.factory import build_engine, resolve_spec
from bpo.errors import InvalidConfigurationError
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.settings import EngineName, EngineSettings


@dataclass(frozen=True, slots=True)
class EndpointKey:
    engine: EngineName
    model: str
    base_url: str = ""
    api_key_env: str = ""
    max_concurrency: int = 0
    requests_per_second: float = 0.0


class EngineRegistry:
    def __init__(
        self,
        base: EngineSettings,
        catalogue: ModelCatalogue,
        preparer: ModelPreparer,
        *,
        max_in_process: int = 2,
        cache: CompletionCache | None = None,
        on_cache_lookup: Callable[[int, int], None] | None = None,
    ) -> None:
        self._base = base
        self._catalogue = catalogue
        self._preparer = preparer
        self._max_in_process = max_in_process
        self._cache = cache
        self._on_cache_lookup = on_cache_lookup
        self._engines: OrderedDict[EndpointKey, EngineClient] = OrderedDict()
        self._lock = asyncio.Lock()

    def settings_for(self, key: EndpointKey) -> EngineSettings:
        update: dict[str, object] = {"name": key.engine, "model": key.model}
        if key.engine == "openai":
            if not key.base_url:
                raise InvalidConfigurationError(f"endpoint for {key.model!r} uses engine openai but names no base_url")
            update.update(openai_base_url=key.base_url, openai_model=key.model)
            if key.api_key_env:
                value = os.environ.get(key.api_key_env)
                if value is None:
                    raise InvalidConfigurationError(f"environment variable {key.api_key_env} is not set on the service")
                update["openai_api_key"] = value
        if key.max_concurrency:
            update["max_concurrency"] = key.max_concurrency
        if key.requests_per_second and "requests_per_second" in EngineSettings.model_fields:
            update["requests_per_second"] = key.requests_per_second
        return EngineSettings.model_validate(self._base.model_dump() | update)

    async def get(self, key: EndpointKey) -> EngineClient:
        async with self._lock:
            engine = self._engines.get(key)
            if engine is not None:
                self._engines.move_to_end(key)
                return engine
            settings = self.settings_for(key)
            spec = resolve_spec(settings, self._catalogue)
            if key.engine != "openai":
                await self._evict_in_process()
            engine = await asyncio.to_thread(build_engine, settings, spec, self._preparer)
            if self._cache is not None:
                engine = CachingEngine(engine, self._cache, self._on_cache_lookup)
            self._engines[key] = engine
            return engine

    async def _evict_in_process(self) -> None:
        local = [k for k in self._engines if k.engine != "openai"]
        while len(local) >= self._max_in_process:
            oldest = local.pop(0)
            await self._engines.pop(oldest).aclose()

    async def aclose(self) -> None:
        async with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
        for engine in engines:
            await engine.aclose()
