"""How every export checks itself: logits of the exported model on fixed chat prompts, compared with
the unmerged adapter's (base + LoRA, fp32) and with the base model's.

Two criteria, both printed and recorded: the largest difference of any logit stays within the
format's tolerance, and on average the export is much closer to the adapter than to the base model
(so an export that lost the adapter, or whose rounding drowns what the adapter changes, fails even
where the format's tolerance is loose).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge.data.templates import render
from loraforge.models.manifest import AdapterManifest

CHECK_PROMPTS = (
    "What is your return policy?",
    "Explain in one sentence what a LoRA adapter is.",
    "Write a short greeting for a customer.",
)
# On average the export must be at most this far from the adapter, relative to its distance from
# the base model without the adapter.
MAX_RATIO_TO_BASE = 0.5


@dataclass(frozen=True)
class ExportCheck:
    """How an exported model compares with the unmerged adapter on :data:`CHECK_PROMPTS`."""

    max_abs_logit_diff: float
    tolerance: float
    top1_agreement: float  # share of positions where both rank the same token first
    positions: int
    mean_abs_logit_diff: float  # to the adapter
    mean_abs_diff_to_base: float  # to the base model without the adapter
    adapter_effect: float  # the mean difference between the base model's logits and the adapter's (fp32)
    max_ratio_to_base: float = MAX_RATIO_TO_BASE

    @property
    def passed(self) -> bool:
        return (
            self.max_abs_logit_diff <= self.tolerance
            and self.mean_abs_logit_diff <= self.max_ratio_to_base * self.mean_abs_diff_to_base
        )

    def problem(self, what: str, fmt: str) -> str:
        """Why the check failed, in one message (for the error that refuses the export)."""
        return (
            f"{what} differs from the adapter by up to {self.max_abs_logit_diff:.4g} in a logit "
            f"(tolerance {self.tolerance:g} for {fmt}) and by {self.mean_abs_logit_diff:.4g} on average, "
            f"against {self.mean_abs_diff_to_base:.4g} from the base model without the adapter (at most "
            f"{self.max_ratio_to_base:g}× that is allowed; the adapter moves the base by {self.adapter_effect:.4g}); "
            f"top-1 agreement {self.top1_agreement:.1%}. Nothing was written"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "prompts": list(CHECK_PROMPTS),
            "positions": self.positions,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "tolerance": self.tolerance,
            "mean_abs_logit_diff": self.mean_abs_logit_diff,
            "mean_abs_diff_to_base": self.mean_abs_diff_to_base,
            "max_ratio_to_base": self.max_ratio_to_base,
            "adapter_effect": self.adapter_effect,
            "top1_agreement": self.top1_agreement,
            "passed": self.passed,
        }


def prompt_ids(tokenizer: Any) -> list[torch.Tensor]:
    """:data:`CHECK_PROMPTS` as the base model's chat template renders them, tokenized."""
    return [
        tokenizer(
            render(tokenizer, [{"role": "user", "content": p}], generation_prompt=True),
            return_tensors="pt",
            add_special_tokens=False,
        )["input_ids"]
        for p in CHECK_PROMPTS
    ]


@torch.no_grad()
def logits(model: Any, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=ids).logits[0].float() for ids in prompts]


@dataclass(frozen=True)
class References:
    """The logits an export is compared with: the unmerged adapter's and the base model's."""

    prompts: list[torch.Tensor]
    adapter: list[torch.Tensor]
    base: list[torch.Tensor]


def references(peft_model: Any, tokenizer: Any) -> References:
    prompts = prompt_ids(tokenizer)
    adapter = logits(peft_model, prompts)
    with peft_model.disable_adapter():
        base = logits(peft_model, prompts)
    return References(prompts, adapter, base)


def _mean_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    total = sum(float((x - y).abs().sum()) for x, y in zip(a, b, strict=True))
    return total / sum(x.numel() for x in a)


def compare(
    got: list[torch.Tensor], ref: References, tolerance: float, max_ratio_to_base: float = MAX_RATIO_TO_BASE
) -> ExportCheck:
    diff = max(float((g - r).abs().max()) for g, r in zip(got, ref.adapter, strict=True))
    agree = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, ref.adapter, strict=True))
    positions = sum(r.shape[0] for r in ref.adapter)
    return ExportCheck(
        max_abs_logit_diff=round(diff, 6),
        tolerance=tolerance,
        top1_agreement=round(agree / positions, 4),
        positions=positions,
        mean_abs_logit_diff=round(_mean_abs(got, ref.adapter), 6),
        mean_abs_diff_to_base=round(_mean_abs(got, ref.base), 6),
        adapter_effect=round(_mean_abs(ref.base, ref.adapter), 6),
        max_ratio_to_base=max_ratio_to_base,
    )


def export_record(
    kind: str, adapter: Path, manifest: AdapterManifest, check: ExportCheck, **fields: Any
) -> dict[str, Any]:
    """The manifest of an export: what it is, the adapter it came from with its whole lineage and
    evaluation, the check, and the export's own ``fields`` (its format, files, …)."""
    return {
        "kind": kind,
        "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
        "adapter": {
            "path": str(adapter.resolve()),
            "checksums": manifest.checksums,
            "fingerprint": manifest.fingerprint,
            "config": {k: manifest.config.get(k) for k in ("lora_r", "lora_alpha", "target_modules")},
        },
        "lineage": manifest.lineage(),
        "evaluation": manifest.evaluation,
        "check": check.to_json(),
        "libraries": libraries(),
    }


def libraries() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "gguf"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
