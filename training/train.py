"""Fine-tune a BPO optimizer on kept prompt pairs (the paper's step 2), readable top to bottom.

    bpo train --pairs bpo-val --base smollm2-135m-instruct --out bpo-smollm2 [--lora] [--alias latest]
    python -m training          # the same run, configured by BPO_TRAIN_* (see training.config)

``train`` does, in order:

1. read the kept pairs of the selected datasets and split them into train and eval (``training.data``);
2. load the base model: a catalogue name (its prepared Hugging Face folder) or a local folder;
3. build examples: the paper's template as input, X_opt + EOS as the only target;
4. wrap the model in LoRA adapters (peft), or train every weight;
5. run a plain PyTorch loop: AdamW, warmup then cosine decay, gradient clipping and accumulation, eval loss
   before training and after every epoch, and keep the epoch with the lowest eval loss;
6. save into ``<output_dir>/<out>/<version>/``: the merged Hugging Face folder ``<out>/`` (LoRA merged in, with
   the tokenizer and a ``bpo_optimizer.json`` manifest, so the catalogue serves it with the paper's template),
   the LoRA adapter ``adapter/``, ``train_config.json`` (resolved), ``data_manifest.json`` (the exact pair ids and
   their hash) and ``metrics.json``; the version is a short hash of the weights, the config and the data;
7. export ``<out>.gguf`` for the llamacpp engine where the base came from a GGUF (``training.gguf_export``);
8. register the version in Postgres and, if asked, point an alias (``latest``) at it; optimizer workers serving
   that alias switch to it between batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from bpo.errors import BpoError, InvalidConfigurationError
from bpo.models.catalogue import ModelCatalogue, PromptStyle, SourceKind
from bpo.models.prepare import ModelPreparer, sha256_of
from bpo.optimizer.prompting import bpo_inference_template
from training.config import TrainConfig
from training.data import (
    Example,
    TrainingPair,
    build_examples,
    collate,
    data_manifest,
    eval_batches,
    split_pairs,
    train_batches,
)
from training.gguf_export import GgufUnavailableError, export_gguf
from training.pairs import PairSource, require_pairs

log = logging.getLogger("training")

MANIFEST_NAME = "bpo_optimizer.json"


class ModelRegistry(Protocol):
    """What training needs of the store (``bpo.store.repository.PipelineStore`` provides it)."""

    def register_model(
        self,
        name: str,
        version: str,
        *,
        base_model: str = ...,
        source: str = ...,
        manifest_hash: str = ...,
        metrics: dict[str, Any] | None = ...,
    ) -> None: ...

    def set_alias(self, alias: str, name: str, version: str) -> None: ...


@dataclass(frozen=True, slots=True)
class BaseModel:
    name: str
    hf_folder: Path
    # The GGUF the base was made from: the GGUF export copies its tokenizer and metadata.
    gguf: Path | None


@dataclass(slots=True)
class EpochMetrics:
    epoch: int
    steps: int
    train_loss: float
    eval_loss: float | None
    seconds: float


@dataclass(slots=True)
class BestEpoch:
    """The trainable weights of the epoch with the lowest eval loss so far: copies on the model's device (the
    adapters only with LoRA; every weight once more in memory for a full fine-tune)."""

    epoch: int = 0
    eval_loss: float = math.inf
    weights: dict[str, Any] = field(default_factory=dict)

    def offer(self, epoch: int, eval_loss: float | None, model: Any) -> bool:
        """Keep a copy of ``model``'s trainable weights when ``eval_loss`` is the lowest yet."""
        if eval_loss is None or eval_loss >= self.eval_loss:
            return False
        self.epoch, self.eval_loss = epoch, eval_loss
        self.weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        return True

    def restore(self, model: Any) -> None:
        import torch

        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in self.weights:
                    parameter.copy_(self.weights[name])


@dataclass(slots=True)
class TrainMetrics:
    eval_loss_before: float | None = None
    # Of the weights saved: the best epoch's with keep_best_epoch, else the last epoch's.
    eval_loss_after: float | None = None
    kept_epoch: int = 0
    epochs: list[EpochMetrics] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    train_examples: int = 0
    eval_examples: int = 0
    train_target_tokens: int = 0
    skipped_too_long: int = 0
    prompt_truncated: int = 0
    steps: int = 0
    train_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The figures the registry and the manifest carry (the per-step losses stay in metrics.json)."""
        return {
            "eval_loss_before": self.eval_loss_before,
            "eval_loss_after": self.eval_loss_after,
            "train_loss_last_epoch": self.epochs[-1].train_loss if self.epochs else None,
            "epochs": len(self.epochs),
            "kept_epoch": self.kept_epoch,
            "steps": self.steps,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
            "skipped_too_long": self.skipped_too_long,
            "prompt_truncated": self.prompt_truncated,
            "train_seconds": round(self.train_seconds, 1),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "train_target_tokens": self.train_target_tokens,
            "per_epoch": [
                {
                    "epoch": e.epoch,
                    "steps": e.steps,
                    "train_loss": e.train_loss,
                    "eval_loss": e.eval_loss,
                    "seconds": round(e.seconds, 1),
                }
                for e in self.epochs
            ],
            "step_losses": self.step_losses,
        }


@dataclass(frozen=True, slots=True)
class TrainResult:
    name: str
    version: str
    run_dir: Path
    hf_folder: Path
    gguf: Path | None
    manifest: dict[str, Any]
    metrics: TrainMetrics


def resolve_base(name: str, catalogue: ModelCatalogue, preparer: ModelPreparer) -> BaseModel:
    """A catalogue name becomes its prepared Hugging Face folder (converted from its GGUF once); a local folder is
    used as it is, with the GGUF beside it when it is an earlier training run's output."""
    spec = catalogue.resolve(name)
    if spec.source == SourceKind.HUB:
        raise InvalidConfigurationError(
            f"base {name!r} is a hub model; training reads local weights only (prepare a local folder first)"
        )
    folder = preparer.hf_folder(spec)
    assert isinstance(folder, Path)
    if spec.is_gguf:
        return BaseModel(spec.name, folder, preparer.gguf_path(spec))
    sibling = folder.with_suffix(".gguf")
    return BaseModel(spec.name, folder, sibling if sibling.is_file() else None)


def load_pairs(config: TrainConfig, source: PairSource) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """Train and eval pairs: the eval datasets whole when given, else a hash-fixed share of the train datasets."""
    pairs = require_pairs(source, config.pairs)
    if not config.holds_out_by_hash():
        held_out = sorted(require_pairs(source, config.eval_pairs), key=lambda pair: pair.pair_id)
        # A user prompt present on both sides would make the eval loss measure memorisation.
        seen = {pair.x_user for pair in held_out}
        train = sorted((pair for pair in pairs if pair.x_user not in seen), key=lambda pair: pair.pair_id)
        return train, held_out
    return split_pairs(pairs, config.eval_fraction)


# -- the loop --------------------------------------------------------------------------------------------------


def _to_device(examples: Sequence[Example], pad_token_id: int, device: str) -> dict[str, Any]:
    import torch

    batch = collate(examples, pad_token_id)
    return {
        "input_ids": torch.tensor(batch.input_ids, device=device),
        "attention_mask": torch.tensor(batch.attention_mask, device=device),
        "labels": torch.tensor(batch.labels, device=device),
    }


def token_loss(model: Any, batch: dict[str, Any], autocast: Any) -> tuple[Any, int]:
    """Summed cross-entropy over target tokens and their count: losses are averaged per token across batches of
    different lengths, not per batch.

    Logits are computed only from the last prompt position on (``logits_to_keep``): the prompt's positions carry
    no loss, and the 49K-wide output layer over them would be a fifth of the forward pass for nothing."""
    import torch.nn.functional as functional

    width = batch["input_ids"].shape[1]
    first_target = int((batch["labels"] != -100).int().argmax(dim=1).min())
    start = max(first_target - 1, 0)
    with autocast():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=width - start
        ).logits
    # Kept position t (absolute start + t) predicts token start + t + 1.
    predicted = logits[:, :-1, :].float()
    targets = batch["labels"][:, start + 1 :]
    total = functional.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total, int((targets != -100).sum())


def evaluate(
    model: Any, examples: Sequence[Example], *, batch_size: int, pad_token_id: int, device: str, autocast: Any
) -> float | None:
    """Mean loss per target token over ``examples``; None when there is nothing to evaluate."""
    import torch

    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for chunk in eval_batches(examples, batch_size):
            loss_sum, count = token_loss(model, _to_device(chunk, pad_token_id, device), autocast)
            total += float(loss_sum)
            tokens += count
    model.train(was_training)
    return total / max(tokens, 1)


def _groups(batches: Iterator[list[Example]], size: int) -> Iterator[list[list[Example]]]:
    group: list[list[Example]] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _schedule(config: TrainConfig, optimizer: Any, total_steps: int) -> Any:
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = math.ceil(config.warmup_ratio * total_steps)
    if config.lr_scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if config.lr_scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def train(
    config: TrainConfig,
    *,
    pairs: PairSource,
    base: BaseModel,
    output_root: Path,
    registry: ModelRegistry | None = None,
) -> TrainResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # 1. Pairs, split.
    train_pairs, eval_pairs = load_pairs(config, pairs)
    log.info("pairs: %d train, %d eval (datasets %s)", len(train_pairs), len(eval_pairs), ", ".join(config.pairs))

    # 2. Base model, in float32 master weights whatever the precision of the compute.
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads or (os.cpu_count() or 1))
    device = config.resolved_device(torch.cuda.is_available())
    precision = config.resolved_precision(device)
    if precision == "fp16" and device != "cuda":
        raise InvalidConfigurationError("fp16 training needs a GPU; use bf16 or fp32 on CPU")
    tokenizer = AutoTokenizer.from_pretrained(str(base.hf_folder))
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(str(base.hf_folder), dtype=torch.float32).to(device)

    # 3. Examples.
    train_set = build_examples(train_pairs, tokenizer, config.max_seq_length, config.min_prompt_tokens)
    eval_set = build_examples(eval_pairs, tokenizer, config.max_seq_length, config.min_prompt_tokens)
    if not train_set.examples:
        raise BpoError("no training example fits max_seq_length; raise it or check the pairs")
    metrics = TrainMetrics(
        train_examples=len(train_set.examples),
        eval_examples=len(eval_set.examples),
        train_target_tokens=train_set.target_tokens,
        skipped_too_long=len(train_set.skipped_too_long) + len(eval_set.skipped_too_long),
        prompt_truncated=len(train_set.truncated) + len(eval_set.truncated),
    )
    if metrics.skipped_too_long:
        log.warning("%d pairs skipped: too long for max_seq_length %d", metrics.skipped_too_long, config.max_seq_length)

    # 4. LoRA adapters or every weight.
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=config.lora.r,
                lora_alpha=config.lora.alpha,
                lora_dropout=config.lora.dropout,
                target_modules=list(config.lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    log.info("trainable parameters: %d (%s)", sum(p.numel() for p in trainable), config.method)

    # 5. The loop.
    optimizer = torch.optim.AdamW(
        trainable,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(math.ceil(len(train_set.examples) / config.batch_size) / config.grad_accumulation)
    # max_steps, when set, overrides the epochs (as in Hugging Face's Trainer).
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = _schedule(config, optimizer, total_steps)
    autocast = _autocast(device, precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def run_eval() -> float | None:
        return evaluate(
            model,
            eval_set.examples,
            batch_size=config.eval_batch_size,
            pad_token_id=pad_token_id,
            device=device,
            autocast=autocast,
        )

    metrics.eval_loss_before = run_eval()
    log.info("eval loss before training: %s", _fmt(metrics.eval_loss_before))
    model.train()
    started = time.perf_counter()
    step = 0
    best = BestEpoch()
    for epoch in range(1, epochs + 1):
        epoch_started = time.perf_counter()
        epoch_loss, epoch_tokens = 0.0, 0
        batches = train_batches(train_set.examples, config.batch_size, config.seed, epoch)
        for group in _groups(batches, config.grad_accumulation):
            tensors = [_to_device(chunk, pad_token_id, device) for chunk in group]
            group_tokens = 0
            group_loss = 0.0
            for batch in tensors:
                loss_sum, count = token_loss(model, batch, autocast)
                # Each micro-batch's mean loss, averaged over the accumulation group.
                loss = loss_sum / max(count, 1) / len(tensors)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                group_loss += float(loss_sum.detach())
                group_tokens += count
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            metrics.step_losses.append(group_loss / max(group_tokens, 1))
            epoch_loss += group_loss
            epoch_tokens += group_tokens
            if step % 10 == 0:
                log.info("step %d/%d loss %.4f lr %.2e", step, total_steps, metrics.step_losses[-1],
                         scheduler.get_last_lr()[0])  # fmt: skip
            if step >= total_steps:
                break
        eval_loss = run_eval()
        metrics.epochs.append(
            EpochMetrics(epoch, step, epoch_loss / max(epoch_tokens, 1), eval_loss, time.perf_counter() - epoch_started)
        )
        log.info("epoch %d/%d: step %d, train loss %.4f, eval loss %s (%.0fs)", epoch, epochs, step,
                 metrics.epochs[-1].train_loss, _fmt(eval_loss), metrics.epochs[-1].seconds)  # fmt: skip
        if config.keep_best_epoch:
            best.offer(epoch, eval_loss, model)
        if step >= total_steps:
            break
    metrics.steps = step
    metrics.train_seconds = time.perf_counter() - started
    last = metrics.epochs[-1]
    metrics.kept_epoch, metrics.eval_loss_after = last.epoch, last.eval_loss
    if best.weights and best.epoch != last.epoch:
        best.restore(model)
        metrics.kept_epoch, metrics.eval_loss_after = best.epoch, best.eval_loss
        log.info("keeping epoch %d's weights: eval loss %s (the last epoch's: %s)", best.epoch, _fmt(best.eval_loss),
                 _fmt(last.eval_loss))  # fmt: skip
    best.weights.clear()

    # 6. Save.
    resolved = {
        "device": device,
        "precision": precision,
        "base_folder": str(base.hf_folder),
        "base_gguf": str(base.gguf) if base.gguf else None,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "epochs_run": len(metrics.epochs),
        "torch": torch.__version__,
    }
    manifest_of_data = data_manifest(
        config.pairs,
        config.eval_pairs,
        config.eval_fraction if config.holds_out_by_hash() else None,
        train_pairs,
        eval_pairs,
        train_set,
        eval_set,
    )
    staging = output_root / config.out / f".staging-{uuid.uuid4().hex[:8]}"
    hf_dir = staging / config.out
    try:
        if config.method == "lora":
            model.save_pretrained(str(staging / "adapter"))
            _portable_adapter_config(staging / "adapter", config.base)
            model = model.merge_and_unload()
        model = model.to("cpu", dtype=getattr(torch, config.save_dtype))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(str(hf_dir))
        tokenizer.save_pretrained(str(hf_dir))
        saved_config = config.saved(resolved)
        version = version_hash(hf_dir, saved_config, manifest_of_data["hash"])
        _write_json(staging / "train_config.json", saved_config)
        _write_json(staging / "data_manifest.json", manifest_of_data)
        _write_json(staging / "metrics.json", metrics.as_dict())

        # 7. GGUF.
        gguf_info = _export_gguf(config, base, hf_dir, staging / f"{config.out}.gguf", version)
        manifest = optimizer_manifest(config, version, base, manifest_of_data["hash"], saved_config, metrics, gguf_info)
        _write_json(hf_dir / MANIFEST_NAME, manifest)
        _write_json(staging / MANIFEST_NAME, manifest)
        if gguf_info.get("file"):
            _write_json(staging / f"{config.out}.{MANIFEST_NAME}", manifest)
        run_dir = output_root / config.out / version
        # The same version is the same weights, config and data: a rerun replaces its identical twin.
        shutil.rmtree(run_dir, ignore_errors=True)
        staging.replace(run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("saved %s version %s in %s", config.out, version, run_dir)

    # 8. Register.
    if registry is not None:
        registry.register_model(
            config.out,
            version,
            base_model=config.base,
            source=str(run_dir),
            manifest_hash=manifest_of_data["hash"],
            metrics=metrics.summary(),
        )
        if config.alias:
            registry.set_alias(config.alias, config.out, version)
            log.info("alias %s -> %s@%s", config.alias, config.out, version)
    gguf_path = run_dir / f"{config.out}.gguf"
    return TrainResult(
        config.out,
        version,
        run_dir,
        run_dir / config.out,
        gguf_path if gguf_path.is_file() else None,
        manifest,
        metrics,
    )


# -- saving ----------------------------------------------------------------------------------------------------


def version_hash(hf_dir: Path, saved_config: dict[str, Any], data_hash: str) -> str:
    """Twelve hex digits naming exactly these weights, trained with this config on this data."""
    digest = hashlib.sha256()
    for weights in sorted(hf_dir.glob("*.safetensors")):
        digest.update(weights.name.encode())
        digest.update(sha256_of(weights).encode())
    digest.update(config_hash(saved_config).encode())
    digest.update(data_hash.encode())
    return digest.hexdigest()[:12]


# Where a run is written and what happens after it: none of it changes what was trained.
_NOT_HASHED = ("output_dir", "alias", "register_version", "threads")


def config_hash(saved_config: dict[str, Any]) -> str:
    trained_by = {key: value for key, value in saved_config["config"].items() if key not in _NOT_HASHED}
    return hashlib.sha256(json.dumps(trained_by, sort_keys=True).encode()).hexdigest()[:12]


def optimizer_manifest(
    config: TrainConfig,
    version: str,
    base: BaseModel,
    data_hash: str,
    saved_config: dict[str, Any],
    metrics: TrainMetrics,
    gguf_info: dict[str, Any],
) -> dict[str, Any]:
    """``bpo_optimizer.json``: what the catalogue reads to serve the folder with the paper's template."""
    return {
        "name": config.out,
        "version": version,
        "prompt_style": PromptStyle.BPO_TEMPLATE.value,
        "template_sha256": hashlib.sha256(bpo_inference_template().encode()).hexdigest(),
        "base_model": config.base,
        "base_identity": base.name,
        "method": config.method,
        "data_manifest_hash": data_hash,
        "config_hash": config_hash(saved_config),
        "metrics": metrics.summary(),
        "gguf": gguf_info,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _export_gguf(config: TrainConfig, base: BaseModel, hf_dir: Path, target: Path, version: str) -> dict[str, Any]:
    if not config.gguf:
        return {"status": "not requested"}
    if base.gguf is None:
        return {
            "status": "unavailable",
            "reason": "the base has no GGUF to take tokenizer and metadata from, and llama.cpp's "
            "convert_hf_to_gguf.py is not installed with llama-cpp-python or gguf",
        }
    try:
        exported = export_gguf(
            hf_dir,
            base.gguf,
            target,
            name=f"{config.out}-{version}",
            tensor_type=config.gguf_type,
            extra_metadata={"bpo.optimizer.version": version},
        )
    except GgufUnavailableError as exc:
        return {"status": "unavailable", "reason": str(exc)}
    return {
        "status": "exported",
        "file": exported.path.name,
        "tensor_type": exported.tensor_type,
        "metadata_from": str(exported.metadata_from),
    }


def _portable_adapter_config(adapter_dir: Path, base_name: str) -> None:
    """peft records the base's local path; the catalogue name is what another machine can resolve."""
    path = adapter_dir / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = base_name
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _autocast(device: str, precision: str) -> Any:
    import torch

    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device_type=device, dtype=dtype)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
