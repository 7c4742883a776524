"""The one place an engine is chosen by name. Callers get an ``EngineClient`` and pass it on."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bpo.engines.base import EngineClient, ModelIdentity
from bpo.engines.observer import EndpointObserver
from bpo.engines.retry import RetryPolicy
from bpo.errors import InvalidConfigurationError
from bpo.models.catalogue import ModelCatalogue, ModelSpec, PromptStyle, SourceKind
from bpo.models.prepare import ModelPreparer
from bpo.settings import EngineSettings

ENGINE_NAMES = ("llamacpp", "vllm", "openai", "transformers")


def build_engine(
    settings: EngineSettings, spec: ModelSpec, preparer: ModelPreparer, observer: EndpointObserver | None = None
) -> EngineClient:
    """Load the engine synchronously (loading weights is blocking work; callers off the loop use this).
    ``observer`` sees a remote endpoint's requests; in-process engines make none."""
    context_length = min(settings.context_length, spec.context_length)
    if settings.name == "llamacpp":
        from bpo.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine.load(
            preparer.gguf_path(spec),
            model_identity(settings, spec, preparer),
            context_length=context_length,
            threads=settings.resolved_threads(),
        )
    if settings.name == "transformers":
        from bpo.engines.hf_transformers import TransformersEngine

        return TransformersEngine.load(
            preparer.hf_folder(spec),
            model_identity(settings, spec, preparer),
            context_length=context_length,
            device=settings.device,
            dtype=settings.dtype,
            threads=settings.resolved_threads(),
        )
    if settings.name == "vllm":
        from bpo.engines.vllm_inprocess import VllmEngine

        return VllmEngine.load(
            preparer.hf_folder(spec),
            model_identity(settings, spec, preparer),
            context_length=context_length,
            dtype=settings.dtype,
            kv_cache_gib=settings.vllm_kv_cache_gib,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        )
    if settings.name == "openai":
        import openai

        from bpo.engines.openai_compat import OpenAICompatEngine
        from bpo.engines.ratelimit import RateLimiter

        client = openai.AsyncOpenAI(
            base_url=settings.openai_base_url,
            api_key=settings.resolved_api_key(),
            timeout=settings.request_timeout_s,
            max_retries=0,
            # The SDK's aiohttp transport: the same requests, errors, timeouts and proxies, at about half the
            # client CPU a call of its default httpx pool (benchmarks/openai_client.py), which is what a
            # stage spends most of its time on when the endpoint answers in milliseconds.
            http_client=openai.DefaultAioHttpClient(),
        )
        rate = settings.requests_per_second
        # A burst of one second's worth of requests: a provider's per-second window admits that many at once.
        limiter = RateLimiter(rate, burst=max(1, math.ceil(rate))) if rate > 0 else None
        return OpenAICompatEngine(
            client,
            served_model_name(settings),
            model_identity(settings, spec, preparer),
            context_length=settings.context_length,
            max_concurrency=settings.max_concurrency,
            retry_policy=RetryPolicy(
                max_attempts=settings.max_attempts,
                base_delay_s=settings.retry_base_delay_s,
                max_delay_s=settings.retry_max_delay_s,
            ),
            extra_body=settings.openai_extra_body,
            rate_limiter=limiter,
            observer=observer,
        )
    raise InvalidConfigurationError(f"unknown engine {settings.name!r}; choose one of {', '.join(ENGINE_NAMES)}")


def served_model_name(settings: EngineSettings) -> str:
    """The model name an OpenAI-compatible endpoint receives: exactly what it was configured with."""
    return settings.openai_model or settings.model


def resolve_spec(settings: EngineSettings, catalogue: ModelCatalogue) -> ModelSpec:
    """What the engine will run. The catalogue is consulted only for weights loaded in-process: a remote
    endpoint's model names belong to the endpoint, whatever they happen to share with the catalogue."""
    if settings.name == "openai":
        served = served_model_name(settings)
        return ModelSpec(
            name=served,
            description=f"{served} served by {settings.openai_base_url}",
            source=SourceKind.REMOTE,
            prompt_style=PromptStyle(settings.openai_prompt_style),
            licence="as the endpoint's provider states",
            context_length=settings.context_length,
        )
    return catalogue.resolve(settings.model)


def model_identity(settings: EngineSettings, spec: ModelSpec, preparer: ModelPreparer) -> ModelIdentity:
    """The one notion of a model's version, shared by whoever caches by it and whoever produces with it.

    In-process weights: their pinned or content hash. A remote model's weights are not ours to hash: its
    version is the served name at the endpoint."""
    if settings.name == "openai":
        served = served_model_name(settings)
        return ModelIdentity(served, f"{served}@{settings.openai_base_url}")
    return preparer.identity(spec)


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
