"""The training configuration: the paper's defaults, the environment of the job, and what is saved."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from training.config import LLAMA_LINEAR_MODULES, TrainConfig

pytestmark = pytest.mark.unit


def config(**values: object) -> TrainConfig:
    return TrainConfig.model_validate({"pairs": ["bpo-val"], "out": "bpo-test-opt", **values})


def test_defaults_are_the_papers_public_values() -> None:
    c = config()
    assert c.learning_rate == 2e-5
    assert c.lr_scheduler == "cosine"
    assert (c.adam_beta1, c.adam_beta2, c.adam_epsilon, c.weight_decay) == (0.9, 0.999, 1e-8, 0.0)
    assert c.max_seq_length == 512
    assert c.epochs == 3
    assert c.warmup_ratio == 0.03
    assert c.max_grad_norm == 1.0
    assert c.seed == 66
    assert c.method == "full"
    assert c.max_steps == 0
    assert c.base == "smollm2-135m-instruct"
    assert c.lora.target_modules == list(LLAMA_LINEAR_MODULES)
    assert (c.lora.r, c.lora.alpha) == (16, 32)


def test_precision_is_fp16_on_a_gpu_and_fp32_on_cpu() -> None:
    c = config()
    assert c.resolved_device(cuda_available=True) == "cuda"
    assert c.resolved_device(cuda_available=False) == "cpu"
    assert c.resolved_precision("cuda") == "fp16"
    assert c.resolved_precision("cpu") == "fp32"
    assert config(precision="bf16").resolved_precision("cpu") == "bf16"
    assert config(device="cpu").resolved_device(cuda_available=True) == "cpu"


def test_the_job_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BPO_TRAIN_PAIRS", "bpo-val, hh-rlhf")
    monkeypatch.setenv("BPO_TRAIN_EVAL_PAIRS", '["bpo-test"]')
    monkeypatch.setenv("BPO_TRAIN_OUT", "bpo-smollm2")
    monkeypatch.setenv("BPO_TRAIN_METHOD", "lora")
    monkeypatch.setenv("BPO_TRAIN_LORA__R", "8")
    monkeypatch.setenv("BPO_TRAIN_LORA__TARGET_MODULES", "q_proj,v_proj")
    monkeypatch.setenv("BPO_TRAIN_MAX_STEPS", "10")
    monkeypatch.setenv("BPO_TRAIN_ALIAS", "latest")
    monkeypatch.setenv("BPO_PLATFORM__DATABASE_URL", "postgresql://platform/db")
    c = TrainConfig()  # type: ignore[call-arg]
    assert c.pairs == ["bpo-val", "hh-rlhf"]
    assert c.eval_pairs == ["bpo-test"]
    assert c.method == "lora" and c.lora.r == 8 and c.lora.target_modules == ["q_proj", "v_proj"]
    assert c.max_steps == 10 and c.alias == "latest"
    assert c.database_url == "postgresql://platform/db"
    assert not c.holds_out_by_hash()
    monkeypatch.setenv("BPO_TRAIN_DATABASE_URL", "postgresql://training/db")
    assert TrainConfig().database_url == "postgresql://training/db"  # type: ignore[call-arg]


def test_a_generic_database_url_variable_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://someone-else")
    assert config().database_url == ""


def test_the_saved_config_never_carries_the_database_url() -> None:
    c = config(database_url="postgresql://user:secret@host/db")
    saved = c.saved({"device": "cpu"})
    assert "database_url" not in saved["config"]
    assert "secret" not in str(saved)
    assert saved["resolved"] == {"device": "cpu"}
    assert saved["config"]["learning_rate"] == 2e-5


@pytest.mark.parametrize(
    "values",
    [
        {"pairs": []},
        {"out": ""},
        {"out": "has space"},
        {"eval_pairs": ["bpo-val"]},
        {"method": "qlora"},
        {"eval_fraction": 1.0},
        {"learning_rate": 0},
        {"unknown_option": 1},
    ],
)
def test_invalid_configurations_are_refused(values: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        config(**values)
