"""Plain batch generation on any engine, in-process or on the optimizer workers, with one wire format.

The pair constructor needs completions of arbitrary chat requests, not rewrites, so it does not go through the
optimizer. ``run_generation`` is the one implementation: the Celery task (``services/optimizer_worker/
generation_tasks.py``) runs it on the worker's engine, and ``EngineGenerator`` runs it in this process for
``bpo pairs build --local``. A request that cannot fit the engine's context fails alone, as does every request
of a batch the engine fails; nothing is truncated silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from bpo.engines.base import ChatMessage, Completion, EngineClient, GenerationRequest, SamplingParams
from bpo.errors import (
    BpoError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidPromptError,
    PromptTooLongError,
)

# Errors of the engine rather than of the request: another attempt, later or elsewhere, may succeed.
TRANSIENT_STATUS_CODES: Final = frozenset({EngineUnavailableError.status_code, EngineOverloadedError.status_code})
# Fewer tokens than this left for the answer is no room for a comparison and a rewrite.
MIN_OUTPUT_TOKENS: Final = 32
_ROLES: Final = frozenset({"system", "user", "assistant"})
_FINISH_REASONS: Final = frozenset({"stop", "length", "error"})


@dataclass(frozen=True, slots=True)
class GenerationFailure:
    error: str
    status_code: str
    prompt_too_long: bool = False

    @property
    def transient(self) -> bool:
        return self.status_code in TRANSIENT_STATUS_CODES

    @classmethod
    def from_error(cls, exc: BpoError) -> GenerationFailure:
        return cls(str(exc), exc.status_code, isinstance(exc, PromptTooLongError))


Outcome = Completion | GenerationFailure


class Generator(Protocol):
    """Completes batches of requests for one model; ``name`` is the model recorded with what it made."""

    @property
    def name(self) -> str: ...

    @property
    def max_in_flight(self) -> int:
        """Batches worth sending at once (1 for one in-process engine, more for a pool of workers)."""

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Outcome]: ...


async def run_generation(
    engine: EngineClient, requests: Sequence[GenerationRequest], *, min_output_tokens: int = MIN_OUTPUT_TOKENS
) -> list[Outcome]:
    """Complete ``requests`` as one engine batch, each limited to the room its prompt leaves in the context."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    sendable: list[GenerationRequest] = []
    positions: list[int] = []
    for position, request in enumerate(requests):
        try:
            prompt_tokens = engine.count_prompt_tokens(request)
            room = engine.context_length - prompt_tokens
            if room < min_output_tokens:
                raise PromptTooLongError(prompt_tokens, engine.context_length, min_output_tokens)
        except BpoError as exc:
            outcomes[position] = GenerationFailure.from_error(exc)
            continue
        params = dataclasses.replace(request.params, max_tokens=min(request.params.max_tokens, room))
        sendable.append(dataclasses.replace(request, params=params))
        positions.append(position)
    if sendable:
        try:
            completions: Sequence[Outcome] = await engine.generate(sendable)
        except BpoError as exc:
            completions = [GenerationFailure.from_error(exc)] * len(sendable)
        for position, outcome in zip(positions, completions, strict=True):
            outcomes[position] = outcome
    return [outcome for outcome in outcomes if outcome is not None]


class EngineGenerator:
    """``Generator`` over an engine in this process."""

    def __init__(self, engine: EngineClient, name: str | None = None) -> None:
        self._engine = engine
        self._name = name or engine.identity.name

    @property
    def name(self) -> str:
        return self._name

    @property
    def max_in_flight(self) -> int:
        # One in-process engine decodes one batch at a time; more batches in flight would only queue.
        return 1

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        return await run_generation(self._engine, requests)


# -- wire format (JSON, for Celery) ---------------------------------------------------------------------------


def request_to_wire(request: GenerationRequest) -> dict[str, Any]:
    params = request.params
    return {
        "messages": None if request.messages is None else request.messages_as_dicts(),
        "prompt": request.prompt,
        "params": {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": params.seed,
            "stop": list(params.stop),
        },
    }


def _number(raw: Mapping[str, Any], name: str, kind: type[int] | type[float], default: float | int) -> Any:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise InvalidPromptError(f"params.{name} must be a {kind.__name__}")
    return kind(value)


def _params_from_wire(raw: object) -> SamplingParams:
    if not isinstance(raw, Mapping):
        raise InvalidPromptError("params must be an object")
    unknown = set(raw) - {"temperature", "top_p", "max_tokens", "seed", "stop"}
    if unknown:
        raise InvalidPromptError(f"unknown params: {', '.join(sorted(map(str, unknown)))}")
    defaults = SamplingParams()
    temperature = _number(raw, "temperature", float, defaults.temperature)
    top_p = _number(raw, "top_p", float, defaults.top_p)
    max_tokens = _number(raw, "max_tokens", int, defaults.max_tokens)
    if temperature < 0 or not 0 < top_p <= 1 or max_tokens < 1:
        raise InvalidPromptError("params out of range: temperature >= 0, 0 < top_p <= 1, max_tokens >= 1")
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidPromptError("params.seed must be an integer or null")
    stop = raw.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidPromptError("params.stop must be a list of strings")
    return SamplingParams(temperature, top_p, max_tokens, seed, tuple(stop))


def request_from_wire(raw: object) -> GenerationRequest:
    """A request sent by ``request_to_wire``; anything else is an ``InvalidPromptError`` saying what is wrong."""
    if not isinstance(raw, Mapping):
        raise InvalidPromptError(f"a request must be an object, got {type(raw).__name__}")
    unknown = set(raw) - {"messages", "prompt", "params"}
    if unknown:
        raise InvalidPromptError(f"unknown request fields: {', '.join(sorted(map(str, unknown)))}")
    params = _params_from_wire(raw.get("params", {}))
    messages, prompt = raw.get("messages"), raw.get("prompt")
    if (messages is None) == (prompt is None):
        raise InvalidPromptError("a request takes exactly one of messages or prompt")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidPromptError("prompt must be a string")
        return GenerationRequest(prompt=prompt, params=params)
    if not isinstance(messages, list) or not messages:
        raise InvalidPromptError("messages must be a non-empty list")
    parsed = []
    for message in messages:
        if not isinstance(message, Mapping) or message.get("role") not in _ROLES:
            raise InvalidPromptError("each message needs a role of system, user or assistant")
        if not isinstance(message.get("content"), str):
            raise InvalidPromptError("each message needs a string content")
        parsed.append(ChatMessage(message["role"], message["content"]))
    return GenerationRequest(messages=tuple(parsed), params=params)


def outcome_to_wire(outcome: Outcome) -> dict[str, Any]:
    if isinstance(outcome, GenerationFailure):
        return {
            "ok": False,
            "error": outcome.error,
            "status_code": outcome.status_code,
            "prompt_too_long": outcome.prompt_too_long,
        }
    return {
        "ok": True,
        "text": outcome.text,
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "finish_reason": outcome.finish_reason,
        "latency_s": outcome.latency_s,
    }


def outcome_from_wire(raw: object) -> Outcome:
    if not isinstance(raw, Mapping):
        raise BpoError(f"a generation worker returned a malformed entry: {raw!r}")
    if not raw.get("ok"):
        return GenerationFailure(
            str(raw.get("error", "")), str(raw.get("status_code", "INTERNAL")), bool(raw.get("prompt_too_long"))
        )
    text, finish = raw.get("text"), raw.get("finish_reason")
    if not isinstance(text, str) or finish not in _FINISH_REASONS:
        raise BpoError(f"a generation worker returned a malformed completion: {raw!r}")
    return Completion(
        text=text,
        prompt_tokens=int(raw.get("prompt_tokens", 0)),
        completion_tokens=int(raw.get("completion_tokens", 0)),
        finish_reason=finish,
        latency_s=float(raw.get("latency_s", 0.0)),
    )
