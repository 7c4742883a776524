"""The one place an engine is chosen by name. Callers get an ``EngineClient`` and pass it on."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bpo.engines.base import EngineClient, ModelIdentity
from bpo.engines.retry import RetryPolicy
from bpo.errors import InvalidConfigurationError
from bpo.models.catalogue import ModelCatalogue, ModelSpec
from bpo.models.prepare import ModelPreparer
from bpo.settings import EngineSettings

ENGINE_NAMES = ("llamacpp", "vllm", "openai", "transformers")


def build_engine(settings: EngineSettings, spec: ModelSpec, preparer: ModelPreparer) -> EngineClient:
    """Load the engine synchronously (loading weights is blocking work; callers off the loop use this)."""
    context_length = min(settings.context_length, spec.context_length)
    if settings.name == "llamacpp":
        from bpo.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine.load(
            preparer.gguf_path(spec),
            preparer.identity(spec),
            context_length=context_length,
            threads=settings.resolved_threads(),
        )
    if settings.name == "transformers":
        from bpo.engines.hf_transformers import TransformersEngine

        return TransformersEngine.load(
            preparer.hf_folder(spec),
            preparer.identity(spec),
            context_length=context_length,
            device=settings.device,
            dtype=settings.dtype,
            threads=settings.resolved_threads(),
        )
    if settings.name == "vllm":
        from bpo.engines.vllm_inprocess import VllmEngine

        return VllmEngine.load(
            preparer.hf_folder(spec),
            preparer.identity(spec),
            context_length=context_length,
            dtype=settings.dtype,
            kv_cache_gib=settings.vllm_kv_cache_gib,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        )
    if settings.name == "openai":
        import openai

        from bpo.engines.openai_compat import OpenAICompatEngine
        from bpo.engines.ratelimit import RateLimiter

        served = settings.openai_model or spec.name
        client = openai.AsyncOpenAI(
            base_url=settings.openai_base_url,
            api_key=settings.resolved_api_key(),
            timeout=settings.request_timeout_s,
            max_retries=0,
        )
        rate = settings.requests_per_second
        # A burst of one second's worth of requests: a provider's per-second window admits that many at once.
        limiter = RateLimiter(rate, burst=max(1, math.ceil(rate))) if rate > 0 else None
        return OpenAICompatEngine(
            client,
            served,
            # A remote model's weights are not ours to hash: its version is the endpoint and served name.
            ModelIdentity(spec.name, f"{served}@{settings.openai_base_url}"),
            context_length=settings.context_length,
            max_concurrency=settings.max_concurrency,
            retry_policy=RetryPolicy(
                max_attempts=settings.max_attempts,
                base_delay_s=settings.retry_base_delay_s,
                max_delay_s=settings.retry_max_delay_s,
            ),
            extra_body=settings.openai_extra_body,
            rate_limiter=limiter,
        )
    raise InvalidConfigurationError(f"unknown engine {settings.name!r}; choose one of {', '.join(ENGINE_NAMES)}")


def resolve_spec(settings: EngineSettings, catalogue: ModelCatalogue) -> ModelSpec:
    if settings.name == "openai":
        # The endpoint names its own models; the catalogue only supplies a prompt style when it knows the name.
        try:
            return catalogue.resolve(settings.model)
        except Exception:
            return catalogue.resolve(settings.openai_model or "remote/" + settings.model)
    return catalogue.resolve(settings.model)


@asynccontextmanager
async def open_engine(
    settings: EngineSettings, catalogue: ModelCatalogue, preparer: ModelPreparer
) -> AsyncIterator[EngineClient]:
    import asyncio

    spec = resolve_spec(settings, catalogue)
    engine = await asyncio.to_thread(build_engine, settings, spec, preparer)
    try:
        yield engine
    finally:
        await engine.aclose()
