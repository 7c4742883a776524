"""Engines for the declared endpoints jobs name as target and judge: built on first use, kept, closed together.

A job names its target and judge by endpoint name; the generator and judge services hold one engine per
endpoint, built from the operator's declaration (``bpo.endpoints``), never from anything the caller sent.
In-process models stay loaded; how many are held at once is bounded because each costs memory. Given a cache,
every engine answers repeated greedy requests from it (``bpo/engines/cached.py``).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

from bpo.endpoints import Endpoints
from bpo.engines.base import EngineClient
from bpo.engines.cached import CachingEngine, CompletionCache
from bpo.engines.factory import build_engine, resolve_spec
from bpo.engines.observer import EndpointObserver
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer


class EngineRegistry:
    def __init__(
        self,
        endpoints: Endpoints,
        catalogue: ModelCatalogue,
        preparer: ModelPreparer,
        *,
        max_in_process: int = 2,
        cache: CompletionCache | None = None,
        on_cache_lookup: Callable[[int, int], None] | None = None,
        observe: Callable[[str], EndpointObserver] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self._catalogue = catalogue
        self._preparer = preparer
        self._max_in_process = max_in_process
        self._cache = cache
        self._on_cache_lookup = on_cache_lookup
        # The observer of each endpoint's requests, by endpoint name (metrics).
        self._observe = observe
        self._engines: OrderedDict[str, EngineClient] = OrderedDict()
        self._remote: set[str] = set()
        self._lock = asyncio.Lock()

    async def get(self, name: str) -> EngineClient:
        """The engine of the declared endpoint ``name`` (checked by the caller for role and team)."""
        async with self._lock:
            engine = self._engines.get(name)
            if engine is not None:
                self._engines.move_to_end(name)
                return engine
            endpoint = self.endpoints.get(name)
            settings = self.endpoints.engine_settings(endpoint)
            spec = resolve_spec(settings, self._catalogue)
            if endpoint.engine != "openai":
                await self._evict_in_process()
            observer = self._observe(name) if self._observe is not None else None
            engine = await asyncio.to_thread(build_engine, settings, spec, self._preparer, observer)
            if self._cache is not None:
                engine = CachingEngine(engine, self._cache, self._on_cache_lookup)
            if endpoint.engine == "openai":
                self._remote.add(name)
            self._engines[name] = engine
            return engine

    async def _evict_in_process(self) -> None:
        local = [name for name in self._engines if name not in self._remote]
        while len(local) >= self._max_in_process:
            oldest = local.pop(0)
            await self._engines.pop(oldest).aclose()

    async def aclose(self) -> None:
        async with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
        for engine in engines:
            await engine.aclose()
