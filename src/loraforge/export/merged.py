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
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge.data.templates import render
from loraforge.errors import ConfigError, ModelError
from loraforge.files import atomic_directory, sha256_file, write_text_atomic
from loraforge.models.generate import load_chat_model
from loraforge.models.manifest import read_manifest

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The largest difference of any logit, merged model against base + adapter in fp32, that an export
# of each dtype may show. fp32 differs only by the order of additions; fp16 and bf16 round every
# weight (relative steps of 2^-11 and 2^-8), which moved logits of SmolLM2-135M by up to 0.13 and
# 1.8 in measurements (docs/exports.md): the tolerances leave about twice that.
TOLERANCE = {"fp32": 1e-3, "fp16": 0.5, "bf16": 4.0}
# And on average the export must be much closer to the adapter than to the base model: a merge that
# lost the adapter (or most of it) fails even where the dtype's tolerance is loose, and so does a
# dtype whose rounding drowns what the adapter changes.
MAX_RATIO_TO_BASE = 0.5
CHECK_PROMPTS = (
    "What is your return policy?",
    "Explain in one sentence what a LoRA adapter is.",
    "Write a short greeting for a customer.",
)
KIND = "loraforge.merged_model"


@dataclass(frozen=True)
class MergeCheck:
    """How the written model compares with the unmerged adapter on :data:`CHECK_PROMPTS`."""

    max_abs_logit_diff: float
    tolerance: float
    top1_agreement: float  # share of positions where both rank the same token first
    positions: int
    mean_abs_logit_diff: float  # to the adapter
    mean_abs_diff_to_base: float  # to the base model without the adapter
    adapter_effect: float  # the mean difference between the base model's logits and the adapter's (fp32)

    @property
    def passed(self) -> bool:
        return (
            self.max_abs_logit_diff <= self.tolerance
            and self.mean_abs_logit_diff <= MAX_RATIO_TO_BASE * self.mean_abs_diff_to_base
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "prompts": list(CHECK_PROMPTS),
            "positions": self.positions,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "tolerance": self.tolerance,
            "mean_abs_logit_diff": self.mean_abs_logit_diff,
            "mean_abs_diff_to_base": self.mean_abs_diff_to_base,
            "adapter_effect": self.adapter_effect,
            "top1_agreement": self.top1_agreement,
            "passed": self.passed,
        }


@dataclass(frozen=True)
class MergedExport:
    out: Path
    dtype: str
    check: MergeCheck
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
    prompts = [
        chat.tokenizer(
            render(chat.tokenizer, [{"role": "user", "content": p}], generation_prompt=True),
            return_tensors="pt",
            add_special_tokens=False,
        )["input_ids"]
        for p in CHECK_PROMPTS
    ]
    reference = _logits(chat.model, prompts)  # base + adapter, unmerged, fp32
    with chat.model.disable_adapter():
        base = _logits(chat.model, prompts)
    merged: Any = chat.model.merge_and_unload()
    merged = merged.to(DTYPES[dtype])
    with atomic_directory(out, replace=replace) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        chat.tokenizer.save_pretrained(tmp)
        check = _check(tmp, dtype, prompts, reference, base)
        if not check.passed:
            raise ModelError(
                f"the merged model differs from the adapter by up to {check.max_abs_logit_diff:.4g} in a logit "
                f"(tolerance {check.tolerance:g} for {dtype}) and by {check.mean_abs_logit_diff:.4g} on average, "
                f"against {check.mean_abs_diff_to_base:.4g} from the base model without the adapter (at most "
                f"{MAX_RATIO_TO_BASE:g}× that is allowed; the adapter moves the base by {check.adapter_effect:.4g}); "
                f"top-1 agreement {check.top1_agreement:.1%}. Nothing was written. Try --dtype fp32"
            )
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {
            "kind": KIND,
            "format_version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dtype": dtype,
            "adapter": {
                "path": str(adapter.resolve()),
                "checksums": manifest.checksums,
                "fingerprint": manifest.fingerprint,
                "config": {k: manifest.config.get(k) for k in ("lora_r", "lora_alpha", "target_modules")},
            },
            "lineage": manifest.lineage(),
            "evaluation": manifest.evaluation,
            "check": check.to_json(),
            "files": files,
            "libraries": _libraries(),
        }
        write_text_atomic(tmp / "manifest.json", json.dumps(record, indent=2))
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return MergedExport(out, dtype, check, size)


@torch.no_grad()
def _logits(model: Any, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=ids).logits[0].float() for ids in prompts]


def _mean_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    total = sum(float((x - y).abs().sum()) for x, y in zip(a, b, strict=True))
    return total / sum(x.numel() for x in a)


def _check(
    directory: Path, dtype: str, prompts: list[torch.Tensor], reference: list[torch.Tensor], base: list[torch.Tensor]
) -> MergeCheck:
    """Load ``directory`` as a user would (plain transformers, its stored dtype) and compare."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=DTYPES[dtype], use_safetensors=True, local_files_only=True
    )
    got = _logits(loaded, prompts)
    diff = max(float((g - r).abs().max()) for g, r in zip(got, reference, strict=True))
    agree = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, reference, strict=True))
    positions = sum(r.shape[0] for r in reference)
    return MergeCheck(
        max_abs_logit_diff=round(diff, 6),
        tolerance=TOLERANCE[dtype],
        top1_agreement=round(agree / positions, 4),
        positions=positions,
        mean_abs_logit_diff=round(_mean_abs(got, reference), 6),
        mean_abs_diff_to_base=round(_mean_abs(got, base), 6),
        adapter_effect=round(_mean_abs(base, reference), 6),
    )


def _libraries() -> dict[str, str]:
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
