"""How llama.cpp lays out a llama model in GGUF: its tensor names, the order of the query and key
rows, the block types a tensor is stored in, and reading weights and LoRA deltas back by Hugging
Face name. Shared by the GGUF writer (``gguf.py``) and its checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraforge.errors import ModelError
from loraforge.models.sources import GGUF_MAGIC


def open_gguf(path: Path) -> Any:
    """A ``GGUFReader`` of ``path``, or a ModelError that names the file (the reader's own errors
    are numpy's, about array views)."""
    from gguf import GGUFReader

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        return GGUFReader(str(path))
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from e
    except (ValueError, KeyError, IndexError) as e:
        raise ModelError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def name_map(config: Any) -> Any:
    from gguf import MODEL_ARCH, get_tensor_name_map

    return get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)


def gguf_name(names: Any, hf_name: str) -> str:
    found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ModelError(f"no llama.cpp tensor corresponds to {hf_name}; this model cannot be written as GGUF")
    return str(found)


def heads(gguf_name: str, config: Any) -> int | None:
    """How many heads to interleave rotary halves over for this tensor, None when it is not Q or K."""
    if ".attn_q." in gguf_name:
        return int(config.num_attention_heads)
    if ".attn_k." in gguf_name:
        return int(config.num_key_value_heads or config.num_attention_heads)
    return None


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout of Q/K output rows: within each head, the two rotary halves interleaved."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def encode(data: np.ndarray, type: str) -> tuple[np.ndarray, Any]:
    """``data`` (fp32) in the export's type: 1-D tensors stay f32 (as llama.cpp's converter keeps them);
    a matrix whose rows do not split into the type's blocks falls back to f16 (llama.cpp does the same)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    if data.ndim == 1 or type == "f32":
        return data.astype(np.float32), None
    if type == "f16":
        return data.astype(np.float16), None
    qtype = {"q8_0": GGMLQuantizationType.Q8_0, "q4_1": GGMLQuantizationType.Q4_1}[type]
    if data.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return data.astype(np.float16), None
    return quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype), qtype


def read_adapter_gguf(path: Path, config: Any) -> dict[str, torch.Tensor]:
    """The weight deltas a GGUF LoRA adapter applies, by Hugging Face parameter name (as llama.cpp
    applies them: ``alpha / rank × B @ A``, or ``B @ A`` when the file's alpha is 0)."""
    from gguf import Keys, quants

    reader = open_gguf(path)
    alpha = float(field(reader, Keys.Adapter.LORA_ALPHA) or 0.0)
    to_hf = hf_names_of(config)
    tensors = {t.name: t for t in reader.tensors}
    deltas = {}
    for name, tensor in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        stem = name.removesuffix(".lora_a")
        other = tensors[f"{stem}.lora_b"]
        a = quants.dequantize(tensor.data, tensor.tensor_type).reshape([int(d) for d in reversed(tensor.shape)])
        b = quants.dequantize(other.data, other.tensor_type).reshape([int(d) for d in reversed(other.shape)])
        if (n_heads := heads(stem, config)) is not None:
            b = unpermute(b, n_heads)
        scale = alpha / a.shape[0] if alpha else 1.0
        deltas[to_hf[stem]] = torch.from_numpy(np.array(b @ a * scale, dtype=np.float32))
    return deltas


def hf_names_of(config: Any) -> dict[str, str]:
    """llama.cpp tensor name → Hugging Face parameter name, for every weight of a llama model."""
    names = name_map(config)
    hf_names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(config.num_hidden_layers):
        for module in (
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            hf_names.append(f"model.layers.{i}.{module}.weight")
    return {gguf_name(names, hf_name): hf_name for hf_name in hf_names}


def read_model_gguf(reader: Any, config: Any) -> dict[str, torch.Tensor]:
    """The weights of a llama GGUF model by Hugging Face parameter name, dequantized to fp32 and
    with Q/K rows back in Hugging Face's order (what transformers' GGUF reader gives, without
    parsing the file's metadata a second time)."""
    from gguf import quants

    to_hf = hf_names_of(config)
    weights = {}
    for tensor in reader.tensors:
        if tensor.name not in to_hf:
            continue
        data = quants.dequantize(tensor.data, tensor.tensor_type).reshape([int(d) for d in reversed(tensor.shape)])
        if (n_heads := heads(tensor.name, config)) is not None:
            data = unpermute(data, n_heads)
        weights[to_hf[tensor.name]] = torch.from_numpy(np.array(data, dtype=np.float32))
    return weights
