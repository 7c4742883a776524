"""Any OpenAI-compatible endpoint (OpenAI itself, vLLM's server, llama.cpp's server) through the openai SDK.

Concurrency is bounded per engine; an optional rate limiter paces every attempt, retries included; retries
follow ``bpo.engines.retry`` (the SDK's own retries are off so that one policy governs every call); token usage
comes from each response.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any

import openai

from bpo.engines.base import Completion, EngineClient, FinishReason, GenerationRequest, ModelIdentity
from bpo.engines.observer import EndpointObserver
from bpo.engines.ratelimit import RateLimiter
from bpo.engines.retry import RetryDecision, RetryPolicy, call_with_retry
from bpo.errors import EngineOverloadedError, EngineUnavailableError, InvalidPromptError

_RETRYABLE_STATUS = {408, 409, 429}


def classify_openai_error(exc: BaseException) -> RetryDecision:
    if isinstance(exc, openai.APITimeoutError | openai.APIConnectionError):
        return RetryDecision(retryable=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status in _RETRYABLE_STATUS or status >= 500:
            return RetryDecision(retryable=True, retry_after_s=_retry_after(exc))
    return RetryDecision(retryable=False)


def _retry_after(exc: openai.APIStatusError) -> float | None:
    header = exc.response.headers.get("retry-after") if exc.response is not None else None
    if header is None:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        return None  # an HTTP-date; our own back-off applies


def request_outcome(exc: BaseException) -> str:
    """The class of a failed request, for metrics (``bpo.engines.observer.ENDPOINT_OUTCOMES``)."""
    if isinstance(exc, openai.RateLimitError):
        return "rate_limited"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error"
    if isinstance(exc, openai.APIStatusError):
        return "server_error" if exc.status_code >= 500 else "client_error"
    return "error"


def _translate(exc: BaseException) -> BaseException:
    """Map SDK errors onto the platform's errors once retries are spent."""
    if isinstance(exc, openai.RateLimitError):
        return EngineOverloadedError(f"endpoint still rate-limited after retries: {exc}")
    if isinstance(exc, openai.BadRequestError):
        return InvalidPromptError(f"endpoint rejected the request: {exc}")
    if isinstance(exc, openai.APIStatusError | openai.APIConnectionError | openai.APITimeoutError):
        return EngineUnavailableError(f"endpoint unavailable: {exc}")
    return exc


class OpenAICompatEngine(EngineClient):
    engine_name = "openai"

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        served_model: str,
        identity: ModelIdentity,
        *,
        context_length: int,
        max_concurrency: int,
        retry_policy: RetryPolicy,
        extra_body: dict[str, Any] | None = None,
        rate_limiter: RateLimiter | None = None,
        observer: EndpointObserver | None = None,
    ) -> None:
        super().__init__(identity, context_length)
        self._client = client
        self._served_model = served_model
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._retry_policy = retry_policy
        self._extra_body = extra_body or {}
        self._rate_limiter = rate_limiter
        self._observer = observer

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        # No tokenizer is at hand for a remote model: estimate high (about 3 bytes a token, plus per-message
        # framing) so that a too-long prompt is caught here rather than silently cut by the server.
        text = request.prompt if request.prompt is not None else "".join(m.content for m in request.messages or ())
        framing = 8 * len(request.messages or ())
        return math.ceil(len(text.encode()) / 3) + framing

    async def _call(self, request: GenerationRequest) -> Completion:
        params = request.params
        common: dict[str, Any] = {
            "model": self._served_model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop:
            common["stop"] = list(params.stop)
        if params.seed is not None:
            common["seed"] = params.seed
        if self._extra_body:
            common["extra_body"] = self._extra_body
        started = time.perf_counter()
        if request.messages is not None:
            chat = await self._client.chat.completions.create(
                messages=request.messages_as_dicts(),  # type: ignore[arg-type]
                **common,
            )
            text = chat.choices[0].message.content or ""
            reason = chat.choices[0].finish_reason
            usage = chat.usage
        else:
            completion = await self._client.completions.create(prompt=request.prompt or "", **common)
            text = completion.choices[0].text
            reason = completion.choices[0].finish_reason
            usage = completion.usage
        finish: FinishReason = "length" if reason == "length" else "stop"
        return Completion(
            text=text,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=finish,
            latency_s=time.perf_counter() - started,
        )

    async def _attempt(self, request: GenerationRequest) -> Completion:
        # Every attempt is a request the provider counts against its limit, a retry as much as the first.
        observer = self._observer
        if self._rate_limiter is not None:
            queued = time.perf_counter()
            await self._rate_limiter.acquire()
            if observer is not None:
                observer.rate_limit_waited(time.perf_counter() - queued)
        started = time.perf_counter()
        try:
            completion = await self._call(request)
        except Exception as exc:
            if observer is not None:
                observer.request_done(request_outcome(exc), time.perf_counter() - started)
            raise
        if observer is not None:
            observer.request_done("ok", time.perf_counter() - started)
        return completion

    async def _bounded(self, request: GenerationRequest) -> Completion:
        async with self._semaphore:
            try:
                return await call_with_retry(
                    lambda: self._attempt(request),
                    self._retry_policy,
                    classify_openai_error,
                    describe=f"{self.engine_name} {self._served_model}",
                    on_retry=self._observer.retrying if self._observer is not None else None,
                )
            except Exception as exc:
                translated = _translate(exc)
                if translated is exc:
                    raise
                raise translated from exc

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        return self._record(list(await asyncio.gather(*(self._bounded(r) for r in requests))))

    async def generate_each(self, requests: Sequence[GenerationRequest]) -> list[Completion | Exception]:
        """Every request is its own call: one refused (HTTP 400) or failing takes no other with it, and no
        paid call is made twice."""
        results = await asyncio.gather(*(self._bounded(r) for r in requests), return_exceptions=True)
        outcomes: list[Completion | Exception] = []
        for result in results:
            if isinstance(result, Completion):
                self.usage.record(result)
                outcomes.append(result)
            elif isinstance(result, Exception):
                outcomes.append(result)
            else:  # CancelledError and the like belong to the caller
                raise result
        return outcomes

    async def aclose(self) -> None:
        await self._client.close()
