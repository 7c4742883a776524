"""Training examples: label masking, truncation and skipping, the deterministic split, batching, the manifest."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest

from bpo.optimizer.prompting import render_bpo_template
from tests.unit.tiny_models import tiny_tokenizer
from training.data import (
    IGNORE_INDEX,
    TrainingPair,
    build_example,
    build_examples,
    collate,
    data_manifest,
    eval_batches,
    eval_bucket,
    split_pairs,
    target_text,
    train_batches,
)

pytestmark = pytest.mark.unit


class CharTokenizer:
    """One token per character, and a BOS only when special tokens are asked for: positions are easy to count."""

    eos_token_id: int | None = 0
    bos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(ch) + 10 for ch in text]
        return [self.bos_token_id, *ids] if add_special_tokens else ids


def pair(x_user: str = "Tell me about black holes.", x_opt: str = "Explain black holes.", n: int = 0) -> TrainingPair:
    record = str(uuid.uuid5(uuid.NAMESPACE_URL, f"record-{n}"))
    return TrainingPair(str(uuid.uuid5(uuid.NAMESPACE_URL, f"pair-{n}")), record, "bpo-val", x_user, x_opt)


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    return tiny_tokenizer()


# -- label masking ----------------------------------------------------------------------------------------------


def test_masked_positions_are_exactly_the_prompt_tokens() -> None:
    tokenizer = CharTokenizer()
    example = build_example(pair(), tokenizer, max_seq_length=512, min_prompt_tokens=8)
    assert example is not None
    prompt = tokenizer.encode(render_bpo_template("Tell me about black holes."), add_special_tokens=True)
    target = tokenizer.encode(" Explain black holes.", add_special_tokens=False)
    assert example.input_ids == [*prompt, *target, 0]
    masked = [i for i, label in enumerate(example.labels) if label == IGNORE_INDEX]
    assert masked == list(range(len(prompt)))
    assert example.labels[len(prompt) :] == [*target, 0]
    assert example.prompt_tokens == len(prompt)
    assert example.target_tokens == len(target) + 1


def test_masking_with_a_real_tokenizer_matches_inference_tokenization(hf_tokenizer: Any) -> None:
    example = build_example(pair(), hf_tokenizer, max_seq_length=512, min_prompt_tokens=8)
    assert example is not None
    # The prompt part is exactly what an engine feeds for the paper's template (raw prompt, special tokens on).
    inference_ids = hf_tokenizer(render_bpo_template("Tell me about black holes."), add_special_tokens=True).input_ids
    assert example.input_ids[: len(inference_ids)] == inference_ids
    assert all(label == IGNORE_INDEX for label in example.labels[: len(inference_ids)])
    learned = example.labels[len(inference_ids) :]
    assert IGNORE_INDEX not in learned
    assert learned[-1] == hf_tokenizer.eos_token_id
    assert hf_tokenizer.decode(learned[:-1]) == " Explain black holes."


def test_target_is_the_stripped_rewrite_after_one_space() -> None:
    assert target_text("  \nExplain black holes.\n") == " Explain black holes."


def test_a_long_prompt_is_cut_from_its_left_and_the_target_kept_whole() -> None:
    tokenizer = CharTokenizer()
    long_user = "word " * 100
    example = build_example(pair(long_user, "Short."), tokenizer, max_seq_length=200, min_prompt_tokens=16)
    assert example is not None
    full_prompt = tokenizer.encode(render_bpo_template(long_user), add_special_tokens=True)
    target = [*tokenizer.encode(" Short.", add_special_tokens=False), 0]
    assert len(example.input_ids) == 200
    assert example.input_ids[-len(target) :] == target
    # The prompt's end ("[/INST]") stays next to the target; its beginning is what goes.
    assert example.input_ids[: -len(target)] == full_prompt[-(200 - len(target)) :]
    assert example.cut_prompt_tokens == len(full_prompt) - (200 - len(target))
    assert example.labels.count(IGNORE_INDEX) == 200 - len(target)


def test_an_example_whose_target_leaves_too_little_prompt_is_skipped_and_counted() -> None:
    tokenizer = CharTokenizer()
    fits, too_long = pair(n=1), pair(x_opt="x" * 190, n=2)
    built = build_examples([fits, too_long], tokenizer, max_seq_length=200, min_prompt_tokens=16)
    assert [e.pair_id for e in built.examples] == [fits.pair_id]
    assert built.skipped_too_long == [too_long.pair_id]
    assert built.truncated == []


def test_a_tokenizer_without_eos_is_refused() -> None:
    tokenizer = CharTokenizer()
    tokenizer.eos_token_id = None
    with pytest.raises(ValueError, match="EOS"):
        build_example(pair(), tokenizer, max_seq_length=512, min_prompt_tokens=8)


# -- split --------------------------------------------------------------------------------------------------------


def test_split_is_deterministic_order_independent_and_stable_under_additions() -> None:
    pairs = [pair(n=n) for n in range(400)]
    train, held_out = split_pairs(pairs, 0.1)
    again_train, again_held_out = split_pairs(list(reversed(pairs)), 0.1)
    assert [p.pair_id for p in train] == [p.pair_id for p in again_train]
    assert [p.pair_id for p in held_out] == [p.pair_id for p in again_held_out]
    assert train == sorted(train, key=lambda p: p.pair_id)
    assert 20 <= len(held_out) <= 60  # about 10% of 400
    # New pairs never move old ones between the sides.
    more_train, more_held_out = split_pairs([*pairs, *(pair(n=n) for n in range(400, 500))], 0.1)
    old = {p.pair_id for p in pairs}
    assert {p.pair_id for p in more_held_out} & old == {p.pair_id for p in held_out}
    assert {p.pair_id for p in more_train} & old == {p.pair_id for p in train}


def test_pairs_of_one_record_land_on_one_side() -> None:
    record = str(uuid.uuid4())
    siblings = [TrainingPair(str(uuid.uuid4()), record, "d", "same prompt", f"rewrite {i}") for i in range(5)]
    others = [pair(n=n) for n in range(200)]
    _, held_out = split_pairs([*siblings, *others], 0.5)
    sides = {p.pair_id in {q.pair_id for q in held_out} for p in siblings}
    assert len(sides) == 1


def test_eval_bucket_is_uniform_enough_and_fixed() -> None:
    assert eval_bucket("abc") == eval_bucket("abc")
    buckets = Counter(int(eval_bucket(str(n)) * 10) for n in range(5000))
    assert set(buckets) == set(range(10))
    assert all(400 <= count <= 600 for count in buckets.values())


def test_zero_eval_fraction_keeps_everything_for_training() -> None:
    pairs = [pair(n=n) for n in range(50)]
    train, held_out = split_pairs(pairs, 0.0)
    assert len(train) == 50 and held_out == []


# -- batching -----------------------------------------------------------------------------------------------------


def test_collate_pads_right_without_loss_on_padding() -> None:
    tokenizer = CharTokenizer()
    short = build_example(pair(x_opt="A."), tokenizer, 512, 8)
    long = build_example(pair(x_opt="A much longer rewrite."), tokenizer, 512, 8)
    assert short is not None and long is not None
    batch = collate([short, long], pad_token_id=3)
    width = len(long.input_ids)
    pad = width - len(short.input_ids)
    assert batch.input_ids[0] == short.input_ids + [3] * pad
    assert batch.attention_mask[0] == [1] * len(short.input_ids) + [0] * pad
    assert batch.labels[0] == short.labels + [IGNORE_INDEX] * pad
    assert batch.input_ids[1] == long.input_ids and batch.attention_mask[1] == [1] * width


def test_train_batches_cover_every_example_once_and_repeat_per_seed_and_epoch() -> None:
    tokenizer = CharTokenizer()
    examples = build_examples([pair(x_opt="y" * (n % 37 + 1), n=n) for n in range(150)], tokenizer, 512, 8).examples

    def ids(seed: int, epoch: int) -> list[list[str]]:
        return [[e.pair_id for e in batch] for batch in train_batches(examples, 4, seed, epoch)]

    first = ids(66, 1)
    assert sorted(pid for batch in first for pid in batch) == sorted(e.pair_id for e in examples)
    assert all(len(batch) <= 4 for batch in first)
    assert first == ids(66, 1)
    assert first != ids(66, 2) and first != ids(67, 1)


def test_train_batches_group_similar_lengths() -> None:
    tokenizer = CharTokenizer()
    examples = build_examples([pair(x_opt="y" * (n * 3 + 1), n=n) for n in range(128)], tokenizer, 1024, 8).examples
    batches = list(train_batches(examples, 4, 66, 1))
    padded = sum(max(len(e.input_ids) for e in b) * len(b) for b in batches)
    real = sum(len(e.input_ids) for e in examples)
    # Random batches of lengths spread over ~400 tokens would pad far more than a fifth.
    assert padded < real * 1.2


def test_eval_batches_sort_by_length() -> None:
    tokenizer = CharTokenizer()
    examples = build_examples([pair(x_opt="y" * (50 - n), n=n) for n in range(10)], tokenizer, 512, 8).examples
    lengths = [len(e.input_ids) for batch in eval_batches(examples, 3) for e in batch]
    assert lengths == sorted(lengths)


# -- manifest -----------------------------------------------------------------------------------------------------


def manifest_for(pairs: list[TrainingPair]) -> dict[str, Any]:
    tokenizer = CharTokenizer()
    train, held_out = split_pairs(pairs, 0.2)
    return data_manifest(
        ["bpo-val"],
        [],
        0.2,
        train,
        held_out,
        build_examples(train, tokenizer, 512, 8),
        build_examples(held_out, tokenizer, 512, 8),
    )


def test_manifest_lists_the_exact_pairs_and_hashes_ids_and_contents() -> None:
    pairs = [pair(x_opt=f"Rewrite {n}.", n=n) for n in range(30)]
    manifest = manifest_for(pairs)
    assert sorted(manifest["train"] + manifest["eval"]) == sorted(p.pair_id for p in pairs)
    assert not set(manifest["train"]) & set(manifest["eval"])
    assert manifest["split"] == {"by": "sha256(record_id)", "eval_fraction": 0.2}
    assert manifest["hash"] == manifest_for(list(reversed(pairs)))["hash"]
    edited = [*pairs[:-1], TrainingPair(pairs[-1].pair_id, pairs[-1].record_id, "bpo-val", pairs[-1].x_user, "Edited")]
    assert manifest_for(edited)["hash"] != manifest["hash"]
    assert manifest_for(pairs[:-1])["hash"] != manifest["hash"]


def test_manifest_leaves_out_skipped_pairs_and_names_them() -> None:
    pairs = [pair(x_opt="ok", n=n) for n in range(10)] + [pair(x_opt="z" * 600, n=99)]
    manifest = manifest_for(pairs)
    assert manifest["skipped_too_long"] == [pairs[-1].pair_id]
    assert pairs[-1].pair_id not in manifest["train"] + manifest["eval"]
