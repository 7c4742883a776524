"""The doctor's planning and its diagnoses (the child processes themselves are run by the integration tests)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from bpo.doctor.checks import EngineCheck, diagnose, instruction_set_findings, plan_checks
from bpo.models.catalogue import ModelCatalogue, ModelSpec
from bpo.models.prepare import ModelPreparer
from bpo.settings import BpoSettings

pytestmark = pytest.mark.unit


class PreparedOnly(ModelPreparer):
    """A preparer that reports ``prepared`` as ready, in the named kinds, and nothing else."""

    def __init__(self, prepared: dict[str, set[str]]) -> None:
        super().__init__(Path("/nonexistent"), install_missing=None)
        self.prepared = prepared

    def is_prepared(self, spec: ModelSpec, kind: str) -> bool:
        return kind in self.prepared.get(spec.name, set())


def test_every_installed_engine_meets_every_model_prepared_for_it(tmp_path: Path) -> None:
    preparer = PreparedOnly({"smollm2-135m-instruct": {"gguf", "hf"}, "qwen2.5-coder-0.5b-instruct": {"gguf"}})
    plan = plan_checks(BpoSettings(state_dir=tmp_path), preparer, ModelCatalogue(), ["llamacpp", "transformers"])
    assert plan.checks == (
        EngineCheck("llamacpp", "smollm2-135m-instruct"),
        EngineCheck("llamacpp", "qwen2.5-coder-0.5b-instruct"),
        EngineCheck("transformers", "smollm2-135m-instruct"),
    )
    assert plan.not_checked == ()


def test_a_model_asked_for_but_not_prepared_is_listed_not_hidden(tmp_path: Path) -> None:
    preparer = PreparedOnly({})
    plan = plan_checks(BpoSettings(state_dir=tmp_path), preparer, ModelCatalogue(), ["vllm"], ["smollm2"])
    assert plan.checks == ()
    assert plan.not_checked == (
        ("vllm", "smollm2-135m-instruct", "not prepared for vllm: `bpo models prepare smollm2-135m-instruct --for hf`"),
    )


def test_the_openai_engine_is_checked_with_its_served_model(tmp_path: Path) -> None:
    settings = BpoSettings.model_validate(
        {"state_dir": tmp_path, "engine": {"openai_base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini"}}
    )
    plan = plan_checks(settings, PreparedOnly({}), ModelCatalogue(), ["openai"])
    assert plan.checks == (EngineCheck("openai", "gpt-4o-mini"),)
    with pytest.raises(ValueError, match="unknown engine"):
        plan_checks(settings, PreparedOnly({}), ModelCatalogue(), ["tensorrt"])


def test_a_llamacpp_build_with_amx_on_a_cpu_without_it_is_named() -> None:
    findings = instruction_set_findings({"amx": 112, "avx512": 0}, {"avx2", "fma"}, "libggml-cpu.so")
    assert findings == ["libggml-cpu.so holds 112 AMX tile instructions (ldtilecfg, ...); this CPU does not offer AMX"]
    granted = instruction_set_findings({"amx": 3, "avx512": 9}, {"amx_tile", "avx512f"}, "lib.so")
    assert granted == ["lib.so holds 3 AMX tile instructions (ldtilecfg, ...); this CPU offers AMX (amx_tile) but "
                       "the kernel may not grant its tile state"]  # fmt: skip
    assert instruction_set_findings({"amx": 0, "avx512": 40}, {"avx2"}, "lib.so") == [
        "lib.so holds 40 AVX-512 instructions and this CPU has no AVX-512"
    ]
    assert instruction_set_findings({"amx": 0, "avx512": 0}, set(), "lib.so") == []


@pytest.mark.parametrize(
    ("returncode", "outcome", "timed_out", "cause", "fix"),
    [
        (0, None, True, "no answer within 30s", "--timeout"),
        (-signal.SIGKILL, None, False, "lack of memory", "smaller model"),
        (-signal.SIGSEGV, None, False, "crashed (SIGSEGV)", "make install"),
        (1, {"error_type": "ModelIntegrityError", "error": "sha256 differs"}, False, "sha256", "bpo models prepare m"),
        (1, {"error_type": "ModelNotFoundError", "error": "needs packages"}, False, "needs", "make models"),
        (1, {"error_type": "ValueError", "error": "boom"}, False, "ValueError: boom", "log below"),
    ],
)
def test_each_failure_gets_a_cause_and_a_fix(
    returncode: int, outcome: dict[str, str] | None, timed_out: bool, cause: str, fix: str
) -> None:
    got_cause, got_fix = diagnose(EngineCheck("vllm", "m"), returncode, outcome, timed_out=timed_out, timeout_s=30)
    assert cause in got_cause and fix in got_fix


def test_a_corrupt_gguf_is_named_as_such(tmp_path: Path) -> None:
    local = tmp_path / "broken.gguf"
    local.write_bytes(b"GGUF")
    error = {"error_type": "ValueError", "error": f"Failed to load model from file: {local}"}
    cause, fix = diagnose(EngineCheck("llamacpp", str(local)), 1, error, timed_out=False, timeout_s=30)
    assert "corrupt, truncated, or not a GGUF" in cause and fix == "replace the file with a complete GGUF"
    _, fix = diagnose(EngineCheck("llamacpp", "qwen-0.5b"), 1, error, timed_out=False, timeout_s=30)
    assert fix == "re-prepare it: `bpo models prepare qwen-0.5b`"
