"""An in-memory ``EngineClient`` whose replies come from a function of the request (no weights, no network)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bpo.engines.base import Completion, EngineClient, FinishReason, GenerationRequest, ModelIdentity

SCRIPTED_IDENTITY = ModelIdentity("scripted", "scripted-v1")


def last_user_turn(request: GenerationRequest) -> str:
    assert request.messages is not None and request.messages[-1].role == "user"
    return request.messages[-1].content


class ScriptedEngine(EngineClient):
    """Records every batch; ``reply`` maps a request to its text, or to (text, finish reason)."""

    engine_name = "scripted"

    def __init__(
        self,
        reply: Callable[[GenerationRequest], str | tuple[str, FinishReason]],
        *,
        context_length: int = 4096,
    ) -> None:
        super().__init__(SCRIPTED_IDENTITY, context_length)
        self.reply = reply
        self.batches: list[list[GenerationRequest]] = []

    @property
    def requests(self) -> list[GenerationRequest]:
        return [request for batch in self.batches for request in batch]

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return sum(len(message.content) for message in request.messages or ()) // 4 + 1

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        self.batches.append(list(requests))
        completions = []
        for request in requests:
            reply = self.reply(request)
            text, finish = reply if isinstance(reply, tuple) else (reply, "stop")
            completions.append(
                Completion(
                    text=text,
                    prompt_tokens=self.count_prompt_tokens(request),
                    completion_tokens=len(text) // 4 + 1,
                    finish_reason=finish,
                    latency_s=0.25,
                )
            )
        return self._record(completions)
