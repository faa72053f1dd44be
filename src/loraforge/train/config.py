"""The training configuration: one typed dataclass, parsed once at the edge (CLI or YAML).

Every default lives here. A YAML file may set any field; unknown keys are refused with the list of
known ones, and flags given on the command line override the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.configfile import read_config_file
from loraforge.data.dedup import NEAR_DUPLICATE_THRESHOLD
from loraforge.data.formats import FORMATS
from loraforge.errors import ConfigError
from loraforge.models.precision import PRECISIONS
from loraforge.models.sources import DEFAULT_BASE_MODEL

OVERLONG = ("truncate", "drop")


@dataclass
class TrainConfig:
    """What to train on, how, and where to write it. Field docs are the ``--help`` of the flags."""

    data: str = ""
    """Training dataset (JSONL, JSON or CSV)."""
    output: str = ""
    """Directory for the adapter, manifest, metrics, plot and checkpoints."""
    validation: str | None = None
    """Validation dataset; without it, ``validation_split`` of the training data is held out."""
    base_model: str = DEFAULT_BASE_MODEL
    """A packaged model name or a local Hugging Face model directory."""
    format: str = "auto"
    """Dataset format: auto, chat, alpaca, completion or csv."""
    columns: str | None = None
    """CSV column mapping, e.g. ``user=question,assistant=answer``."""
    manifest: str | None = None
    """Licence manifest (default: ``NAME.manifest.yaml`` beside the data)."""
    policy: str | None = None
    """Licence policy (default: loraforge's shipped policy)."""
    allow_unlicensed: bool = False
    """Train on data without a licence manifest (recorded in the adapter manifest)."""
    allow_secrets: bool = False
    """Train on secrets (API keys, tokens, private keys) found in the data as they are; without it they
    are replaced by placeholders even with ``pii: report``. Recorded, and flagged on the adapter."""
    pii: str = "report"
    """Personal data: report it, redact it (typed placeholders) or drop the examples; secrets are redacted
    under report too (see ``allow_secrets``)."""
    dedupe: str = "none"
    """Remove duplicates before training: none, exact, or near (MinHash, see near_duplicate_threshold)."""
    near_duplicate_threshold: float = NEAR_DUPLICATE_THRESHOLD
    """Estimated Jaccard similarity from which two examples count as near duplicates."""
    canaries: int = 0
    """Plant N random canary secrets in the training data, to measure memorization."""
    canary_repeats: int = 1
    """How many times each canary appears."""

    max_steps: int | None = None
    """Optimizer steps to run; overrides ``epochs``."""
    epochs: float | None = None
    """Passes over the training data; default: the suggestion of ``loraforge data check``."""
    learning_rate: float = 1e-3
    """Peak learning rate (after warmup; then cosine decay to ``min_lr_ratio`` of it)."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay, as a share of the peak learning rate."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent warming up linearly from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables it."""
    batch_rows: int = 1
    """Packed rows per micro-batch."""
    seq_len: int = 1024
    """Tokens per packed row."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    context_length: int | None = None
    """Longest example in tokens (default: ``seq_len``); longer ones are handled as ``overlong`` says."""
    overlong: str = "truncate"
    """truncate or drop examples longer than ``context_length``."""

    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32.0
    """LoRA alpha (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or ``all-linear`` (every linear projection except the output head)."""
    use_rslora: bool = False
    """Scale by alpha/sqrt(r) instead of alpha/r (rank-stabilised LoRA)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""

    validation_split: float = 0.1
    """Share of the training data held out when no validation file is given."""
    eval_every: int = 10
    """Validation loss every N steps (and at the end); 0: only at the end."""
    checkpoint_every: int = 25
    """Checkpoint every N steps; 0 disables checkpoints (and --resume)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in output (the newest ones)."""
    seed: int = 42
    """Random seed."""
    precision: str = "auto"
    """auto (bf16 where the hardware has fast bf16, else fp32), bf16 or fp32."""
    price_per_hour: float = 0.10
    """Price of this machine per hour, for the cost estimate (currency units)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in ``output``."""
    threads: int | None = None
    """CPU threads for PyTorch; default: PyTorch's choice."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.context_length is None:
            self.context_length = self.seq_len
        for name in ("data", "output", "validation"):
            value = getattr(self, name)
            if value:
                setattr(self, name, str(Path(value).expanduser()))
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        need(self.format in FORMATS, f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        need(
            self.precision in PRECISIONS,
            f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        need(self.overlong in OVERLONG, f"overlong must be truncate or drop, got {self.overlong!r}")
        need(self.max_steps is None or self.max_steps > 0, f"max_steps must be > 0, got {self.max_steps}")
        need(self.epochs is None or (0 < self.epochs < 10_000), f"epochs must be in (0, 10000), got {self.epochs}")
        need(self.pii in ("report", "redact", "drop"), f"pii must be report, redact or drop, got {self.pii!r}")
        need(self.dedupe in ("none", "exact", "near"), f"dedupe must be none, exact or near, got {self.dedupe!r}")
        need(
            0 < self.near_duplicate_threshold <= 1,
            f"near_duplicate_threshold must be in (0, 1], got {self.near_duplicate_threshold}",
        )
        need(0 <= self.canaries <= 900, f"canaries must be in [0, 900], got {self.canaries}")
        need(self.canary_repeats >= 1, f"canary_repeats must be >= 1, got {self.canary_repeats}")
        need(self.threads is None or self.threads > 0, f"threads must be > 0, got {self.threads}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        need(self.batch_rows > 0, f"batch_rows must be > 0, got {self.batch_rows}")
        need(self.grad_accum > 0, f"grad_accum must be > 0, got {self.grad_accum}")
        need(self.seq_len >= 16, f"seq_len must be >= 16, got {self.seq_len}")
        need(
            0 < self.context_length <= self.seq_len,
            f"context_length must be in [1, seq_len={self.seq_len}], got {self.context_length}",
        )
        need(self.lora_r > 0, f"lora_r must be > 0, got {self.lora_r}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(
            0 < self.validation_split < 0.5,
            f"validation_split must be in (0, 0.5), got {self.validation_split}",
        )
        need(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        need(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.price_per_hour >= 0, f"price_per_hour must be >= 0, got {self.price_per_hour}")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    def require_paths(self) -> None:
        if not self.data:
            raise ConfigError("no training data: pass --data PATH or set `data:` in the YAML config")
        if not self.output:
            raise ConfigError("no output directory: pass --output DIR or set `output:` in the YAML config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


KNOWN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Build a config from a YAML file (optional) and flag overrides (``None`` values are ignored).

    Raises:
        ConfigError: unreadable YAML (with its line), unknown keys (with close matches and the
            list of known keys), or invalid values.
    """
    values: dict[str, Any] = read_config_file(path, TrainConfig) if path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


__all__ = ["KNOWN_KEYS", "TrainConfig", "load_config"]
