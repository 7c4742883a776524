"""Training examples from prompt pairs: the paper's template as input, the optimized prompt as the only target.

An example is ``input = render_bpo_template(x_user)`` tokenized exactly as the inference engines tokenize it,
followed by ``" " + x_opt`` and the end-of-sequence token. Labels are -100 on every prompt token, so the loss
covers only X_opt's tokens and the EOS that teaches the model to stop. Prompt and target are tokenized apart and
concatenated: that is the token sequence the model sees at inference (the prompt's tokens, then its own).

Too long for ``max_seq_length``: the prompt is cut from its left while at least ``min_prompt_tokens`` of it
remain (the ``[/INST]`` end next to the target stays); otherwise the example is skipped and counted. A target is
never cut: a model trained on clipped rewrites learns to stop mid-sentence.

The train/eval split is a pure function of each pair's ``record_id``: a pair never moves between the sides when
pairs are added, and several pairs built from one preference record (other constructor models or prompt
versions) all land on one side, so the same user prompt is never both trained and evaluated on.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bpo.optimizer.prompting import render_bpo_template

IGNORE_INDEX = -100
# Batches per length-sorting window of train_batches.
LENGTH_WINDOW = 16


@dataclass(frozen=True, slots=True)
class TrainingPair:
    pair_id: str
    record_id: str
    dataset: str
    x_user: str
    x_opt: str

    def content_digest(self) -> str:
        return hashlib.sha256(json.dumps([self.x_user, self.x_opt]).encode()).hexdigest()


class TextTokenizer(Protocol):
    """The slice of a Hugging Face tokenizer that example building uses."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class Example:
    pair_id: str
    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int
    cut_prompt_tokens: int = 0

    @property
    def target_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_tokens


@dataclass(slots=True)
class ExampleSet:
    examples: list[Example] = field(default_factory=list)
    skipped_too_long: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)

    @property
    def target_tokens(self) -> int:
        return sum(example.target_tokens for example in self.examples)


def eval_bucket(key: str) -> float:
    """A uniform number in [0, 1) fixed by ``key``: the same on every machine and every run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_pairs(pairs: Sequence[TrainingPair], eval_fraction: float) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """Deterministic split by ``record_id``; both sides ordered by ``pair_id`` whatever order the pairs came in."""
    ordered = sorted(pairs, key=lambda pair: pair.pair_id)
    train = [pair for pair in ordered if eval_bucket(pair.record_id) >= eval_fraction]
    held_out = [pair for pair in ordered if eval_bucket(pair.record_id) < eval_fraction]
    return train, held_out


def target_text(x_opt: str) -> str:
    """What follows ``[/INST]``: one space, as in the paper's llama tokenization, and the rewrite stripped (the
    engines strip what the model writes, so surrounding whitespace would only be learned to be thrown away)."""
    return " " + x_opt.strip()


def build_example(
    pair: TrainingPair, tokenizer: TextTokenizer, max_seq_length: int, min_prompt_tokens: int
) -> Example | None:
    """One example, or None when it cannot fit without cutting the target or most of the prompt."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: the optimizer could never learn to stop")
    # add_special_tokens=True: the inference engines tokenize a raw prompt that way (BOS where the model uses one).
    prompt_ids = tokenizer.encode(render_bpo_template(pair.x_user), add_special_tokens=True)
    target_ids = [*tokenizer.encode(target_text(pair.x_opt), add_special_tokens=False), tokenizer.eos_token_id]
    room = max_seq_length - len(target_ids)
    cut = 0
    if len(prompt_ids) > room:
        if room < min_prompt_tokens:
            return None
        cut = len(prompt_ids) - room
        prompt_ids = prompt_ids[cut:]
    return Example(
        pair_id=pair.pair_id,
        input_ids=prompt_ids + target_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + target_ids,
        prompt_tokens=len(prompt_ids),
        cut_prompt_tokens=cut,
    )


def build_examples(
    pairs: Sequence[TrainingPair], tokenizer: TextTokenizer, max_seq_length: int, min_prompt_tokens: int
) -> ExampleSet:
    built = ExampleSet()
    for pair in pairs:
        example = build_example(pair, tokenizer, max_seq_length, min_prompt_tokens)
        if example is None:
            built.skipped_too_long.append(pair.pair_id)
            continue
        if example.cut_prompt_tokens:
            built.truncated.append(pair.pair_id)
        built.examples.append(example)
    return built


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    labels: list[list[int]]


def collate(examples: Sequence[Example], pad_token_id: int) -> Batch:
    """Right padding: causal attention never lets a real token see a pad after it, and pads carry no loss."""
    width = max(len(example.input_ids) for example in examples)
    input_ids, attention_mask, labels = [], [], []
    for example in examples:
        pad = width - len(example.input_ids)
        input_ids.append(example.input_ids + [pad_token_id] * pad)
        attention_mask.append([1] * len(example.input_ids) + [0] * pad)
        labels.append(example.labels + [IGNORE_INDEX] * pad)
    return Batch(input_ids, attention_mask, labels)


def train_batches(examples: Sequence[Example], batch_size: int, seed: int, epoch: int) -> Iterator[list[Example]]:
    """A fresh order each epoch, fixed by (seed, epoch): a rerun with the same seed sees the same batches.

    Batches are grouped by length (Hugging Face's ``group_by_length``): the shuffled examples are cut into windows
    of ``LENGTH_WINDOW`` batches, each window sorted by length and cut into batches, and the batches shuffled. A
    batch then pads little (lengths here range from 40 to 500 tokens) while every epoch still mixes examples."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * LENGTH_WINDOW
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda index: len(examples[index].input_ids))
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    for batch in batches:
        yield [examples[index] for index in batch]


def eval_batches(examples: Sequence[Example], batch_size: int) -> Iterator[list[Example]]:
    """Similar lengths together: evaluation pads as little as possible, and its order does not change the loss."""
    ordered = sorted(examples, key=lambda example: len(example.input_ids))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start : start + batch_size]


def data_manifest(
    datasets: Sequence[str],
    eval_datasets: Sequence[str],
    eval_fraction: float | None,
    train_pairs: Sequence[TrainingPair],
    eval_pairs: Sequence[TrainingPair],
    train_set: ExampleSet,
    eval_set: ExampleSet,
) -> dict[str, Any]:
    """The exact pairs a run used, and a hash of them (ids and contents) that names this data in the registry."""
    used_train = {example.pair_id for example in train_set.examples}
    used_eval = {example.pair_id for example in eval_set.examples}
    train_rows = [[pair.pair_id, pair.content_digest()] for pair in train_pairs if pair.pair_id in used_train]
    eval_rows = [[pair.pair_id, pair.content_digest()] for pair in eval_pairs if pair.pair_id in used_eval]
    digest = hashlib.sha256(json.dumps({"train": train_rows, "eval": eval_rows}, sort_keys=True).encode()).hexdigest()
    return {
        "hash": digest,
        "datasets": list(datasets),
        "eval_datasets": list(eval_datasets),
        "split": (
            {"by": "sha256(record_id)", "eval_fraction": eval_fraction}
            if eval_fraction is not None
            else {"by": "eval_datasets"}
        ),
        "train": [row[0] for row in train_rows],
        "eval": [row[0] for row in eval_rows],
        "skipped_too_long": sorted([*train_set.skipped_too_long, *eval_set.skipped_too_long]),
        "prompt_truncated": sorted([*train_set.truncated, *eval_set.truncated]),
    }
