"""Base models: where they come from, how they are cached, and how they are loaded."""

from loraforge.models.sources import (
    DEFAULT_BASE_MODEL,
    BaseModel,
    load_model,
    load_tokenizer,
    resolve_base_model,
)

__all__ = ["DEFAULT_BASE_MODEL", "BaseModel", "load_model", "load_tokenizer", "resolve_base_model"]
