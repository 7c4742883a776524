"""Hugging Face ``generate``: the reference implementation, and the engine training evaluates with.

A batch is left-padded and generated in one call. Sampling draws from one torch generator seeded by the
batch's first seed, so a seeded run is reproducible for the same batch composition.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

from bpo.engines.base import Completion, EngineClient, FinishReason, GenerationRequest, ModelIdentity
from bpo.errors import EngineUnavailableError


class TransformersEngine(EngineClient):
    engine_name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, identity: ModelIdentity, context_length: int) -> None:
        super().__init__(identity, context_length)
        self._model = model
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        source: Path | str,
        identity: ModelIdentity,
        *,
        context_length: int,
        device: str,
        dtype: str,
        threads: int,
    ) -> TransformersEngine:
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise EngineUnavailableError("engine 'transformers' needs torch and transformers ('bpo[cpu]')") from exc
        torch.set_num_threads(threads)
        resolved_device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if dtype == "auto":
            # bf16 matmuls on CPU are slower than fp32 on most cores; on GPUs bf16 is the norm.
            torch_dtype = torch.bfloat16 if resolved_device == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch_dtype).to(resolved_device)
        model.eval()
        return cls(model, tokenizer, identity, context_length)

    @classmethod
    def from_loaded(
        cls, model: Any, tokenizer: Any, identity: ModelIdentity, context_length: int
    ) -> TransformersEngine:
        """Wrap a model already in memory (training evaluates the weights it is updating)."""
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model, tokenizer, identity, context_length)

    def _render(self, request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        rendered: str = self._tokenizer.apply_chat_template(
            request.messages_as_dicts(), tokenize=False, add_generation_prompt=True
        )
        return rendered

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self._tokenizer(self._render(request), add_special_tokens=request.prompt is not None).input_ids)

    def _generate_group(self, requests: list[GenerationRequest]) -> list[Completion]:
        import torch

        params = requests[0].params
        texts = [self._render(r) for r in requests]
        # Chat templates already carry their special tokens; a raw prompt gets the tokenizer's BOS.
        encoded = self._tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=requests[0].prompt is not None
        ).to(self._model.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "pad_token_id": self._tokenizer.pad_token_id,
        }
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self._tokenizer)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self._model.generate(**encoded, **kwargs)
        elapsed = time.perf_counter() - started
        prompt_width = encoded.input_ids.shape[1]
        completions = []
        eos_ids = _eos_ids(self._model, self._tokenizer)
        for row, attention in zip(output, encoded.attention_mask, strict=True):
            tokens = [int(t) for t in row[prompt_width:]]
            end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
            content = tokens if end is None else tokens[:end]
            finish: FinishReason = "length" if end is None and len(tokens) >= params.max_tokens else "stop"
            completions.append(
                Completion(
                    text=self._tokenizer.decode(content, skip_special_tokens=True),
                    prompt_tokens=int(attention.sum()),
                    completion_tokens=len(content) + (0 if end is None else 1),
                    finish_reason=finish,
                    latency_s=elapsed,
                )
            )
        return completions

    def _generate_all(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        # One generate call takes one set of sampling parameters: batch runs of equal parameters.
        results: list[Completion] = []
        with self._lock:
            for _, group in groupby(requests, key=lambda r: (r.params, r.prompt is None)):
                results.extend(self._generate_group(list(group)))
        return results

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        return self._record(await asyncio.to_thread(self._generate_all, requests))


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
