"""``loraforge export merged``: the adapter merged into its base model, as a Hugging Face directory
that ``transformers`` loads with no loraforge code (safetensors, config, generation config,
tokenizer and chat template), plus a ``manifest.json`` carrying the adapter's lineage.

The export checks itself before it is kept: the written directory is loaded back with plain
``AutoModelForCausalLM.from_pretrained`` and its logits on fixed chat prompts are compared with the
unmerged adapter's (base + LoRA, in fp32). Past the tolerance of the chosen dtype the export fails
and nothing is left at ``--out``: the directory is written under a temporary name and renamed only
when the check passes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge.errors import ConfigError, ModelError
from loraforge.export.check import ExportCheck, compare, export_record, logits, references
from loraforge.files import atomic_directory, sha256_file, write_text_atomic
from loraforge.models.generate import load_chat_model
from loraforge.models.manifest import read_manifest

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The largest difference of any logit, merged model against base + adapter in fp32, that an export
# of each dtype may show. fp32 differs only by the order of additions; fp16 and bf16 round every
# weight (relative steps of 2^-11 and 2^-8), which moved logits of SmolLM2-135M by up to 0.13 and
# 1.8 in measurements (docs/exports.md): the tolerances leave about twice that.
TOLERANCE = {"fp32": 1e-3, "fp16": 0.5, "bf16": 4.0}
KIND = "loraforge.merged_model"


@dataclass(frozen=True)
class MergedExport:
    out: Path
    dtype: str
    check: ExportCheck
    bytes: int


def export_merged(
    adapter: Path, out: Path, *, model_cache: Path, dtype: str = "fp32", replace: bool = False
) -> MergedExport:
    """Merge ``adapter`` into its base model and write it to ``out`` (see the module's docstring).

    Raises:
        ConfigError: an unknown dtype, or ``out`` exists (without ``replace``).
        ModelError: the adapter or its base model cannot be loaded (other base weights than those it
            was trained on included), or the written model disagrees with the adapter past the tolerance.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists() and not replace:
        raise ConfigError(f"{out} already exists; choose another --out or pass --replace")
    manifest = read_manifest(adapter)
    chat = load_chat_model(model_cache, adapter=adapter)  # refuses other base weights than the adapter's
    ref = references(chat.model, chat.tokenizer)  # base + adapter, unmerged, fp32; and the base alone
    merged: Any = chat.model.merge_and_unload()
    merged = merged.to(DTYPES[dtype])
    with atomic_directory(out, replace=replace) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        chat.tokenizer.save_pretrained(tmp)
        check = compare(logits(_load(tmp, dtype), ref.prompts), ref, TOLERANCE[dtype])
        if not check.passed:
            raise ModelError(check.problem("the merged model", dtype) + ". Try --dtype fp32")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        record = export_record(KIND, adapter, manifest, check, dtype=dtype, files=files)
        write_text_atomic(tmp / "manifest.json", json.dumps(record, indent=2))
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return MergedExport(out, dtype, check, size)


def _load(directory: Path, dtype: str) -> Any:
    """``directory`` as a user would load it: plain transformers, its stored dtype."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=DTYPES[dtype], use_safetensors=True, local_files_only=True
    )
