"""The one interface every inference engine implements: async and batch-first.

The optimizer, and later the generator and the judge, receive an ``EngineClient`` through their constructor;
they never choose or import an engine themselves (see ``bpo.engines.factory``).
"""

from __future__ import annotations

import abc
import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.6
    top_p: float = 0.9
    max_tokens: int = 1024
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Either chat ``messages`` (rendered with the model's chat template) or a raw ``prompt`` (no template)."""

    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerationRequest takes exactly one of messages or prompt")

    def messages_as_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages or ()]


FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    latency_s: float


@dataclass(slots=True)
class UsageTotals:
    """Token accounting across every call an engine has served (thread-safe: engines run in workers)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, completion: Completion) -> None:
        with self._lock:
            self.calls += 1
            self.prompt_tokens += completion.prompt_tokens
            self.completion_tokens += completion.completion_tokens


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """What produced a text: a name users see and a version that changes whenever the weights do."""

    name: str
    version: str


T = TypeVar("T")


def first_failure_raised(results: Sequence[T | Exception]) -> list[T]:
    """Per-item results (``generate_per_item`` and its callers) for a caller that wants all or nothing: the
    first failure among them raised, else every result."""
    for result in results:
        if isinstance(result, Exception):
            raise result
    return [result for result in results if not isinstance(result, Exception)]


class EngineClient(abc.ABC):
    engine_name: str

    def __init__(self, identity: ModelIdentity, context_length: int) -> None:
        self.identity = identity
        self.context_length = context_length
        self.usage = UsageTotals()

    @abc.abstractmethod
    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Complete every request; the engine batches as well as it can. Results keep the input order."""

    async def generate_each(self, requests: Sequence[GenerationRequest]) -> list[Completion | Exception]:
        """Like ``generate``, but a request that fails is its own failure: the others' completions stand.

        Engines whose batch cannot fail for one request alone keep this default: the whole batch at once, and
        only when it fails, each request on its own to find which one did."""
        try:
            return list(await self.generate(requests))
        except Exception as exc:
            if len(requests) <= 1:
                return [exc] * len(requests)
        results: list[Completion | Exception] = []
        for request in requests:
            try:
                results.extend(await self.generate([request]))
            except Exception as exc:
                results.append(exc)
        return results

    async def generate_per_item(
        self, prepared: Sequence[Sequence[GenerationRequest] | Exception]
    ) -> list[list[Completion] | Exception]:
        """Per item, its completions in request order, or why it has none: the exception it was prepared with,
        or the first of its requests that failed. Every prepared request goes to the engine as one batch
        (``generate_each``), so one item's failure takes no other with it."""
        flat = [request for item in prepared if not isinstance(item, Exception) for request in item]
        completions = await self.generate_each(flat) if flat else []
        results: list[list[Completion] | Exception] = []
        cursor = 0
        for item in prepared:
            if isinstance(item, Exception):
                results.append(item)
                continue
            made = completions[cursor : cursor + len(item)]
            cursor += len(item)
            failure = next((c for c in made if isinstance(c, Exception)), None)
            results.append(failure if failure is not None else [c for c in made if isinstance(c, Completion)])
        return results

    @abc.abstractmethod
    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens the request occupies in the context window once templated (an upper estimate at worst)."""

    async def aclose(self) -> None:  # noqa: B027 - engines without resources need not override
        """Release the model or connection pool."""

    def _record(self, completions: list[Completion]) -> list[Completion]:
        for completion in completions:
            self.usage.record(completion)
        return completions


def derive_seed(seed: int | None, text: str) -> int | None:
    """A per-item seed from the run seed and the item itself, so a result does not depend on batch position."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
