"""``bpo doctor`` on real engines and weights, and the llama.cpp build's portability.

A build that passes on one CPU crashed on another (AMX at ``ldtilecfg``): the build is checked by what it contains,
which any machine can do, and the doctor by breaking an engine on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bpo.doctor.checks import (
    PORTABLE_REBUILD,
    EngineCheck,
    instruction_audit,
    llamacpp_cpu_library,
    run_check,
)
from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bpo.cli.main", "doctor", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def test_the_llamacpp_build_holds_no_host_specific_instructions() -> None:
    """The CPU backend is compiled for AVX2/FMA/F16C: no AMX tile instruction and no AVX-512 (zmm) anywhere, so it
    runs on every x86-64 CPU from 2015 on, whatever CPU built it."""
    library = llamacpp_cpu_library()
    assert library is not None, "llama-cpp-python's CPU backend (libggml-cpu*.so) is not installed"
    audit = instruction_audit(library)
    assert audit is not None, "objdump (binutils) is needed to inspect the build"
    assert audit == {"amx": 0, "avx512": 0}, f"{library} was built for a specific CPU: {audit}"


def test_doctor_passes_the_default_engine(smollm2_gguf: Path) -> None:
    result = doctor("--engine", "llamacpp", "--model", MODEL, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    (check,) = report["results"]
    assert report["ok"] and check["ok"] and (check["engine"], check["model"]) == ("llamacpp", MODEL)
    assert check["summary"].startswith("4 tokens in")


def test_doctor_reports_a_corrupt_gguf_and_exits_non_zero(smollm2_gguf: Path, tmp_path: Path) -> None:
    broken = tmp_path / "truncated.gguf"
    with smollm2_gguf.open("rb") as source:
        broken.write_bytes(source.read(1_000_000))
    result = doctor("--engine", "llamacpp", "--model", str(broken))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stdout
    assert "cause: llama.cpp could not load the GGUF file: it is corrupt, truncated, or not a GGUF" in result.stdout
    assert "fix:   replace the file with a complete GGUF" in result.stdout
    assert "0 OK, 1 failed" in result.stdout


def test_a_crashing_engine_is_reported_never_propagated(smollm2_gguf: Path, tmp_path: Path) -> None:
    """The child dies of SIGSEGV in native code, as the AMX build did: the check reports it with a cause and the
    portable rebuild as the fix, and the caller lives on."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None, "a C compiler is a prerequisite of the project (README)"
    source = tmp_path / "crash.c"
    source.write_text("#include <signal.h>\n__attribute__((constructor)) static void crash(void) { raise(SIGSEGV); }\n")
    library = tmp_path / "libcrash.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60)
    env = {**os.environ, "LD_PRELOAD": str(library)}
    result = run_check(EngineCheck("llamacpp", MODEL), timeout_s=120, tokens=4, env=env)
    assert not result.ok
    assert result.summary == "crashed with SIGSEGV"
    assert result.cause.startswith("llama.cpp crashed with SIGSEGV")
    assert result.fix == PORTABLE_REBUILD
