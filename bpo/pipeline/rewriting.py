"""Rewriting through the optimizer workers with the rewrite cache in front of them.

The cache key is (prompt and context hash, optimizer model version, sampling parameters): a corpus with repeats
costs one model call per distinct prompt, and a job re-run after a crash repays nothing already rewritten.
The gRPC Optimizer service and the Kafka rewrite stage share this one path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from bpo.engines.factory import model_identity, resolve_spec
from bpo.messages import from_json, params_hash, prompt_hash, rewrite_from_result, to_json
from bpo.metrics import PlatformMetrics
from bpo.models.catalogue import ModelCatalogue
from bpo.models.prepare import ModelPreparer
from bpo.optimizer.optimizer import OptimizeParams, PromptInput, RewriteFailure, RewriteResult
from bpo.settings import EngineSettings
from bpo.store.repository import PipelineStore
from bpo.v1 import bpo_pb2 as pb


class OptimizerBackend(Protocol):
    async def optimize_batch(
        self, model: str, params: OptimizeParams, inputs: Sequence[PromptInput]
    ) -> list[RewriteResult | RewriteFailure]: ...


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """What a model name stands for now: the rewrite cache's key, and the version a worker serving it reports
    on its results (``RewriteResult.model_version``). They differ only for a registry alias, whose key names the
    registered model too."""

    cache_key: str
    produced_by: str


class ModelVersions:
    """The version a model name stands for now, without loading it, computed as the workers' engines compute
    their own identity (``bpo.engines.factory.model_identity``) from the same engine settings."""

    def __init__(
        self,
        catalogue: ModelCatalogue,
        preparer: ModelPreparer,
        store: PipelineStore,
        engine_settings_for: Callable[[str], EngineSettings],
    ) -> None:
        self._catalogue = catalogue
        self._preparer = preparer
        self._store = store
        self._engine_settings_for = engine_settings_for
        self._fixed: dict[str, str] = {}

    def version_of(self, model: str) -> ModelVersion:
        alias = self._store.resolve_alias(model)
        if alias is not None:
            name, version = alias
            return ModelVersion(f"{name}@{version}", version)
        if model not in self._fixed:
            settings = self._engine_settings_for(model)
            spec = resolve_spec(settings, self._catalogue)
            self._fixed[model] = model_identity(settings, spec, self._preparer).version
        return ModelVersion(self._fixed[model], self._fixed[model])


@dataclass(frozen=True, slots=True)
class RewriteOutcome:
    rewrite: pb.Rewrite | None
    failure: RewriteFailure | None


class CachedRewriter:
    """Rewrites a stage batch: cache hits from the store, misses from the optimizer workers in tasks of at most
    ``task_size`` prompts, all sent at once. A stage batch larger than a task then keeps every worker busy, and
    a worker's next task waits on its queue while it runs the current one, instead of after the stage has
    written the batch and read the next."""

    def __init__(
        self,
        store: PipelineStore,
        backend: OptimizerBackend,
        versions: ModelVersions,
        metrics: PlatformMetrics,
        *,
        task_size: int = 8,
    ) -> None:
        if task_size < 1:
            raise ValueError("task_size must be at least 1")
        self._store = store
        self._backend = backend
        self._versions = versions
        self._metrics = metrics
        self._task_size = task_size

    async def rewrite(self, items: Sequence[pb.PromptItem], model: str, params: OptimizeParams) -> list[RewriteOutcome]:
        """Per item: its rewrite (from the cache, or from the tasks the batch's misses were sent in), or its
        failure. Raises when a task could not be run (no worker answered, the broker is down): the batch is
        then retried whole, and the tasks that did finish are found by their ids instead of being run again."""
        expected = await asyncio.to_thread(self._versions.version_of, model)
        version = expected.cache_key
        p_hash = params_hash(params)
        keys = [prompt_hash(item.prompt, item.context or None) for item in items]
        cached = await asyncio.to_thread(self._store.cached_rewrites, keys, version, p_hash)
        outcomes: list[RewriteOutcome | None] = [None] * len(items)
        misses: list[int] = []
        for index, (item, key) in enumerate(zip(items, keys, strict=True)):
            stored = cached.get(key)
            if stored is None:
                misses.append(index)
                continue
            rewrite = from_json(stored, pb.Rewrite)
            rewrite.item.CopyFrom(item)
            rewrite.cache_hit = True
            # A hit costs no model call: its tokens were paid by the item that filled the cache.
            rewrite.tokens_in = 0
            rewrite.tokens_out = 0
            outcomes[index] = RewriteOutcome(rewrite, None)
        self._metrics.cache_lookups.labels("hit").inc(len(items) - len(misses))
        self._metrics.cache_lookups.labels("miss").inc(len(misses))
        if misses:
            # Repeats inside one batch are rewritten once too: the first of each distinct prompt is sent.
            first_of: dict[str, int] = {}
            for index in misses:
                first_of.setdefault(keys[index], index)
            unique = list(first_of.values())
            inputs = [PromptInput(items[i].prompt, items[i].context or None) for i in unique]
            results = dict(zip(unique, await self._optimize(model, params, inputs), strict=True))
            fills: dict[str, dict[str, object]] = {}
            for index in misses:
                item, key = items[index], keys[index]
                source = first_of[key]
                result = results[source]
                if isinstance(result, RewriteFailure):
                    outcomes[index] = RewriteOutcome(None, result)
                    continue
                rewrite = rewrite_from_result(item, result, cache_hit=source != index)
                if source != index:
                    rewrite.tokens_in = 0
                    rewrite.tokens_out = 0
                    outcomes[index] = RewriteOutcome(rewrite, None)
                    continue
                # An alias can move while a batch runs: cache only what the version looked up actually produced.
                if result.model_version == expected.produced_by:
                    cacheable = pb.Rewrite()
                    cacheable.CopyFrom(rewrite)
                    cacheable.ClearField("item")
                    fills[key] = to_json(cacheable)
                self._metrics.tokens.labels("optimizer", "in").inc(result.tokens_in)
                self._metrics.tokens.labels("optimizer", "out").inc(result.tokens_out)
                outcomes[index] = RewriteOutcome(rewrite, None)
            await asyncio.to_thread(self._store.cache_rewrites, version, p_hash, fills)
        return [o for o in outcomes if o is not None]

    async def _optimize(
        self, model: str, params: OptimizeParams, inputs: Sequence[PromptInput]
    ) -> list[RewriteResult | RewriteFailure]:
        size = self._task_size
        tasks = [inputs[start : start + size] for start in range(0, len(inputs), size)]
        parts = await asyncio.gather(*(self._backend.optimize_batch(model, params, task) for task in tasks))
        return [result for part in parts for result in part]
