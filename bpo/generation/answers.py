"""The target model's answers to the original and to the optimized prompt of each item.

A context passage, when the item has one, follows the prompt on the next line (``{prompt}\\n{context}``), the
layout the paper's data uses, for both prompts alike so that only the instruction differs between them.

When the optimizer kept the prompt as it was (``optimized == original``, byte for byte), the answer is
generated once and serves as both: a second call would cost as much and, with greedy decoding, return the
same text, and with sampling it would only add noise to a comparison of two identical prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from bpo.engines.base import (
    ChatMessage,
    Completion,
    EngineClient,
    GenerationRequest,
    SamplingParams,
    derive_seed,
    first_failure_raised,
)
from bpo.errors import InvalidPromptError

# A prompt that leaves less room than this in the target's context cannot get a meaningful answer.
MIN_ANSWER_TOKENS = 16


class AnswerInput(NamedTuple):
    original: str
    optimized: str
    context: str | None = None


@dataclass(frozen=True, slots=True)
class AnswerPairResult:
    """``tokens_*`` and ``latency_s`` add up the engine calls made for this item (one when ``reused``)."""

    original_answer: str
    optimized_answer: str
    reused: bool
    tokens_in: int
    tokens_out: int
    latency_s: float
    original_truncated: bool
    optimized_truncated: bool


def with_context(prompt: str, context: str | None) -> str:
    return f"{prompt}\n{context}" if context else prompt


class AnswerGenerator:
    def __init__(
        self,
        engine: EngineClient,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        *,
        seed: int | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must not be negative, got {temperature}")
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed

    def _request(self, position: int, text: str) -> GenerationRequest:
        messages = (ChatMessage("user", text),)
        # top_p 1: the target answers as it would for a user; temperature alone sets how it samples.
        probe = GenerationRequest(messages=messages, params=SamplingParams(temperature=self.temperature, top_p=1.0))
        room = self.engine.context_length - self.engine.count_prompt_tokens(probe)
        if room < MIN_ANSWER_TOKENS:
            raise InvalidPromptError(
                f"answer item {position}: the prompt leaves {room} tokens of the target's "
                f"{self.engine.context_length}-token context for an answer (at least {MIN_ANSWER_TOKENS} needed)"
            )
        params = SamplingParams(
            temperature=self.temperature,
            top_p=1.0,
            max_tokens=min(self.max_new_tokens, room),
            # Seeded per prompt text, so an answer does not depend on the item's position in the batch.
            seed=derive_seed(self.seed, text),
        )
        return GenerationRequest(messages=messages, params=params)

    def _requests_for(self, position: int, item: AnswerInput) -> list[GenerationRequest]:
        """One request for an unchanged prompt, two otherwise."""
        original = self._request(position, with_context(item.original, item.context))
        if item.optimized == item.original:
            return [original]
        return [original, self._request(position, with_context(item.optimized, item.context))]

    async def answer_pairs(self, items: Sequence[AnswerInput]) -> list[AnswerPairResult]:
        """Answer both prompts of every item in one engine batch (an unchanged prompt is answered once).

        Raises ``InvalidPromptError`` before any call when a prompt does not fit the target's context, and the
        first engine failure otherwise (``answer_each`` settles each item on its own)."""
        for position, item in enumerate(items):
            self._requests_for(position, item)
        return first_failure_raised(await self.answer_each(items))

    async def answer_each(self, items: Sequence[AnswerInput]) -> list[AnswerPairResult | Exception]:
        """Per item: its answers, or why it has none (a prompt too long, a request the endpoint refused);
        one item's failure takes no other with it. All requests go to the engine as one batch."""
        prepared: list[list[GenerationRequest] | Exception] = []
        for position, item in enumerate(items):
            try:
                prepared.append(self._requests_for(position, item))
            except Exception as exc:
                prepared.append(exc)
        return [
            made if isinstance(made, Exception) else _result(made, 0, len(made) - 1)
            for made in await self.engine.generate_per_item(prepared)
        ]


def _result(completions: Sequence[Completion], original_at: int, optimized_at: int) -> AnswerPairResult:
    original, optimized = completions[original_at], completions[optimized_at]
    made = [original] if original_at == optimized_at else [original, optimized]
    return AnswerPairResult(
        original_answer=original.text,
        optimized_answer=optimized.text,
        reused=original_at == optimized_at,
        tokens_in=sum(c.prompt_tokens for c in made),
        tokens_out=sum(c.completion_tokens for c in made),
        latency_s=sum(c.latency_s for c in made),
        original_truncated=original.finish_reason == "length",
        optimized_truncated=optimized.finish_reason == "length",
    )
