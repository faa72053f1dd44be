"""Files and fine-tuning jobs in OpenAI's shapes: what the official ``openai`` SDK sends and expects.

Requests are validated strictly: an unknown field or value is a 400 that names it (``param``).
loraforge's own settings (LoRA rank, evaluation suites, data governance) travel under one extra
key, ``loraforge``, which the SDK sends with ``extra_body={"loraforge": {...}}``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
FINAL: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")
SUITES = ("task", "regression", "bias", "truthfulness", "safety", "memorization")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(Strict):
    """OpenAI's supervised hyperparameters; each may be ``"auto"`` (loraforge's choice)."""

    n_epochs: Literal["auto"] | int = Field(default="auto")
    batch_size: Literal["auto"] | int = Field(default="auto")
    learning_rate_multiplier: Literal["auto"] | float = Field(default="auto")

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _positive_int(cls, value: Any) -> Any:
        if value != "auto" and not 1 <= value <= 1000:
            raise ValueError(f"must be 'auto' or an integer from 1 to 1000, got {value}")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _positive_float(cls, value: Any) -> Any:
        if value != "auto" and not 0 < value <= 100:
            raise ValueError(f"must be 'auto' or a number above 0 and at most 100, got {value}")
        return value


class SupervisedMethod(Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(Strict):
    type: Literal["supervised"]
    supervised: SupervisedMethod | None = None


class LoraSettings(Strict):
    """loraforge's extensions to a job (``extra_body={"loraforge": {...}}``)."""

    lora_r: int = Field(default=16, ge=1, le=256)
    lora_alpha: float = Field(default=32.0, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    pii: Literal["report", "redact", "drop"] = "redact"
    dedupe: Literal["none", "exact", "near"] = "exact"
    max_steps: int | None = Field(default=None, ge=1)
    evaluate: list[Literal["task", "regression", "bias", "truthfulness", "safety", "memorization"]] = []
    """Suites run against the base model when training succeeds; the gate's verdict is attached to the model."""


class JobCreate(Strict):
    model: str = Field(min_length=1, max_length=255)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None
    loraforge: LoraSettings = Field(default_factory=LoraSettings)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError(f"at most 16 keys, got {len(value)}")
        for k, v in value.items():
            if len(k) > 64 or len(v) > 512:
                raise ValueError(f"keys are at most 64 characters and values 512; {k[:70]!r} is not")
        return value

    @field_validator("integrations")
    @classmethod
    def _integrations(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("integrations (Weights & Biases) are not available on a self-hosted server")
        return value

    def resolved_hyperparameters(self) -> Hyperparameters:
        """``method.supervised.hyperparameters`` if given, else the (older) top-level ``hyperparameters``."""
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


def page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's list envelope."""
    return {
        "object": "list",
        "data": items,
        "has_more": has_more,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
    }
