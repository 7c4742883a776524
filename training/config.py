"""The one typed configuration of an optimizer training run, and every environment variable it reads.

Defaults are the paper's public fine-tuning values (thu-coai/BPO ``src/training/config/sft_config.py``, HF
backend): AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), learning rate 2e-5 on a cosine schedule with 3%
warmup, gradient clipping at 1.0, maximum sequence length 512, fp16 (on a GPU; bf16 or fp32 on CPU, see
``resolved_precision``), seed 66. The paper trains "a few epochs": 3 here.

``python -m training`` and ``bpo train`` build this same object; the job reads ``BPO_TRAIN_<FIELD>``:

    BPO_TRAIN_PAIRS                 datasets whose kept pairs train the optimizer (comma-separated or JSON list)
    BPO_TRAIN_EVAL_PAIRS            datasets held out whole for evaluation (then EVAL_FRACTION is not used)
    BPO_TRAIN_BASE                  a catalogue name (e.g. smollm2-135m-instruct) or a local Hugging Face folder
    BPO_TRAIN_OUT                   name of the optimizer the run produces (registered under this name)
    BPO_TRAIN_METHOD                full | lora
    BPO_TRAIN_LORA__R / __ALPHA / __DROPOUT / __TARGET_MODULES   LoRA shape (JSON list or comma-separated)
    BPO_TRAIN_LEARNING_RATE / LR_SCHEDULER / WARMUP_RATIO / WEIGHT_DECAY / MAX_GRAD_NORM
    BPO_TRAIN_ADAM_BETA1 / ADAM_BETA2 / ADAM_EPSILON
    BPO_TRAIN_EPOCHS / MAX_STEPS / BATCH_SIZE / GRAD_ACCUMULATION / EVAL_BATCH_SIZE
    BPO_TRAIN_MAX_SEQ_LENGTH / MIN_PROMPT_TOKENS
    BPO_TRAIN_EVAL_FRACTION         share of pairs (by a hash of pair_id) kept out of training for evaluation
    BPO_TRAIN_PRECISION             auto | fp16 | bf16 | fp32
    BPO_TRAIN_DEVICE                auto | cpu | cuda
    BPO_TRAIN_THREADS               CPU threads for torch (0 = all cores)
    BPO_TRAIN_SEED
    BPO_TRAIN_GGUF                  also export a GGUF for the llamacpp engine, where the base allows it
    BPO_TRAIN_GGUF_TYPE             f16 | q8_0
    BPO_TRAIN_SAVE_DTYPE            float32 | bfloat16 | float16 (the merged Hugging Face folder's weights)
    BPO_TRAIN_OUTPUT_DIR            where runs are written (default: <BPO_STATE_DIR>/optimizers)
    BPO_TRAIN_ALIAS                 alias to point at the new version once registered (e.g. latest)
    BPO_TRAIN_REGISTER_VERSION      register the version in Postgres (default true)
    BPO_TRAIN_DATABASE_URL          Postgres holding the pairs and the registry; falls back to
                                    BPO_PLATFORM__DATABASE_URL, the platform's own
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Precision = Literal["fp16", "bf16", "fp32"]
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _split_list(value: Any) -> Any:
    """Environment variables give lists as a JSON list or as comma-separated names."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class LoraConfig(BaseModel):
    """Low-rank adapters on every linear layer of the attention and MLP blocks (LLaMA-family names)."""

    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(LLAMA_LINEAR_MODULES))

    _split = field_validator("target_modules", mode="before")(_split_list)


class TrainConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BPO_TRAIN_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        # database_url is read from two variables (its aliases) and still settable by name.
        validate_by_name=True,
    )

    pairs: Annotated[list[str], NoDecode] = Field(min_length=1)
    eval_pairs: Annotated[list[str], NoDecode] = Field(default_factory=list)
    base: str = "smollm2-135m-instruct"
    out: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    method: Literal["full", "lora"] = "full"
    lora: LoraConfig = Field(default_factory=LoraConfig)

    learning_rate: float = Field(default=2e-5, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    adam_epsilon: float = Field(default=1e-8, gt=0)

    epochs: int = Field(default=3, ge=1)
    # Save the weights of the epoch with the lowest eval loss, not the last epoch's: a few hundred pairs overfit a
    # 0.5B model within three epochs (eval loss 1.20 after the first, 1.56 after the third). Without eval pairs the
    # last epoch's are saved.
    keep_best_epoch: bool = True
    # 0: the epochs decide. Otherwise training stops after this many optimizer steps (tests, smoke runs).
    max_steps: int = Field(default=0, ge=0)
    batch_size: int = Field(default=4, ge=1)
    grad_accumulation: int = Field(default=1, ge=1)
    eval_batch_size: int = Field(default=8, ge=1)
    max_seq_length: int = Field(default=512, ge=16)
    # A prompt is cut from its left only while this much of it is left; shorter than that, the example is skipped.
    min_prompt_tokens: int = Field(default=32, ge=1)
    eval_fraction: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 66

    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(default=0, ge=0)

    # float32: a fine-tune's updates (lr 2e-5) are mostly below bf16's resolution, and rounding the saved weights
    # to bf16 would undo much of the training. Costs 4 bytes a parameter on disk (540 MB for SmolLM2-135M).
    save_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gguf: bool = True
    # f16 keeps the fine-tune's small updates; q8_0 halves the file and rounds them to 1/127 of each block's range.
    gguf_type: Literal["q8_0", "f16"] = "f16"
    output_dir: Path | None = None
    alias: str | None = None
    register_version: bool = True
    # Never written beside the weights: a URL may carry a password.
    database_url: str = Field(
        default="",
        exclude=True,
        validation_alias=AliasChoices("BPO_TRAIN_DATABASE_URL", "BPO_PLATFORM__DATABASE_URL"),
    )

    _split = field_validator("pairs", "eval_pairs", mode="before")(_split_list)

    @model_validator(mode="after")
    def _eval_sets_are_disjoint(self) -> TrainConfig:
        overlap = sorted(set(self.pairs) & set(self.eval_pairs))
        if overlap:
            raise ValueError(f"datasets cannot be both trained and evaluated on: {', '.join(overlap)}")
        return self

    def resolved_device(self, cuda_available: bool) -> str:
        if self.device == "auto":
            return "cuda" if cuda_available else "cpu"
        return self.device

    def resolved_precision(self, device: str) -> Precision:
        """fp16 where a GPU runs it (the paper's setting); on CPU fp32, as fp16 autocast is slow or unsupported
        there and bf16 matmuls are slower than fp32 on most cores."""
        if self.precision != "auto":
            return self.precision
        if device == "cuda":
            return "fp16"
        return "fp32"

    def holds_out_by_hash(self) -> bool:
        return not self.eval_pairs

    def saved(self, resolved: dict[str, Any]) -> dict[str, Any]:
        """What is written beside the weights: every field (the URL excluded) plus what was resolved at run time."""
        return {"config": self.model_dump(mode="json"), "resolved": resolved}
