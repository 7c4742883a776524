from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from pathlib import Path

import pytest

from bpo.errors import ModelIntegrityError, ModelNotFoundError
from bpo.models.catalogue import (
    BUILTIN_MODELS,
    ModelCatalogue,
    ModelSpec,
    PackageFile,
    PromptStyle,
    SourceKind,
)
from bpo.models.prepare import MARKER_NAME, ModelPreparer

pytestmark = pytest.mark.unit

# -- catalogue -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),
        ("SmolLM2", "smollm2-135m-instruct"),
        ("qwen-0.5b", "qwen2.5-coder-0.5b-instruct"),
        ("QWEN-1.5B", "qwen2.5-coder-1.5b-instruct"),
        ("THUDM/BPO", "bpo-llama2-7b"),
        ("bpo-llama2-7b", "bpo-llama2-7b"),
    ],
)
def test_catalogue_names_and_aliases(name: str, expected: str) -> None:
    assert ModelCatalogue().resolve(name).name == expected


def test_builtin_specs_are_consistent() -> None:
    bpo = ModelCatalogue().resolve("THUDM/BPO")
    assert bpo.source is SourceKind.HUB
    assert bpo.prompt_style is PromptStyle.BPO_TEMPLATE
    for spec in BUILTIN_MODELS:
        if spec.source is SourceKind.PACKAGED_PARTS:
            assert spec.sha256 is not None and len(spec.sha256) == 64
            paths = [f.relative_path for f in spec.files]
            assert paths == [f"data/part{i:02d}.bin" for i in range(1, len(paths) + 1)]
    assert [spec.name for spec in ModelCatalogue()] == [spec.name for spec in BUILTIN_MODELS]


def test_local_gguf_file(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    spec = ModelCatalogue().resolve(str(gguf))
    assert spec.source is SourceKind.LOCAL_PATH
    assert spec.name == "tiny"
    assert spec.local_path == gguf.resolve()
    assert spec.is_gguf
    assert spec.prompt_style is PromptStyle.CHAT_INSTRUCTION
    assert ModelCatalogue().resolve(str(gguf), prompt_style=PromptStyle.BPO_TEMPLATE).prompt_style is (
        PromptStyle.BPO_TEMPLATE
    )


def test_local_optimizer_outputs_are_recognised(tmp_path: Path) -> None:
    gguf = tmp_path / "trained.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "trained.bpo_optimizer.json").write_text("{}")
    assert ModelCatalogue().resolve(str(gguf)).prompt_style is PromptStyle.BPO_TEMPLATE
    folder = tmp_path / "run-7"
    folder.mkdir()
    (folder / "bpo_optimizer.json").write_text("{}")
    spec = ModelCatalogue().resolve(str(folder))
    assert spec.name == "run-7"
    assert spec.prompt_style is PromptStyle.BPO_TEMPLATE
    assert not spec.is_gguf


def test_hub_id() -> None:
    spec = ModelCatalogue().resolve("Qwen/Qwen2.5-7B-Instruct")
    assert spec.source is SourceKind.HUB
    assert spec.hub_id == "Qwen/Qwen2.5-7B-Instruct"
    assert spec.prompt_style is PromptStyle.CHAT_INSTRUCTION


@pytest.mark.parametrize("name", ["no-such-model", "./missing/model.gguf", "/nonexistent/dir/model", "~/nope/x"])
def test_unknown_model(name: str) -> None:
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        ModelCatalogue().resolve(name)


# -- preparer: packaged parts --------------------------------------------------------------------------

PARTS = [b"GGUF\x00head" * 50, b"\x01\x02middle-bytes" * 70, b"tail\xff" * 9]


def make_part_packages(root: Path, contents: list[bytes], *, skip: int | None = None) -> list[PackageFile]:
    """Create importable packages ``<prefix>N`` holding ``data/partNN.bin``, like the model part packages."""
    prefix = f"bpo_fake_part_{uuid.uuid4().hex[:8]}_"
    files = []
    for index, content in enumerate(contents, start=1):
        ref = PackageFile(f"{prefix}{index}".replace("_", "-"), "1.0", f"{prefix}{index}", f"data/part{index:02d}.bin")
        files.append(ref)
        if index == skip:
            continue
        write_package(root, ref, content)
    return files


def write_package(root: Path, ref: PackageFile, content: bytes) -> None:
    package = root / ref.import_name
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / ref.relative_path).write_bytes(content)


def parts_spec(files: list[PackageFile], sha256: str | None) -> ModelSpec:
    return ModelSpec(
        name="tiny-parts",
        description="test model",
        source=SourceKind.PACKAGED_PARTS,
        prompt_style=PromptStyle.CHAT_INSTRUCTION,
        licence="test",
        files=tuple(files),
        sha256=sha256,
    )


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def test_parts_are_joined_and_verified(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = make_part_packages(site, PARTS)
    joined = b"".join(PARTS)
    spec = parts_spec(files, hashlib.sha256(joined).hexdigest())
    preparer = ModelPreparer(tmp_path / "models", install_missing=None)

    path = preparer.gguf_path(spec)
    assert path == tmp_path / "models" / "tiny-parts" / "model.gguf"
    assert path.read_bytes() == joined
    marker = json.loads((path.parent / MARKER_NAME).read_text())
    assert marker["gguf_sha256"] == spec.sha256
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf", MARKER_NAME]
    assert preparer.identity(spec).version == hashlib.sha256(joined).hexdigest()[:12]

    def no_second_join(*args: object) -> None:
        raise AssertionError("the parts were joined and hashed again")

    monkeypatch.setattr(ModelPreparer, "_join_parts", no_second_join)
    monkeypatch.setattr("bpo.models.prepare.sha256_of", no_second_join)
    assert ModelPreparer(tmp_path / "models", install_missing=None).gguf_path(spec) == path


def test_changed_part_is_noticed(site: Path, tmp_path: Path) -> None:
    files = make_part_packages(site, PARTS)
    sha = hashlib.sha256(b"".join(PARTS)).hexdigest()
    spec = parts_spec(files, sha)
    preparer = ModelPreparer(tmp_path / "models", install_missing=None)
    path = preparer.gguf_path(spec)
    (site / files[1].import_name / files[1].relative_path).write_bytes(b"tampered, and a different size")
    with pytest.raises(ModelIntegrityError, match=f"expected {sha}"):
        preparer.gguf_path(spec)
    assert path.read_bytes() == b"".join(PARTS)  # the verified file is not replaced by a bad one


def test_wrong_sha_leaves_no_file(site: Path, tmp_path: Path) -> None:
    files = make_part_packages(site, PARTS)
    spec = parts_spec(files, "0" * 64)
    preparer = ModelPreparer(tmp_path / "models", install_missing=None)
    with pytest.raises(ModelIntegrityError, match="tiny-parts"):
        preparer.gguf_path(spec)
    folder = tmp_path / "models" / "tiny-parts"
    assert list(folder.iterdir()) == []


def test_missing_package_without_installer(site: Path, tmp_path: Path) -> None:
    files = make_part_packages(site, PARTS, skip=2)
    spec = parts_spec(files, None)
    preparer = ModelPreparer(tmp_path / "models", install_missing=None)
    with pytest.raises(ModelNotFoundError, match=rf"--no-deps\): {files[1].distribution}==1\.0$"):
        preparer.gguf_path(spec)


def test_missing_package_is_installed_by_the_installer(site: Path, tmp_path: Path) -> None:
    files = make_part_packages(site, PARTS, skip=3)
    spec = parts_spec(files, hashlib.sha256(b"".join(PARTS)).hexdigest())
    asked: list[list[str]] = []

    def install(requirements: list[str]) -> None:
        asked.append(requirements)
        write_package(site, files[2], PARTS[2])

    path = ModelPreparer(tmp_path / "models", install_missing=install).gguf_path(spec)
    assert asked == [[f"{files[2].distribution}==1.0"]]
    assert path.read_bytes() == b"".join(PARTS)


def test_installed_package_without_its_file(site: Path, tmp_path: Path) -> None:
    files = make_part_packages(site, PARTS)
    (site / files[0].import_name / files[0].relative_path).unlink()

    def install(requirements: list[str]) -> None:
        pass

    with pytest.raises(ModelNotFoundError, match=r"holds no data/part01\.bin"):
        ModelPreparer(tmp_path / "models", install_missing=install).gguf_path(parts_spec(files, None))


# -- preparer: other sources ---------------------------------------------------------------------------


def test_packaged_gguf_is_verified_in_place(site: Path, tmp_path: Path) -> None:
    (ref,) = make_part_packages(site, [b"GGUF single file"])
    good = ModelSpec(
        name="single",
        description="",
        source=SourceKind.PACKAGED_GGUF,
        prompt_style=PromptStyle.CHAT_INSTRUCTION,
        licence="test",
        files=(ref,),
        sha256=hashlib.sha256(b"GGUF single file").hexdigest(),
    )
    preparer = ModelPreparer(tmp_path / "models", install_missing=None)
    assert preparer.gguf_path(good) == site / ref.import_name / ref.relative_path
    bad = dataclasses.replace(good, name="single-bad", sha256="f" * 64)
    with pytest.raises(ModelIntegrityError, match="refusing to use it"):
        preparer.gguf_path(bad)


def test_local_and_hub_sources(tmp_path: Path) -> None:
    preparer = ModelPreparer(tmp_path / "models", install_missing=None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF local")
    local = ModelCatalogue().resolve(str(gguf))
    assert preparer.gguf_path(local) == gguf.resolve()
    assert preparer.identity(local).version == hashlib.sha256(b"GGUF local").hexdigest()[:12]
    folder = tmp_path / "hf-folder"
    folder.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf file"):
        preparer.gguf_path(ModelCatalogue().resolve(str(folder)))
    hub = ModelCatalogue().resolve("org/model")
    with pytest.raises(ModelNotFoundError, match="no GGUF weights"):
        preparer.gguf_path(hub)
    assert preparer.hf_folder(hub) == "org/model"
    assert preparer.identity(hub).version == "org/model"
