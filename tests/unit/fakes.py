"""A scripted, in-memory ``EngineClient`` for optimizer and corpus tests (no weights, no network)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bpo.engines.base import Completion, EngineClient, FinishReason, GenerationRequest, ModelIdentity
from bpo.optimizer.prompting import chat_user_turn, render_bpo_template

FAKE_IDENTITY = ModelIdentity("fake-optimizer", "fake-v1")


@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    finish_reason: FinishReason = "stop"


def request_text(request: GenerationRequest) -> str:
    if request.prompt is not None:
        return request.prompt
    return "".join(message.content for message in request.messages or ())


def _unwrap(text: str, wrap: str) -> str:
    """Undo ``wrap``-style formatting (``head + prompt + tail``) by locating the hole with a sentinel."""
    head, tail = wrap.split("\x00")
    assert text.startswith(head) and text.endswith(tail), text
    return text[len(head) : len(text) - len(tail)]


def user_prompt_of(request: GenerationRequest) -> str:
    """The prompt the optimizer asked to have rewritten, for either prompt style."""
    if request.messages is not None:
        last = request.messages[-1]
        assert last.role == "user"
        return _unwrap(last.content, chat_user_turn("\x00"))
    assert request.prompt is not None
    return _unwrap(request.prompt, render_bpo_template("\x00"))


def completion_tokens_for(text: str) -> int:
    return len(text) // 4 + 1


class FakeEngine(EngineClient):
    """Replies are scripted by the user prompt; an unknown prompt fails the test unless ``echo_unknown``."""

    engine_name = "fake"

    def __init__(
        self,
        script: Mapping[str, str | Reply] | None = None,
        *,
        context_length: int = 4096,
        error: BaseException | None = None,
        echo_unknown: bool = False,
    ) -> None:
        super().__init__(FAKE_IDENTITY, context_length)
        self.script: dict[str, str | Reply] = dict(script or {})
        self.error = error
        self.echo_unknown = echo_unknown
        self.batches: list[list[GenerationRequest]] = []

    @property
    def requests(self) -> list[GenerationRequest]:
        return [request for batch in self.batches for request in batch]

    @property
    def prompts_seen(self) -> list[str]:
        return [user_prompt_of(request) for request in self.requests]

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(request_text(request)) // 4

    def _reply_for(self, prompt: str) -> Reply:
        if prompt in self.script:
            reply = self.script[prompt]
            return reply if isinstance(reply, Reply) else Reply(reply)
        if self.echo_unknown:
            return Reply(prompt)
        raise AssertionError(f"the fake engine has no scripted reply for {prompt!r}")

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        self.batches.append(list(requests))
        if self.error is not None:
            raise self.error
        completions = []
        for request in requests:
            reply = self._reply_for(user_prompt_of(request))
            completions.append(
                Completion(
                    text=reply.text,
                    prompt_tokens=self.count_prompt_tokens(request),
                    completion_tokens=completion_tokens_for(reply.text),
                    finish_reason=reply.finish_reason,
                    latency_s=0.0,
                )
            )
        return self._record(completions)
