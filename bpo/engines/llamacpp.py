"""In-process GGUF inference through llama-cpp-python: the embedded CPU default.

llama.cpp's high-level API decodes one sequence at a time, so a batch runs sequentially on one worker
thread; the event loop stays free meanwhile. The chat template is the one inside the GGUF, the same code
path llama-cpp-python's OpenAI-compatible server uses, which is what makes the two agree token for token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bpo.engines.base import Completion, EngineClient, FinishReason, GenerationRequest, ModelIdentity
from bpo.errors import EngineUnavailableError

# llama.cpp otherwise adds top-k 40 and min-p 0.05 (and its server a repeat penalty of 1.1) to every request.
LLAMA_CPP_PLAIN_SAMPLING: dict[str, float | int] = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


class LlamaCppEngine(EngineClient):
    engine_name = "llamacpp"

    def __init__(self, llama: Any, identity: ModelIdentity, context_length: int) -> None:
        super().__init__(identity, context_length)
        self._llama = llama
        self._lock = threading.Lock()

    @classmethod
    def load(cls, gguf: Path, identity: ModelIdentity, *, context_length: int, threads: int) -> LlamaCppEngine:
        try:
            from llama_cpp import Llama
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise EngineUnavailableError("engine 'llamacpp' needs llama-cpp-python (pip install 'bpo[cpu]')") from exc
        llama = Llama(
            model_path=str(gguf),
            n_ctx=context_length,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        return cls(llama, identity, context_length)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        if request.prompt is not None:
            return len(self._llama.tokenize(request.prompt.encode(), add_bos=True, special=True))
        formatter = self._chat_formatter()
        if formatter is None:
            # No template in the GGUF: llama-cpp-python falls back to a simple format; over-estimate it.
            text = "\n".join(f"<|{m.role}|>\n{m.content}" for m in request.messages or ())
            return len(self._llama.tokenize(text.encode(), add_bos=True, special=True)) + 8
        rendered = formatter(messages=request.messages_as_dicts()).prompt
        return len(self._llama.tokenize(rendered.encode(), add_bos=False, special=True))

    def _chat_formatter(self) -> Any:
        """The same Jinja formatter llama-cpp-python builds from the GGUF's ``tokenizer.chat_template``."""
        if not hasattr(self, "_formatter"):
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            template = self._llama.metadata.get("tokenizer.chat_template")
            self._formatter = None
            if template:
                model = self._llama._model
                eos_id, bos_id = self._llama.token_eos(), self._llama.token_bos()
                self._formatter = Jinja2ChatFormatter(
                    template=template,
                    eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
                    bos_token=model.token_get_text(bos_id) if bos_id != -1 else "",
                )
        return self._formatter

    def _generate_one(self, request: GenerationRequest) -> Completion:
        params = request.params
        kwargs: dict[str, Any] = {
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop": list(params.stop) or None,
            # Plain nucleus sampling as vLLM and transformers do it: llama.cpp's extra samplers off.
            **LLAMA_CPP_PLAIN_SAMPLING,
        }
        if params.seed is not None:
            kwargs["seed"] = params.seed
        started = time.perf_counter()
        with self._lock:
            if params.seed is not None:
                # llama.cpp keeps the previous prompt's evaluated tokens and re-evaluates only what differs; the
                # logits that come out of that shorter batch differ in their last bits from a full evaluation,
                # which is enough to change a sampled token. A seeded request promises the same text for the
                # same input, so it starts from an empty cache (costing the prompt's evaluation).
                self._llama.reset()
            if request.messages is not None:
                response = self._llama.create_chat_completion(messages=request.messages_as_dicts(), **kwargs)
                text = response["choices"][0]["message"]["content"] or ""
            else:
                response = self._llama.create_completion(prompt=request.prompt, **kwargs)
                text = response["choices"][0]["text"]
        usage = response.get("usage") or {}
        finish: FinishReason = "length" if response["choices"][0].get("finish_reason") == "length" else "stop"
        return Completion(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=finish,
            latency_s=time.perf_counter() - started,
        )

    def _generate_all(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        return [self._generate_one(request) for request in requests]

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        return self._record(await asyncio.to_thread(self._generate_all, requests))

    async def aclose(self) -> None:
        llama, self._llama = self._llama, None
        if llama is not None:
            await asyncio.to_thread(llama.close)
