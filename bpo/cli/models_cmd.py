"""``bpo models list`` and ``bpo models prepare NAME``."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from bpo.models.catalogue import ModelCatalogue, SourceKind
from bpo.models.prepare import ModelPreparer
from bpo.settings import BpoSettings

app = typer.Typer(help="The model catalogue: list models and prepare their weights.", no_args_is_help=True)


@app.command("list")
def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the named models, their source, licence and prompt style."""
    catalogue = ModelCatalogue()
    rows = [
        {
            "name": spec.name,
            "source": spec.source.value,
            "prompt_style": spec.prompt_style.value,
            "licence": spec.licence,
            "sha256": spec.sha256,
            "packages": [f.requirement for f in spec.files][:1] + (["..."] if len(spec.files) > 1 else []),
            "hub_id": spec.hub_id,
            "description": spec.description,
        }
        for spec in catalogue
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(f"{row['name']:<30} {row['source']:<15} {row['prompt_style']:<17} {row['description']}")


@app.command("prepare")
def prepare(
    name: Annotated[str, typer.Argument(help="A catalogue name, a local path, or a hub id.")],
    target: Annotated[
        str, typer.Option("--for", help="What to prepare: gguf (llamacpp), hf (vllm, transformers) or all.")
    ] = "all",
) -> None:
    """Assemble, verify (sha256) and convert a model once; later calls return at once from the cache."""
    settings = BpoSettings()
    spec = ModelCatalogue().resolve(name)
    preparer = ModelPreparer(settings.models_dir)
    started = time.perf_counter()
    if target in ("gguf", "all") and spec.is_gguf:
        typer.echo(f"gguf: {preparer.gguf_path(spec)}")
    if target in ("hf", "all"):
        if spec.source == SourceKind.HUB:
            typer.echo(f"hf: {spec.hub_id} (loaded from the hub by the engine)")
        else:
            typer.echo(f"hf: {preparer.hf_folder(spec)}")
    identity = preparer.identity(spec)
    typer.echo(f"{identity.name} version {identity.version} ready in {time.perf_counter() - started:.1f}s")
