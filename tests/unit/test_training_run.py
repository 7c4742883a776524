"""A whole training run on a tiny random LLaMA built in memory: the loss, the loop, what is saved and registered,
the version hash, LoRA merging, and the GGUF writer against a base GGUF written here."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bpo.engines.base import GenerationRequest, SamplingParams
from bpo.models.catalogue import ModelCatalogue, PromptStyle
from bpo.optimizer.prompting import render_bpo_template
from tests.unit.tiny_models import tiny_llama_folder, tiny_tokenizer
from training.config import TrainConfig
from training.data import TrainingPair, build_examples
from training.gguf_export import GgufUnavailableError, export_gguf, permute_for_llama_cpp
from training.pairs import MissingPairsError
from training.train import BaseModel, BestEpoch, _to_device, load_pairs, token_loss, train

pytestmark = pytest.mark.unit

REWRITES = [
    ("Tell me about black holes.", "Explain what black holes are, how they form, and why nothing escapes them."),
    ("Job interview tips?", "Give me practical tips for a job interview, with examples of common questions."),
    ("Poem about autumn.", "Write a short poem about autumn leaves, in four rhyming stanzas with vivid imagery."),
    ("What is inflation", "Explain what inflation is, its main causes, and how it affects household budgets."),
]


def make_pairs(count: int, dataset: str = "bpo-val") -> list[TrainingPair]:
    return [
        TrainingPair(f"{dataset}-pair-{i:03d}", f"{dataset}-record-{i:03d}", dataset, *REWRITES[i % len(REWRITES)])
        for i in range(count)
    ]


class ListPairs:
    def __init__(self, pairs: list[TrainingPair]) -> None:
        self.pairs = pairs

    def kept_pairs(self, datasets: Sequence[str]) -> list[TrainingPair]:
        return [pair for pair in self.pairs if pair.dataset in datasets]


class RecordingRegistry:
    def __init__(self) -> None:
        self.models: list[dict[str, Any]] = []
        self.aliases: list[tuple[str, str, str]] = []

    def register_model(
        self,
        name: str,
        version: str,
        *,
        base_model: str = "",
        source: str = "",
        manifest_hash: str = "",
        metrics: dict[str, Any] | None = None,
    ) -> None:
        self.models.append(
            {"name": name, "version": version, "base_model": base_model, "source": source,
             "manifest_hash": manifest_hash, "metrics": metrics}
        )  # fmt: skip

    def set_alias(self, alias: str, name: str, version: str) -> None:
        self.aliases.append((alias, name, version))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def config(**values: Any) -> TrainConfig:
    defaults: dict[str, Any] = {
        "pairs": ["bpo-val"],
        "out": "tiny-opt",
        "base": "tiny-llama",
        "learning_rate": 3e-3,
        "batch_size": 4,
        "eval_fraction": 0.25,
        "max_steps": 12,
        "threads": 1,
        "gguf": False,
    }
    return TrainConfig.model_validate(defaults | values)


def test_loss_from_kept_logits_equals_the_loss_over_the_whole_sequence(base_folder: Path) -> None:
    import torch
    import torch.nn.functional as functional
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    examples = build_examples(make_pairs(3), tokenizer, 512, 8).examples
    batch = _to_device(examples, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        total, count = token_loss(model, batch, contextlib.nullcontext)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reference = functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum"
        )
    assert count == sum(e.target_tokens for e in examples)
    assert float(total) == pytest.approx(float(reference), rel=1e-5)


def test_a_full_run_trains_saves_registers_and_is_served_with_the_papers_template(
    base_folder: Path, tmp_path: Path
) -> None:
    registry = RecordingRegistry()
    result = train(
        config(alias="latest"),
        pairs=ListPairs(make_pairs(24)),
        base=BaseModel("tiny-llama", base_folder, None),
        output_root=tmp_path,
        registry=registry,
    )
    metrics = result.metrics
    assert metrics.steps == 12
    assert metrics.eval_loss_before is not None and metrics.eval_loss_after is not None
    assert metrics.eval_loss_after < metrics.eval_loss_before
    assert sum(metrics.step_losses[-3:]) < sum(metrics.step_losses[:3])
    assert [e.epoch for e in metrics.epochs] == list(range(1, len(metrics.epochs) + 1))

    run = tmp_path / "tiny-opt" / result.version
    assert result.run_dir == run and result.hf_folder == run / "tiny-opt"
    assert not list((tmp_path / "tiny-opt").glob(".staging-*"))
    manifest = json.loads((run / "tiny-opt" / "bpo_optimizer.json").read_text())
    assert manifest["version"] == result.version and manifest["prompt_style"] == "bpo_template"
    assert manifest["gguf"] == {"status": "not requested"}
    data = json.loads((run / "data_manifest.json").read_text())
    assert manifest["data_manifest_hash"] == data["hash"]
    assert len(data["train"]) + len(data["eval"]) == 24 and data["eval"]
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["config"]["max_steps"] == 12 and saved["resolved"]["device"] == "cpu"
    assert json.loads((run / "metrics.json").read_text())["steps"] == 12

    assert registry.models == [
        {"name": "tiny-opt", "version": result.version, "base_model": "tiny-llama", "source": str(run),
         "manifest_hash": data["hash"], "metrics": metrics.summary()}
    ]  # fmt: skip
    assert registry.aliases == [("latest", "tiny-opt", result.version)]

    # The catalogue recognises the folder as a trained optimizer, and an engine loads and runs it.
    from bpo.engines.hf_transformers import TransformersEngine
    from bpo.models.prepare import ModelPreparer

    spec = ModelCatalogue().resolve(str(result.hf_folder))
    assert spec.prompt_style == PromptStyle.BPO_TEMPLATE
    identity = ModelPreparer(tmp_path / "models").identity(spec)
    assert identity.version == result.version
    engine = TransformersEngine.load(
        result.hf_folder, identity, context_length=512, device="cpu", dtype="float32", threads=1
    )
    (completion,) = engine._generate_all(
        [GenerationRequest(prompt=render_bpo_template("Tell me about black holes."),
                           params=SamplingParams(temperature=0.0, max_tokens=8))]
    )  # fmt: skip
    assert completion.completion_tokens > 0


def test_the_same_run_twice_gives_the_same_version(base_folder: Path, tmp_path: Path) -> None:
    def run(root: Path) -> str:
        return train(
            config(max_steps=3),
            pairs=ListPairs(make_pairs(12)),
            base=BaseModel("t", base_folder, None),
            output_root=root,
        ).version

    first = run(tmp_path / "a")
    assert run(tmp_path / "b") == first
    # Where it is written and whether it is aliased is no part of what was trained.
    elsewhere = train(
        config(max_steps=3, output_dir=tmp_path / "x", alias="latest"),
        pairs=ListPairs(make_pairs(12)),
        base=BaseModel("t", base_folder, None),
        output_root=tmp_path / "c",
    )
    assert elsewhere.version == first
    other = train(
        config(max_steps=3, seed=1), pairs=ListPairs(make_pairs(12)), base=BaseModel("t", base_folder, None),
        output_root=tmp_path / "d",
    ).version  # fmt: skip
    assert other != first


def test_the_best_epoch_is_kept_and_restored() -> None:
    import torch

    layer = torch.nn.Linear(2, 2)
    best = BestEpoch()
    assert not best.offer(1, None, layer)  # no eval pairs: nothing to compare
    assert best.offer(1, 1.0, layer)
    first = {name: value.clone() for name, value in layer.state_dict().items()}
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not best.offer(2, 1.5, layer) and best.epoch == 1
    best.restore(layer)
    assert all(torch.equal(layer.state_dict()[name], value) for name, value in first.items())


@pytest.mark.parametrize("keep_best", [True, False])
def test_a_run_saves_the_epoch_with_the_lowest_eval_loss(
    base_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_best: bool
) -> None:
    import torch
    from safetensors.torch import load_file

    from training import train as train_module

    # Eval losses scripted so that the first epoch is the best: before training, then after each of three epochs.
    losses = iter([2.0, 1.0, 1.5, 1.8])
    seen: list[dict[str, Any]] = []

    def scripted_eval(model: Any, *args: Any, **kwargs: Any) -> float:
        seen.append({name: p.detach().clone() for name, p in model.named_parameters()})
        return next(losses)

    monkeypatch.setattr(train_module, "evaluate", scripted_eval)
    result = train(
        config(max_steps=0, epochs=3, keep_best_epoch=keep_best),
        pairs=ListPairs(make_pairs(24)),
        base=BaseModel("tiny-llama", base_folder, None),
        output_root=tmp_path,
    )
    metrics = result.metrics
    assert [e.eval_loss for e in metrics.epochs] == [1.0, 1.5, 1.8]
    assert (metrics.kept_epoch, metrics.eval_loss_after) == ((1, 1.0) if keep_best else (3, 1.8))
    assert metrics.summary()["kept_epoch"] == metrics.kept_epoch
    saved = load_file(result.hf_folder / "model.safetensors")
    expected = seen[metrics.kept_epoch]  # seen[0] is before training
    assert all(torch.allclose(saved[name], expected[name].to(saved[name].dtype)) for name in saved)
    assert not torch.allclose(
        seen[1]["model.layers.0.mlp.down_proj.weight"], seen[3]["model.layers.0.mlp.down_proj.weight"]
    )


def test_lora_trains_only_adapters_and_exports_them_and_the_merged_model(base_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    result = train(
        config(method="lora", learning_rate=1e-2, max_steps=8, lora={"r": 4, "alpha": 8, "dropout": 0.0}),
        pairs=ListPairs(make_pairs(16)),
        base=BaseModel("tiny-llama", base_folder, None),
        output_root=tmp_path,
    )
    assert result.metrics.eval_loss_after is not None and result.metrics.eval_loss_before is not None
    assert result.metrics.eval_loss_after < result.metrics.eval_loss_before
    adapter = result.run_dir / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tiny-llama" and adapter_config["r"] == 4
    assert all("lora_" in name for name in load_file(adapter / "adapter_model.safetensors"))
    merged = load_file(result.hf_folder / "model.safetensors")
    original = load_file(base_folder / "model.safetensors")
    assert not any("lora" in name for name in merged)
    changed = [name for name in original if not (merged[name] == original[name].to(merged[name].dtype)).all()]
    # Adapters sit on the linear layers only: merging changes those and nothing else.
    assert changed and all("proj" in name for name in changed)


def test_eval_datasets_are_held_out_whole_and_their_prompts_left_out_of_training() -> None:
    train_pairs = make_pairs(8)
    held_out = [TrainingPair("t-1", "r-t-1", "bpo-test", "Tell me about black holes.", "Rewrite.")]
    source = ListPairs([*train_pairs, *held_out])
    got_train, got_eval = load_pairs(config(eval_pairs=["bpo-test"]), source)
    assert got_eval == held_out
    assert all(pair.x_user != "Tell me about black holes." for pair in got_train)
    assert len(got_train) == 6


def test_a_dataset_without_kept_pairs_is_an_error_naming_it() -> None:
    with pytest.raises(MissingPairsError, match="nosuch"):
        load_pairs(config(pairs=["bpo-val", "nosuch"]), ListPairs(make_pairs(4)))


# -- GGUF -----------------------------------------------------------------------------------------------------------


def test_permutation_is_the_inverse_of_what_transformers_applies_when_reading_a_gguf() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    q = rng.standard_normal((32, 32)).astype(np.float32)
    k = rng.standard_normal((16, 32)).astype(np.float32)
    assert not np.array_equal(permute_for_llama_cpp(q, 4), q)
    np.testing.assert_array_equal(processor._reverse_permute_weights(permute_for_llama_cpp(q, 4), 4, 4), q)
    np.testing.assert_array_equal(processor._reverse_permute_weights(permute_for_llama_cpp(k, 2), 4, 2), k)


def write_base_gguf(path: Path, folder: Path, arch: str = "llama") -> None:
    """A base GGUF as the packaged models have: the hyperparameters, a tokenizer field, and one tensor per weight."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_tokenizer_model("gpt2")
    writer.add_eos_token_id(config["eos_token_id"])
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    for name, tensor in load_file(folder / "model.safetensors").items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.zeros(tuple(tensor.shape), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_export_copies_the_bases_metadata_and_writes_the_trained_weights(
    base_folder: Path, tmp_path: Path
) -> None:
    import gguf
    from safetensors.torch import load_file

    base_gguf = tmp_path / "base.gguf"
    write_base_gguf(base_gguf, base_folder)
    exported = export_gguf(
        base_folder,
        base_gguf,
        tmp_path / "out.gguf",
        name="tiny-opt-v1",
        extra_metadata={"bpo.optimizer.version": "v1"},
    )
    reader = gguf.GGUFReader(exported.path)
    assert reader.get_field("general.name").contents() == "tiny-opt-v1"
    assert reader.get_field("bpo.optimizer.version").contents() == "v1"
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert reader.get_field("llama.attention.head_count_kv").contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    hf = load_file(base_folder / "model.safetensors")
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.F16
    expected_q = permute_for_llama_cpp(hf["model.layers.0.self_attn.q_proj.weight"].numpy(), 4)
    np.testing.assert_allclose(np.asarray(q.data, dtype=np.float32), expected_q.astype(np.float16), rtol=1e-3)
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(norm.data, hf["model.layers.0.input_layernorm.weight"].numpy())


def test_gguf_export_refuses_an_architecture_it_does_not_know(base_folder: Path, tmp_path: Path) -> None:
    base_gguf = tmp_path / "base.gguf"
    write_base_gguf(base_gguf, base_folder, arch="gemma")
    with pytest.raises(GgufUnavailableError, match="gemma"):
        export_gguf(base_folder, base_gguf, tmp_path / "out.gguf", name="x")
    assert not (tmp_path / "out.gguf").exists()


def test_a_run_whose_base_has_no_gguf_says_so_in_its_manifest(base_folder: Path, tmp_path: Path) -> None:
    result = train(
        config(gguf=True, max_steps=1),
        pairs=ListPairs(make_pairs(8)),
        base=BaseModel("tiny-llama", base_folder, None),
        output_root=tmp_path,
    )
    assert result.gguf is None
    assert result.manifest["gguf"]["status"] == "unavailable"
    assert "convert_hf_to_gguf.py is not installed" in result.manifest["gguf"]["reason"]


def test_a_run_with_a_gguf_base_exports_a_gguf_with_its_version(base_folder: Path, tmp_path: Path) -> None:
    import gguf

    base_gguf = tmp_path / "base.gguf"
    write_base_gguf(base_gguf, base_folder)
    result = train(
        config(gguf=True, max_steps=1),
        pairs=ListPairs(make_pairs(8)),
        base=BaseModel("tiny-llama", base_folder, base_gguf),
        output_root=tmp_path / "runs",
    )
    assert result.gguf == result.run_dir / "tiny-opt.gguf"
    assert result.manifest["gguf"]["status"] == "exported"
    sidecar = json.loads((result.run_dir / "tiny-opt.bpo_optimizer.json").read_text())
    assert sidecar["version"] == result.version
    assert gguf.GGUFReader(result.gguf).get_field("bpo.optimizer.version").contents() == result.version
    spec = ModelCatalogue().resolve(str(result.gguf))
    assert spec.prompt_style == PromptStyle.BPO_TEMPLATE
    from bpo.models.prepare import ModelPreparer

    assert ModelPreparer(tmp_path / "models").identity(spec).version == result.version
