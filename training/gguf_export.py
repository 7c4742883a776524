"""A GGUF of trained weights for the llamacpp engine, written with the ``gguf`` package.

llama.cpp's own ``convert_hf_to_gguf.py`` is not installed with llama-cpp-python or ``gguf`` (neither wheel ships
it), so this is a narrow converter for the one case the platform trains: a base model that itself came from a
GGUF (the packaged catalogue models). Everything but the weights is copied from that base GGUF: the tokenizer
(vocabulary, merges, special ids, pre-tokenizer), hyperparameters and chat template are exactly what llama.cpp
already runs for the base, so no tokenizer conversion has to be re-derived. The weights come from the trained
Hugging Face folder, renamed with ``gguf``'s tensor map and, for the LLaMA architecture, with the query and key
projections permuted back into llama.cpp's rotary layout (transformers un-permutes them when it loads a GGUF).

Other architectures, or a base without a GGUF, raise ``GgufUnavailableError`` with the reason; the training run
records it in the manifest instead of writing a file it cannot vouch for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bpo.errors import BpoError

log = logging.getLogger(__name__)

GgufType = Literal["q8_0", "f16"]
# Architectures whose tensor layout this converter knows; qwen2 uses NEOX rotary embeddings (no permutation).
PERMUTED_QK = {"llama": True, "qwen2": False}


class GgufUnavailableError(BpoError):
    status_code = "FAILED_PRECONDITION"


@dataclass(frozen=True, slots=True)
class GgufExport:
    path: Path
    tensor_type: GgufType
    architecture: str
    metadata_from: Path


def permute_for_llama_cpp(weights: np.ndarray[Any, Any], n_head: int) -> np.ndarray[Any, Any]:
    """HF's rotary layout (halves) to llama.cpp's (interleaved pairs), per head; the inverse of what transformers
    applies when it reads a llama GGUF."""
    rows = weights.shape[0]
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return field.contents() if field is not None else None


def export_gguf(
    hf_folder: Path,
    base_gguf: Path,
    output: Path,
    *,
    name: str,
    tensor_type: GgufType = "f16",
    extra_metadata: dict[str, str] | None = None,
) -> GgufExport:
    """Write ``output`` from the weights in ``hf_folder`` and the metadata of ``base_gguf``."""
    import gguf
    import torch
    from safetensors.torch import load_file

    reader = gguf.GGUFReader(base_gguf, "r")
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if arch not in PERMUTED_QK:
        raise GgufUnavailableError(
            f"no GGUF export for architecture {arch!r} (known: {', '.join(PERMUTED_QK)}); llama.cpp's "
            "convert_hf_to_gguf.py is not installed here"
        )
    n_blocks = int(_field(reader, f"{arch}.block_count"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv") or n_head)
    arch_enum = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    names = gguf.get_tensor_name_map(arch_enum, n_blocks)

    weights: dict[str, np.ndarray[Any, Any]] = {}
    shards = sorted(hf_folder.glob("*.safetensors"))
    if not shards:
        raise GgufUnavailableError(f"{hf_folder} holds no safetensors weights")
    for shard in shards:
        for hf_name, tensor in load_file(str(shard)).items():
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise GgufUnavailableError(f"no GGUF name for tensor {hf_name} of {arch}")
            # Through torch: numpy has no bfloat16, the dtype trained folders are often saved in.
            data = tensor.to(torch.float32).numpy()
            if PERMUTED_QK[arch] and gguf_name.endswith("attn_q.weight"):
                data = permute_for_llama_cpp(data, n_head)
            elif PERMUTED_QK[arch] and gguf_name.endswith("attn_k.weight"):
                data = permute_for_llama_cpp(data, n_head_kv)
            weights[gguf_name] = data

    expected = [tensor.name for tensor in reader.tensors]
    missing = [tensor_name for tensor_name in expected if tensor_name not in weights]
    # A tied output layer exists in HF checkpoints only as the embedding; the base GGUF then has no output.weight.
    unused = sorted(set(weights) - set(expected) - {"output.weight"})
    if missing or unused:
        raise GgufUnavailableError(
            f"the trained weights do not match the base GGUF's tensors (missing {missing[:5]}, extra {unused[:5]})"
        )

    qtype = gguf.GGMLQuantizationType.Q8_0 if tensor_type == "q8_0" else gguf.GGMLQuantizationType.F16
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if tensor_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(output.name + ".partial")
    writer = gguf.GGUFWriter(staging, arch)
    replaced = {
        gguf.Keys.General.NAME: name,
        gguf.Keys.General.FILE_TYPE: int(file_type),
        **(extra_metadata or {}),
    }
    for field in reader.fields.values():
        # The writer adds the architecture and the GGUF.* header fields itself.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name in replaced:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    for key, value in (extra_metadata or {}).items():
        writer.add_string(key, value)

    for tensor_name in expected:
        data = weights[tensor_name]
        # Norms and other vectors stay F32, as llama.cpp's converter keeps them; Q8_0 needs rows of 32.
        if data.ndim == 1:
            writer.add_tensor(tensor_name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 == 0:
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor_name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    staging.replace(output)
    log.info("wrote %s (%s, %d tensors)", output, tensor_type, len(expected))
    return GgufExport(output, tensor_type, arch, base_gguf)
