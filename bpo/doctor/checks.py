"""Which engine runs which model on this machine: each pair is tried in a child process, and a failure is
explained (likely cause and fix), never propagated.

The bug this exists for: llama.cpp compiled for its build host turned on Intel AMX, and on a VM that does not
grant AMX tile state every generation died with SIGSEGV at ``ldtilecfg``. A build passes on one CPU and crashes
on another; only running it here tells. When a llama.cpp child crashes, its CPU backend is disassembled and
compared with what this CPU offers, so the report names the instruction set at fault.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bpo.engines.factory import ENGINE_NAMES
from bpo.models.catalogue import ModelCatalogue, ModelSpec
from bpo.models.prepare import ModelPreparer
from bpo.settings import BpoSettings

# The module each engine needs to be installed at all.
ENGINE_MODULES = {"llamacpp": ("llama_cpp",), "vllm": ("vllm",), "transformers": ("transformers", "torch")}
# What an in-process engine loads: a GGUF file, or a Hugging Face folder.
ENGINE_WEIGHTS = {"llamacpp": "gguf", "vllm": "hf", "transformers": "hf"}
PORTABLE_REBUILD = (
    "rebuild llama-cpp-python for any x86-64 CPU: `rm -f .venv/.llama-cpp-* && make install` (the Makefile builds it "
    "with GGML_NATIVE=OFF and AVX2/FMA/F16C only, AVX-512 and AMX off)"
)
AMX_MNEMONICS = ("ldtilecfg", "sttilecfg", "tileloadd", "tilestored", "tilezero", "tilerelease", "tdpb", "tdpfp16ps")


@dataclass(frozen=True, slots=True)
class EngineCheck:
    engine: str
    model: str


@dataclass(frozen=True, slots=True)
class CheckResult:
    engine: str
    model: str
    ok: bool
    seconds: float
    summary: str
    cause: str = ""
    fix: str = ""
    log_tail: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    checks: tuple[EngineCheck, ...]
    # (engine, model, why it is not checked): shown, so that nothing is left out silently.
    not_checked: tuple[tuple[str, str, str], ...]


def installed_engines(settings: BpoSettings) -> list[str]:
    engines = [
        name
        for name, modules in ENGINE_MODULES.items()
        if all(importlib.util.find_spec(module) is not None for module in modules)
    ]
    if settings.engine.openai_base_url:
        engines.append("openai")
    return engines


def plan_checks(
    settings: BpoSettings,
    preparer: ModelPreparer,
    catalogue: ModelCatalogue,
    engines: Sequence[str] = (),
    models: Sequence[str] = (),
) -> Plan:
    """Every (engine, model) pair to try: the engines asked for (default: every installed one) with the models
    asked for (default: every catalogue model prepared for that engine). The openai engine is tried with the
    model its endpoint is configured to serve."""
    chosen = list(engines) or installed_engines(settings)
    unknown = [name for name in chosen if name not in ENGINE_NAMES]
    if unknown:
        raise ValueError(f"unknown engine {', '.join(unknown)}; choose from {', '.join(ENGINE_NAMES)}")
    specs: list[ModelSpec] = [catalogue.resolve(name) for name in models] if models else list(catalogue)
    checks: list[EngineCheck] = []
    skipped: list[tuple[str, str, str]] = []
    for engine in chosen:
        if engine == "openai":
            if not settings.engine.openai_base_url:
                skipped.append((engine, "-", "no endpoint configured (BPO_ENGINE__OPENAI_BASE_URL)"))
                continue
            checks.append(EngineCheck(engine, settings.engine.openai_model or settings.engine.model))
            continue
        kind = ENGINE_WEIGHTS[engine]
        for spec in specs:
            model = str(spec.local_path) if spec.local_path is not None else spec.name
            if preparer.is_prepared(spec, kind):
                checks.append(EngineCheck(engine, model))
            elif models:
                skipped.append((engine, model, f"not prepared for {engine}: `bpo models prepare {model} --for {kind}`"))
    return Plan(tuple(checks), tuple(skipped))


def run_check(check: EngineCheck, *, timeout_s: float, tokens: int, env: dict[str, str] | None = None) -> CheckResult:
    """Load and generate in a child process; its crash, error or hang becomes the result's cause and fix."""
    with tempfile.TemporaryDirectory(prefix="bpo-doctor-") as folder:
        result_path, log_path = Path(folder) / "result.json", Path(folder) / "child.log"
        command = [sys.executable, "-m", "bpo.doctor.probe", "--engine", check.engine, "--model", check.model,
                   "--tokens", str(tokens), "--result", str(result_path)]  # fmt: skip
        child_env = {**(env if env is not None else os.environ), "PYTHONFAULTHANDLER": "1"}
        started = time.perf_counter()
        timed_out = False
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env,
                start_new_session=True,
            )  # fmt: skip
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(process.pid, signal.SIGKILL)
                returncode = process.wait()
        seconds = time.perf_counter() - started
        tail = _tail(log_path)
        outcome = json.loads(result_path.read_text()) if result_path.exists() else None
    if outcome is not None and outcome.get("ok"):
        summary = (
            f"{outcome['completion_tokens']} tokens in {outcome['generate_s']:.2f}s (load {outcome['load_s']:.2f}s): "
            f"{outcome['text'].strip()[:40]!r}"
        )
        return CheckResult(check.engine, check.model, True, seconds, summary)
    cause, fix = diagnose(check, returncode, outcome, timed_out=timed_out, timeout_s=timeout_s)
    summary = _failure_summary(returncode, outcome, timed_out)
    return CheckResult(check.engine, check.model, False, seconds, summary, cause, fix, tail)


def _failure_summary(returncode: int, outcome: dict[str, str] | None, timed_out: bool) -> str:
    if timed_out:
        return "hung: killed after the timeout"
    if returncode < 0:
        return f"crashed with {signal.Signals(-returncode).name}"
    if outcome is not None:
        return f"{outcome.get('error_type', 'error')}: {outcome.get('error', '')}"[:300]
    return f"exited with status {returncode} without a result"


def diagnose(
    check: EngineCheck, returncode: int, outcome: dict[str, str] | None, *, timed_out: bool, timeout_s: float
) -> tuple[str, str]:
    """The likely cause of a failed check, and what fixes it."""
    if timed_out:
        return (
            f"no answer within {timeout_s:g}s: loading or generating hung",
            "give big models more time (--timeout), or read the child's log below",
        )
    if returncode < 0:
        name = signal.Signals(-returncode).name
        if name == "SIGKILL":
            return (
                "killed from outside, most likely by the kernel for lack of memory",
                "free memory or try a smaller model",
            )
        if check.engine == "llamacpp" and name in ("SIGSEGV", "SIGILL", "SIGBUS"):
            return llamacpp_crash_cause(name), PORTABLE_REBUILD
        return (
            f"the engine's native code crashed ({name}): usually a binary built for another CPU, or corrupt weights",
            f"reinstall the engine (`make install`) and re-prepare the model (`bpo models prepare {check.model}`)",
        )
    if outcome is None:
        return "the check exited without reporting (see the log below)", "run `bpo doctor -v` and read the log"
    error_type, error = outcome.get("error_type", ""), outcome.get("error", "")
    if error_type == "ModelIntegrityError":
        return error, f"re-assemble and verify the weights: `bpo models prepare {check.model}`"
    if error_type == "ModelNotFoundError":
        return error, f"prepare the model first: `bpo models prepare {check.model}` (or `make models`)"
    if check.engine == "llamacpp" and "Failed to load model" in error:
        local = Path(check.model).exists()
        return (
            "llama.cpp could not load the GGUF file: it is corrupt, truncated, or not a GGUF",
            "replace the file with a complete GGUF" if local else f"re-prepare it: `bpo models prepare {check.model}`",
        )
    if error_type in ("ImportError", "ModuleNotFoundError") or ("needs" in error and "pip install" in error):
        return error, "install the engines: `make install`"
    if check.engine == "openai":
        return error, "check BPO_ENGINE__OPENAI_BASE_URL, the key and that the server is up and serves this model"
    return f"{error_type}: {error}", "read the child's log below"


def llamacpp_crash_cause(signal_name: str) -> str:
    """Compare the instructions llama.cpp's CPU backend contains with what this CPU offers."""
    library = llamacpp_cpu_library()
    base = f"llama.cpp crashed with {signal_name}"
    if library is None:
        return f"{base}; its CPU backend library was not found to inspect"
    audit = instruction_audit(library)
    if audit is None:
        return f"{base}: most often a build for another CPU (objdump is not installed to inspect {library.name})"
    findings = instruction_set_findings(audit, cpu_flags(), library.name)
    if not findings:
        return f"{base}; {library.name} uses no AMX or AVX-512 this CPU lacks: suspect the weights or the build"
    return f"{base}: it was compiled for another CPU: " + "; ".join(findings)


def instruction_set_findings(audit: dict[str, int], flags: set[str], library: str) -> list[str]:
    """What a library uses that this CPU (by its /proc/cpuinfo flags) does not offer, or may not grant."""
    findings = []
    if audit["amx"]:
        offered = (
            "offers AMX (amx_tile) but the kernel may not grant its tile state"
            if "amx_tile" in flags
            else "does not offer AMX"
        )
        findings.append(f"{library} holds {audit['amx']} AMX tile instructions (ldtilecfg, ...); this CPU {offered}")
    if audit["avx512"] and "avx512f" not in flags:
        findings.append(f"{library} holds {audit['avx512']} AVX-512 instructions and this CPU has no AVX-512")
    return findings


def llamacpp_cpu_library() -> Path | None:
    """The CPU backend llama-cpp-python loads: from ``LLAMA_CPP_LIB_PATH`` when set (it honours that), else
    the one installed with it."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        folder = Path(override)
    else:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or spec.origin is None:
            return None
        folder = Path(spec.origin).parent / "lib"
    candidates = sorted(folder.glob("libggml-cpu*.so*"))
    return candidates[0] if candidates else None


def instruction_audit(library: Path, timeout_s: float = 300) -> dict[str, int] | None:
    """How many AMX and AVX-512 (zmm) instructions a shared library contains; None without objdump."""
    objdump = shutil.which("objdump")
    if objdump is None:
        return None
    counts = {"amx": 0, "avx512": 0}
    with subprocess.Popen([objdump, "-d", "--no-show-raw-insn", str(library)], stdout=subprocess.PIPE, text=True,
                          errors="replace") as process:  # fmt: skip
        assert process.stdout is not None
        deadline = time.monotonic() + timeout_s
        for line in process.stdout:
            instruction = line.split("\t", 1)[-1]
            if any(mnemonic in instruction for mnemonic in AMX_MNEMONICS):
                counts["amx"] += 1
            if "%zmm" in instruction:
                counts["avx512"] += 1
            if time.monotonic() > deadline:
                process.kill()
                break
    return counts


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def as_json(results: Sequence[CheckResult], plan: Plan) -> str:
    return json.dumps(
        {
            "results": [asdict(result) for result in results],
            "not_checked": [{"engine": e, "model": m, "why": why} for e, m, why in plan.not_checked],
            "ok": bool(results) and all(result.ok for result in results),
        },
        indent=2,
    )
