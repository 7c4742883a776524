"""The prompt optimizer: batch rewriting, iterative rounds, protected passages and fallbacks.

One round sends every still-active prompt to the engine in one batch. A prompt stops early when a round
returns it unchanged (the paper: a good prompt tends to be kept as it is) or when a round's rewrite is
rejected by a guard, in which case the last accepted version stands.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bpo.engines.base import EngineClient, GenerationRequest, SamplingParams, derive_seed
from bpo.errors import BpoError, InvalidPromptError, PromptTooLongError, error_for_status
from bpo.models.catalogue import PromptStyle
from bpo.optimizer.cleaning import clean_rewrite
from bpo.optimizer.guards import FallbackReason, GuardConfig, check_rewrite, span_inlined
from bpo.optimizer.prompting import optimizer_request
from bpo.optimizer.spans import SegmentedPrompt, markers_in, reassemble, segment

MIN_OUTPUT_TOKENS = 64


@dataclass(frozen=True, slots=True)
class OptimizeParams:
    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 1024
    seed: int | None = None
    rounds: int = 1

    def sampling_for(self, text: str, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=max_tokens,
            seed=derive_seed(self.seed, text),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class PromptInput:
    prompt: str
    context: str | None = None


@dataclass(slots=True)
class RewriteResult:
    original: str
    context: str | None
    optimized: str
    model: str
    model_version: str
    engine: str
    params: dict[str, Any]
    rounds_done: int
    tokens_in: int
    tokens_out: int
    latency_s: float
    fallback_reason: str | None = None
    stop_reason: str = "rounds_completed"
    repaired_spans: list[int] = field(default_factory=list)
    round_outputs: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.optimized != self.original

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RewriteFailure:
    original: str
    error: str
    status_code: str
    exception: BpoError | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_error(cls, original: str, exc: BpoError) -> RewriteFailure:
        return cls(original, str(exc), exc.status_code, exc)


@dataclass(slots=True)
class _ItemState:
    source: PromptInput
    segmented: SegmentedPrompt
    current: str
    accepted_instruction: str | None = None
    repaired: set[int] = field(default_factory=set)
    rounds_done: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    fallback: FallbackReason | None = None
    stop_reason: str = "rounds_completed"
    active: bool = True
    failure: RewriteFailure | None = None
    round_outputs: list[str] = field(default_factory=list)


class PromptOptimizer:
    def __init__(
        self,
        engine: EngineClient,
        prompt_style: PromptStyle,
        params: OptimizeParams | None = None,
        guard_config: GuardConfig | None = None,
    ) -> None:
        self.engine = engine
        self.prompt_style = prompt_style
        self.params = params or OptimizeParams()
        self.guard_config = guard_config or GuardConfig()

    async def optimize(self, prompt: str, context: str | None = None, *, rounds: int | None = None) -> RewriteResult:
        (outcome,) = await self.optimize_batch([PromptInput(prompt, context)], rounds=rounds)
        if isinstance(outcome, RewriteFailure):
            raise _failure_error(outcome)
        return outcome

    async def optimize_batch(
        self, inputs: Sequence[PromptInput], *, rounds: int | None = None
    ) -> list[RewriteResult | RewriteFailure]:
        total_rounds = self.params.rounds if rounds is None else rounds
        if total_rounds < 1:
            raise InvalidPromptError(f"rounds must be at least 1, got {total_rounds}")
        started = time.perf_counter()
        states = [self._start(item) for item in inputs]
        for round_number in range(1, total_rounds + 1):
            active = [s for s in states if s.active]
            if not active:
                break
            await self._run_round(active, round_number)
        elapsed = time.perf_counter() - started
        return [self._finish(state, elapsed, total_rounds) for state in states]

    # -- one item's life ---------------------------------------------------------------------------------

    def _start(self, item: PromptInput) -> _ItemState:
        segmented = segment(item.prompt, item.context)
        state = _ItemState(source=item, segmented=segmented, current=segmented.instruction)
        if not item.prompt.strip():
            state.active = False
            state.failure = RewriteFailure.from_error(
                item.prompt, InvalidPromptError("prompt is empty or only whitespace")
            )
        elif not segmented.instruction.replace("[PASSAGE", "").strip("[]0123456789 \n\t"):
            # Nothing but protected material: there is no instruction to improve.
            state.active = False
            state.stop_reason = "no_instruction"
        return state

    async def _run_round(self, active: list[_ItemState], round_number: int) -> None:
        requests = []
        sendable = []
        for state in active:
            try:
                requests.append(self._request_for(state.current))
                sendable.append(state)
            except BpoError as exc:
                state.active = False
                if isinstance(exc, PromptTooLongError) and state.accepted_instruction is not None:
                    # An earlier round's rewrite grew past the context: that rewrite stands.
                    state.stop_reason = f"prompt_too_long_in_round_{round_number}"
                else:
                    state.failure = RewriteFailure.from_error(state.source.prompt, exc)
        if not requests:
            return
        try:
            completions = await self.engine.generate(requests)
        except BpoError as exc:
            for state in sendable:
                state.active = False
                state.failure = RewriteFailure.from_error(state.source.prompt, exc)
            return
        for state, completion in zip(sendable, completions, strict=True):
            state.tokens_in += completion.prompt_tokens
            state.tokens_out += completion.completion_tokens
            self._judge_round(state, clean_rewrite(completion.text), completion.finish_reason == "length", round_number)

    def _request_for(self, instruction: str) -> GenerationRequest:
        probe = optimizer_request(instruction, self.prompt_style, self.params.sampling_for(instruction, 1))
        prompt_tokens = self.engine.count_prompt_tokens(probe)
        room = self.engine.context_length - prompt_tokens
        if room < MIN_OUTPUT_TOKENS:
            raise PromptTooLongError(prompt_tokens, self.engine.context_length, MIN_OUTPUT_TOKENS)
        max_tokens = min(self.params.max_new_tokens, room)
        return optimizer_request(instruction, self.prompt_style, self.params.sampling_for(instruction, max_tokens))

    def _judge_round(self, state: _ItemState, rewrite: str, truncated: bool, round_number: int) -> None:
        reason = check_rewrite(state.current, rewrite, truncated=truncated, config=self.guard_config)
        repaired: set[int] = set()
        if reason is None:
            present = set(markers_in(rewrite))
            for span in state.segmented.spans:
                if span.index in present:
                    continue
                if span.inline or span_inlined(rewrite, span.text):
                    # A quotation, code or formula inside a sentence cannot be appended back in its place.
                    reason = FallbackReason.PROTECTED_SPAN_ALTERED
                    break
                repaired.add(span.index)
            context = state.segmented.context
            if reason is None and context and len(context) > 40 and span_inlined(rewrite, context):
                reason = FallbackReason.PROTECTED_SPAN_ALTERED
        if reason is not None:
            state.active = False
            if state.accepted_instruction is None:
                state.fallback = reason
                state.stop_reason = reason.value
            else:
                state.stop_reason = f"{reason.value}_in_round_{round_number}"
            return
        state.rounds_done = round_number
        if " ".join(rewrite.split()) == " ".join(state.current.split()):
            state.active = False
            state.stop_reason = "unchanged"
            state.round_outputs.append(reassemble(rewrite, state.segmented).prompt)
            if state.accepted_instruction is None:
                state.accepted_instruction = state.current
            return
        state.repaired |= repaired
        state.accepted_instruction = rewrite
        state.current = rewrite
        state.round_outputs.append(reassemble(rewrite, state.segmented).prompt)

    def _finish(self, state: _ItemState, elapsed: float, total_rounds: int) -> RewriteResult | RewriteFailure:
        if state.failure is not None:
            return state.failure
        if state.accepted_instruction is None or state.accepted_instruction == state.segmented.instruction:
            optimized = state.source.prompt  # byte-for-byte, never re-joined
        else:
            optimized = reassemble(state.accepted_instruction, state.segmented).prompt
        identity = self.engine.identity
        return RewriteResult(
            original=state.source.prompt,
            context=state.source.context,
            optimized=optimized,
            model=identity.name,
            model_version=identity.version,
            engine=self.engine.engine_name,
            params=self.params.as_dict() | {"rounds": total_rounds},
            rounds_done=state.rounds_done,
            tokens_in=state.tokens_in,
            tokens_out=state.tokens_out,
            latency_s=round(elapsed, 4),
            fallback_reason=state.fallback.value if state.fallback else None,
            stop_reason=state.stop_reason,
            repaired_spans=sorted(state.repaired),
            round_outputs=state.round_outputs,
        )


def _failure_error(failure: RewriteFailure) -> BpoError:
    return failure.exception or error_for_status(failure.status_code, failure.error)
