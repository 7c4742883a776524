"""Greedy completions remembered across jobs: the same request to the same model is answered once.

An evaluation asks the target for the original prompt's answer in every job that covers that prompt (each
optimizer variant, each number of rounds), and asks the judge about pairs it has already judged when a job
is run again. Greedy decoding makes those calls repeatable, so their results are kept in Postgres, keyed by
the model's name and version, the exact messages and the sampling parameters. Sampled requests are never
cached: a second call is supposed to differ.

A cached completion reports zero tokens and zero latency, so job reports count only what was spent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Protocol

from bpo.engines.base import Completion, EngineClient, GenerationRequest, ModelIdentity


class CompletionCache(Protocol):
    def cached_completions(self, keys: Sequence[str]) -> dict[str, Completion]: ...

    def cache_completions(self, model: str, entries: Mapping[str, Completion]) -> None: ...


def completion_key(identity: ModelIdentity, request: GenerationRequest) -> str | None:
    """A stable key for a repeatable request; ``None`` for a sampled one."""
    if not request.params.greedy:
        return None
    payload = {
        "model": identity.name,
        "version": identity.version,
        "messages": request.messages_as_dicts() if request.messages is not None else None,
        "prompt": request.prompt,
        "params": asdict(request.params),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class CachingEngine(EngineClient):
    def __init__(
        self, inner: EngineClient, cache: CompletionCache, on_lookup: Callable[[int, int], None] | None = None
    ) -> None:
        super().__init__(inner.identity, inner.context_length)
        self.engine_name = inner.engine_name
        self.inner = inner
        self._cache = cache
        self._on_lookup = on_lookup

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        results = await self.generate_each(requests)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return [r for r in results if isinstance(r, Completion)]

    async def generate_each(self, requests: Sequence[GenerationRequest]) -> list[Completion | Exception]:
        keys = [completion_key(self.identity, request) for request in requests]
        wanted = [key for key in keys if key is not None]
        hits = await asyncio.to_thread(self._cache.cached_completions, wanted) if wanted else {}
        missing = [i for i, key in enumerate(keys) if key is None or key not in hits]
        fresh = await self.inner.generate_each([requests[i] for i in missing]) if missing else []
        new_entries = {
            key: c for i, c in zip(missing, fresh, strict=True) if (key := keys[i]) and isinstance(c, Completion)
        }
        if new_entries:
            await asyncio.to_thread(self._cache.cache_completions, self.identity.name, new_entries)
        if self._on_lookup is not None:
            self._on_lookup(len(requests) - len(missing), len(missing))
        results: list[Completion | Exception | None] = [None] * len(requests)
        for i, outcome in zip(missing, fresh, strict=True):
            results[i] = outcome
        for i, key in enumerate(keys):
            if results[i] is None and key is not None:
                results[i] = replace(hits[key], prompt_tokens=0, completion_tokens=0, latency_s=0.0)
        return [r for r in results if r is not None]

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return self.inner.count_prompt_tokens(request)

    async def aclose(self) -> None:
        await self.inner.aclose()
