"""The optimizer adapter shipped in ``bpo/resources/optimizer``: consistent with its manifests, with the paper's
template as the package has it now, and with a base the catalogue knows."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

import pytest

from bpo.models.catalogue import ModelCatalogue
from bpo.optimizer.prompting import bpo_inference_template

pytestmark = pytest.mark.unit

FOLDER = resources.files("bpo.resources").joinpath("optimizer")


def read(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FOLDER.joinpath(name).read_text(encoding="utf-8"))
    return data


def test_the_shipped_adapter_matches_its_manifests() -> None:
    manifest = read("bpo_optimizer.json")
    adapter = read("adapter_config.json")
    data = read("data_manifest.json")
    assert manifest["prompt_style"] == "bpo_template" and manifest["method"] == "lora"
    # Trained on the template the package ships: a changed template would make the adapter stale.
    assert manifest["template_sha256"] == hashlib.sha256(bpo_inference_template().encode()).hexdigest()
    assert ModelCatalogue().resolve(manifest["base_model"]).sha256 == manifest["adapter"]["base_gguf_sha256"]
    assert adapter["base_model_name_or_path"] == manifest["base_model"]
    assert manifest["data_manifest_hash"] == data["hash"]
    assert not set(data["train"]) & set(data["eval"])
    assert manifest["metrics"]["eval_loss_after"] < manifest["metrics"]["eval_loss_before"]
    weights = FOLDER.joinpath("adapter_model.safetensors").read_bytes()
    assert len(weights) < 20 * 1024 * 1024
