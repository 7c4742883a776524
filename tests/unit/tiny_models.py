"""A real Hugging Face tokenizer and LLaMA model, tiny and built in memory: training code runs on them without
any downloaded weights (a byte-level BPE trained on a few sentences, a 2-layer model with random weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bpo.optimizer.prompting import render_bpo_template

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    render_bpo_template("Tell me about black holes."),
    "Explain what black holes are, how they form, and why nothing escapes them, for a curious teenager.",
    "Give me practical tips for a job interview, with examples of common questions and good answers.",
    "Write a short poem about autumn leaves, in four rhyming stanzas with vivid imagery.",
]


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )  # fmt: skip


def tiny_llama_folder(folder: Path, *, seed: int = 0) -> Path:
    """A saved 2-layer LLaMA (grouped-query attention, tied embeddings, as SmolLM2) with the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
