"""The setup steps of the training recipe: the data, the model with LoRA, the optimizer and its schedule.

Each step takes the few values it needs from :class:`TrainConfig` and returns what the loop uses.
The run's fingerprint, kept in every checkpoint, says whether a checkpoint belongs to this run.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loraforge.data.formats import parse_columns
from loraforge.data.prepare import PreparedData, prepare_data
from loraforge.files import sha256_file
from loraforge.models.packed_attention import register_packed_attention
from loraforge.models.sources import BaseModel, load_model
from loraforge.train.config import TrainConfig
from loraforge.train.lora import add_lora

if TYPE_CHECKING:
    from peft import PeftModel

# Fields that do not change what is trained, so a checkpoint stays valid when they differ.
_NOT_IN_FINGERPRINT = (
    "resume",
    "threads",
    "output",
    "price_per_hour",
    "checkpoint_every",
    "keep_checkpoints",
    "manifest",
    "policy",
    "allow_unlicensed",
)


def prepare_training_data(config: TrainConfig, tokenizer: Any) -> PreparedData:
    """The run's data through :func:`loraforge.data.prepare.prepare_data`, as ``config`` says."""
    return prepare_data(
        config.data,
        config.validation,
        tokenizer,
        format=config.format,  # type: ignore[arg-type]  # checked by TrainConfig
        columns=parse_columns(config.columns),
        max_length=config.context_length or config.seq_len,
        overlong=config.overlong,  # type: ignore[arg-type]
        validation_split=config.validation_split,
        seed=config.seed,
        pii=config.pii,  # type: ignore[arg-type]
        dedupe=config.dedupe,
        threshold=config.near_duplicate_threshold,
        canaries=config.canaries,
        canary_repeats=config.canary_repeats,
        allow_secrets=config.allow_secrets,
        manifest=config.manifest,
        policy=config.policy,
        allow_unlicensed=config.allow_unlicensed,
    )


def dataset_records(config: TrainConfig) -> list[dict[str, Any]]:
    """``{"role", "path", "sha256"}`` of the training file and of the validation file, if any."""
    datasets = [{"role": "train", "path": str(Path(config.data).resolve()), "sha256": sha256_file(Path(config.data))}]
    if config.validation:
        p = Path(config.validation)
        datasets.append({"role": "validation", "path": str(p.resolve()), "sha256": sha256_file(p)})
    return datasets


def run_fingerprint(config: TrainConfig, base: BaseModel, hashes: list[str], processes: int) -> str:
    """16 hex digits over what decides the trained weights: config, base model, data and process count."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
    blob = json.dumps({"config": cfg, "base": base.sha256, "data": hashes, "processes": processes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lora_model(config: TrainConfig, base: BaseModel, dtype: torch.dtype) -> PeftModel:
    """The base model in ``dtype`` (packed attention, no KV cache) with fresh fp32 LoRA adapters."""
    model = load_model(base, dtype=dtype, attn_implementation=register_packed_attention())
    model.config.use_cache = False
    return add_lora(
        model,
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=config.target_modules,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
    )


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """The learning-rate factor after ``step`` optimizer steps: linear warmup from 0, then cosine decay
    to ``min_ratio`` at the last step."""

    def f(step: int) -> float:  # step = number of optimizer steps already taken
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def optimizer_and_scheduler(
    config: TrainConfig, trainable: list[torch.nn.Parameter], total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``trainable`` and its warmup-then-cosine schedule (:func:`lr_lambda`)."""
    warmup_steps = int(config.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup_steps, config.min_lr_ratio))
    return optimizer, scheduler
