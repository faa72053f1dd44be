"""``loraforge export gguf``: an adapter for llama.cpp (and so for Ollama and every program built on
it), written with the ``gguf`` package.

Two shapes:

* **merged** (the default): the adapter merged into its base model, one GGUF file of the chosen type
  (``f32``, ``f16``, ``q8_0`` or ``q4_1``), with the base GGUF's tokenizer and chat template;
* **adapter-only** (``--adapter-only``): a GGUF LoRA adapter in llama.cpp's format (``general.type =
  adapter``, ``<tensor>.lora_a`` / ``.lora_b`` pairs, ``adapter.lora.alpha``), loaded with
  ``--lora`` beside the original base GGUF (for the default model, the packaged SmolLM2 file).

llama.cpp stores the query and key projections of Llama models with each head's rotary halves
interleaved (the permutation of llama.cpp's own converter); both shapes apply it, to the merged
weights and to the LoRA B matrices (a permutation of output rows commutes with ``B @ A``). PEFT
scales each LoRA layer by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA, per layer with rank or
alpha patterns); llama.cpp by ``alpha / rank`` with one alpha for the file. Where one alpha gives
every layer its PEFT scale the file says so; otherwise each layer's scale is folded into its B
matrix and the file's alpha is 0 (which llama.cpp reads as scale 1).

Each export checks itself before it is kept. The merged GGUF is loaded back by transformers' own
GGUF reader (``gguf_file=``); the adapter-only GGUF is read back tensor by tensor and applied to the
base GGUF as transformers loads it. Either way its logits on fixed chat prompts are compared with the
unmerged adapter's; past the tolerance of the type (printed) nothing is written. A manifest with the
adapter's lineage, the check and the file's sha256 is written beside the GGUF (``FILE.manifest.json``)
and the lineage is also inside the GGUF (``loraforge.lineage``), where llama.cpp ignores it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraforge.errors import ConfigError, ModelError
from loraforge.export.check import ExportCheck, References, compare, export_record, logits, references
from loraforge.export.llama_layout import (
    encode,
    field,
    gguf_name,
    heads,
    name_map,
    open_gguf,
    permute,
    read_adapter_gguf,
    read_model_gguf,
)
from loraforge.files import private_directory, sha256_file, write_text_atomic
from loraforge.models.generate import load_chat_model
from loraforge.models.manifest import AdapterManifest, read_manifest
from loraforge.models.sources import gguf_file_of

TYPES = ("f32", "f16", "q8_0", "q4_1")
ADAPTER_TYPES = ("f32", "f16")  # LoRA matrices are small; quantizing them only adds error
# The largest difference of any logit, export against base + adapter in fp32, that each type may
# show. f16 and q8_0 round each weight finely: on SmolLM2-135M with a trained adapter their logits
# moved by up to 0.033 and 1.32 (docs/exports.md); the tolerances leave about twice that. q4_1 rounds
# to 4 bits a weight, as coarse as the packaged base itself: its tolerance is loose, and what decides
# is the second criterion (check.MAX_RATIO_TO_BASE): on average the export must stay much closer to
# the adapter than to the base. A q4_1 export of an adapter whose changes are finer than 4-bit steps
# fails it (the measured trained adapter: 2.38 from the adapter against 1.65 from the base), and the
# export says so rather than ship the base model under the adapter's name.
TOLERANCE = {"f32": 1e-3, "f16": 0.5, "q8_0": 3.0, "q4_1": 12.0}
KIND = {"merged": "loraforge.gguf_model", "adapter": "loraforge.gguf_adapter"}
ARCHITECTURES = ("llama",)  # model_type values this writer maps to llama.cpp's tensors
LINEAGE_KEY = "loraforge.lineage"


@dataclass(frozen=True)
class GgufExport:
    out: Path
    shape: str  # "merged" or "adapter"
    type: str
    check: ExportCheck
    base_gguf: Path
    bytes: int
    alpha: float | None = None  # adapter-only: the file's adapter.lora.alpha (0: scales folded into B)

    @property
    def manifest_path(self) -> Path:
        return manifest_path(self.out)


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".manifest.json")


def export_gguf(
    adapter: Path,
    out: Path,
    *,
    model_cache: Path,
    type: str = "f16",
    adapter_only: bool = False,
    base_gguf: Path | None = None,
    replace: bool = False,
) -> GgufExport:
    """Write ``adapter`` as a GGUF file at ``out`` (see the module's docstring).

    Args:
        base_gguf: the GGUF of the adapter's base model; by default the file the base was loaded
            from (the packaged model's, or the ``.gguf`` path it was trained on). Needed for a base
            given as a Hugging Face directory: llama.cpp's ``convert_hf_to_gguf.py`` makes one.

    Raises:
        ConfigError: an unknown type, ``out`` exists (without ``replace``), or no base GGUF.
        ModelError: the adapter or base cannot be loaded, the base GGUF does not match the adapter's
            base, the model or adapter has features llama.cpp's format cannot hold, or the written
            file disagrees with the adapter past the tolerance.
    """
    allowed = ADAPTER_TYPES if adapter_only else TYPES
    if type not in allowed:
        shape = "an adapter-only GGUF" if adapter_only else "a merged GGUF"
        raise ConfigError(f"--type must be one of {', '.join(allowed)} for {shape}, got {type!r}")
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; --out is the GGUF file to write")
    if out.exists() and not replace:
        raise ConfigError(f"{out} already exists; choose another --out or pass --replace")
    manifest = read_manifest(adapter)
    base_file = _base_gguf(manifest, base_gguf)
    chat = load_chat_model(model_cache, adapter=adapter)  # refuses other base weights than the adapter's
    config = chat.model.get_base_model().config
    _check_architecture(config)
    base_reader = open_gguf(base_file)
    _check_base_gguf(base_reader, base_file, config)
    ref = references(chat.model, chat.tokenizer)
    shape = "adapter" if adapter_only else "merged"
    # inside the file only what identifies it (files are shared: no dataset paths or evidence); the
    # whole lineage is in the manifest beside it
    lineage = {
        "adapter_fingerprint": manifest.fingerprint,
        "adapter_checksums": manifest.checksums,
        "base_model_sha256": manifest.base_model.sha256,
    }
    with _staging(out) as tmp:
        written = tmp / out.name
        alpha: float | None = None
        if adapter_only:
            alpha = _write_adapter(written, chat.model, config, type, base_reader, lineage)
            got = _adapter_logits(written, chat.model.unload(), base_reader, config, ref)
        else:
            merged: Any = chat.model.merge_and_unload()
            write_model_gguf(written, merged.state_dict(), config, type, base_reader, lineage)
            del merged
            got = logits(_load_gguf(written), ref.prompts)
        check = compare(got, ref, TOLERANCE[type])
        what = "the adapter-only GGUF (on its base GGUF)" if adapter_only else "the merged GGUF"
        if not check.passed:
            advice = ". Try --type q8_0, or --adapter-only beside the 4-bit base" if type == "q4_1" else ""
            raise ModelError(check.problem(what, type) + advice)
        record = export_record(
            KIND[shape],
            adapter,
            manifest,
            check,
            type=type,
            file={"name": out.name, "sha256": sha256_file(written), "bytes": written.stat().st_size},
            base_gguf={"path": str(base_file), "sha256": manifest.base_model.sha256},
            lora_alpha=alpha,
        )
        write_text_atomic(tmp / manifest_path(out).name, json.dumps(record, indent=2))
    return GgufExport(out, shape, type, check, base_file, out.stat().st_size, alpha)


def _base_gguf(manifest: AdapterManifest, given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            raise ConfigError(f"--base-gguf {given} is not a file")
        return given.resolve()
    found = gguf_file_of(manifest.base_model.name)
    if found is None:
        raise ConfigError(
            f"the adapter's base model {manifest.base_model.name} is a Hugging Face directory, not a GGUF: "
            "llama.cpp needs the base's GGUF (its tokenizer, and the weights an adapter-only GGUF is loaded "
            "beside). Make one with llama.cpp's convert_hf_to_gguf.py and pass it as --base-gguf FILE"
        )
    return found


def _check_architecture(config: Any) -> None:
    if config.model_type not in ARCHITECTURES:
        raise ModelError(
            f"GGUF export writes {', '.join(ARCHITECTURES)} models; this base is {config.model_type!r}. "
            "Export it merged (`loraforge export merged`) and convert that directory with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(
            f"this base model uses {rope.get('rope_type')!r} rope scaling, which the GGUF writer does not map; "
            "export it merged and convert that directory with llama.cpp's convert_hf_to_gguf.py"
        )


def _check_base_gguf(reader: Any, path: Path, config: Any) -> None:
    """The base GGUF must be a model of this architecture and shape, with a tokenizer of this vocabulary."""
    arch = field(reader, "general.architecture")
    problems = []
    if arch != "llama":
        problems.append(f"its architecture is {arch!r}, not 'llama'")
    else:
        for key, want in (
            ("llama.block_count", config.num_hidden_layers),
            ("llama.embedding_length", config.hidden_size),
            ("llama.feed_forward_length", config.intermediate_size),
        ):
            got = field(reader, key)
            if got is not None and int(got) != want:
                problems.append(f"{key} is {got}, the adapter's base has {want}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        problems.append("it has no tokenizer (tokenizer.ggml.tokens)")
    elif len(tokens.data) != config.vocab_size:
        problems.append(f"its tokenizer has {len(tokens.data)} tokens, the model's vocabulary {config.vocab_size}")
    if problems:
        raise ModelError(f"{path} is not the GGUF of this adapter's base model: {'; '.join(problems)}")


# --- writing ------------------------------------------------------------------------------------


def _writer(path: Path, kind: str, base: Any, lineage: dict[str, Any]) -> Any:
    """A llama-architecture GGUF writer with the base GGUF's descriptive metadata, and for a model its
    tokenizer and chat template (an adapter has none: llama.cpp takes them from the base)."""
    from gguf import GGUFWriter

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its info lines (endianness, file list) are noise here
    writer = GGUFWriter(str(path), "llama")
    writer.add_type(kind)
    skip = {
        "general.architecture",
        "general.type",
        "general.file_type",
        "general.quantization_version",
        "general.alignment",  # the writer pads to its own alignment
    }
    copied = ("general.", "tokenizer.") if kind == "model" else ("general.",)
    for key, value in base.fields.items():
        if key in skip or not key.startswith(copied):
            continue
        sub_type = value.types[-1] if len(value.types) > 1 else None
        writer.add_key_value(key, value.contents(), value.types[0], sub_type=sub_type)
    writer.add_string(LINEAGE_KEY, json.dumps(lineage, sort_keys=True))
    return writer


def _model_parameters(writer: Any, config: Any, type: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.num_key_value_heads or heads))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config.vocab_size))
    file_type = {
        "f32": LlamaFileType.ALL_F32,
        "f16": LlamaFileType.MOSTLY_F16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
        "q4_1": LlamaFileType.MOSTLY_Q4_1,
    }[type]
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_model_gguf(
    path: Path, weights: dict[str, torch.Tensor], config: Any, type: str, base: Any, lineage: dict[str, Any]
) -> None:
    """Write a llama model's ``weights`` (Hugging Face names) as a GGUF of ``type``, with the tokenizer
    and descriptive metadata of ``base`` (a ``GGUFReader`` of a GGUF with the same vocabulary)."""
    names = name_map(config)
    writer = _writer(path, "model", base, lineage)
    _model_parameters(writer, config, type)
    for hf_name, tensor in weights.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the tied output projection from token_embd
        name = gguf_name(names, hf_name)
        data = tensor.detach().float().cpu().numpy()
        if (n_heads := heads(name, config)) is not None:
            data = permute(data, n_heads)
        encoded, raw_dtype = encode(data, type)
        writer.add_tensor(name, encoded, raw_dtype=raw_dtype)
    _finish(writer)


@dataclass(frozen=True)
class _LoraLayer:
    hf_name: str  # the base weight it adapts, e.g. model.layers.0.self_attn.q_proj.weight
    a: np.ndarray  # (r, in)
    b: np.ndarray  # (out, r)
    scale: float  # what PEFT multiplies B @ A by


def _lora_layers(peft_model: Any) -> list[_LoraLayer]:
    """Every LoRA layer of the loaded PEFT model, with PEFT's own scale (rsLoRA and patterns included)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, found in peft_model.named_modules():
        module: Any = found
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        where = name.removeprefix("base_model.model.")
        if module.use_dora.get("default"):
            raise ModelError(
                f"{where} is a DoRA layer: llama.cpp's LoRA format has no magnitude vector. Export it merged "
                "(`loraforge export gguf` without --adapter-only)"
            )
        if not isinstance(module, LoraLinear):
            raise ModelError(
                f"{where} is a LoRA {type(module).__name__} layer; llama.cpp's LoRA adapters are exported "
                "here for linear layers only. Export it merged (`loraforge export gguf` without --adapter-only)"
            )
        if getattr(module, "lora_bias", {}).get("default"):
            raise ModelError(f"{where} has a LoRA bias, which llama.cpp's LoRA format cannot hold; export it merged")
        if where == "lm_head" and getattr(peft_model.get_base_model().config, "tie_word_embeddings", False):
            raise ModelError(
                "the adapter adapts lm_head, which this base ties to its token embeddings: llama.cpp has no "
                "separate output tensor to apply it to. Export it merged (`export gguf` without --adapter-only)"
            )
        weight_a: Any = module.lora_A["default"].weight
        weight_b: Any = module.lora_B["default"].weight
        a = weight_a.detach().float().cpu().numpy()
        b = weight_b.detach().float().cpu().numpy()
        layers.append(_LoraLayer(f"{where}.weight", a, b, float(module.scaling["default"])))
    if not layers:
        raise ModelError("the adapter has no LoRA layers to export")
    saved = getattr(peft_model, "modules_to_save", None)
    if saved:
        raise ModelError(
            f"the adapter also trains whole modules ({', '.join(sorted(saved))}), which a llama.cpp LoRA "
            "adapter cannot carry; export it merged (`loraforge export gguf` without --adapter-only)"
        )
    return layers


def _common_alpha(layers: list[_LoraLayer]) -> float | None:
    """The one alpha with ``alpha / rank == scale`` for every layer, or None when there is none."""
    alphas = [layer.scale * layer.a.shape[0] for layer in layers]
    first = alphas[0]
    return first if all(math.isclose(a, first, rel_tol=1e-6) for a in alphas) else None


def _write_adapter(path: Path, peft_model: Any, config: Any, type: str, base: Any, lineage: dict[str, Any]) -> float:
    from gguf import Keys

    layers = _lora_layers(peft_model)
    names = name_map(config)
    alpha = _common_alpha(layers)
    writer = _writer(path, "adapter", base, lineage)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha if alpha is not None else 0.0)
    for layer in layers:
        name = gguf_name(names, layer.hf_name)
        b = layer.b if alpha is not None else layer.b * np.float32(layer.scale)
        if (n_heads := heads(name, config)) is not None:
            b = permute(b, n_heads)
        stem = name.removesuffix(".weight") + ".weight"
        writer.add_tensor(f"{stem}.lora_a", encode(layer.a, type)[0])
        writer.add_tensor(f"{stem}.lora_b", encode(np.ascontiguousarray(b), type)[0])
    _finish(writer)
    return alpha if alpha is not None else 0.0


# --- reading back -------------------------------------------------------------------------------


def _load_gguf(path: Path) -> Any:
    """A GGUF model as transformers' own GGUF reader loads it (dequantized to fp32)."""
    import warnings

    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
            )
        except Exception as e:  # the reader fails in many ways on files it cannot read
            raise ModelError(f"transformers cannot load the written GGUF {path.name}: {type(e).__name__}: {e}") from e


def _adapter_logits(
    written: Path, base_model: Any, base_reader: Any, config: Any, ref: References
) -> list[torch.Tensor]:
    """Logits of the base GGUF's weights with the written adapter applied, as llama.cpp would run them."""
    weights = read_model_gguf(base_reader, config)
    for name, delta in read_adapter_gguf(written, config).items():
        weights[name] = weights[name] + delta
    missing = {n for n, _ in base_model.named_parameters()} - set(weights) - {"lm_head.weight"}
    if missing:
        raise ModelError(f"the base GGUF lacks tensors for {', '.join(sorted(missing)[:3])}…")
    base_model.load_state_dict(weights, strict=False)
    if config.tie_word_embeddings:
        base_model.tie_weights()
    return logits(base_model, ref.prompts)


# --- files --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A private temporary directory beside ``out``; on success its manifest, then its GGUF, are
    renamed into place (the GGUF last, so that a GGUF at ``out`` is always a checked one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}.", dir=out.parent))
    private_directory(tmp)
    try:
        yield tmp
        for item in (tmp / manifest_path(out).name, tmp / out.name):
            with open(item, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(item, 0o600)
        os.replace(tmp / manifest_path(out).name, manifest_path(out))
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
