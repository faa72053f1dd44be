"""Quick-look generation with a base model, optionally with a trained adapter on top."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge.data.templates import render
from loraforge.errors import ModelError
from loraforge.models.manifest import read_manifest
from loraforge.models.sources import BaseModel, load_model, load_tokenizer, resolve_base_model


@dataclass
class ChatModel:
    model: Any
    tokenizer: Any
    base: BaseModel
    adapter: Path | None

    def chat(self, prompt: str, *, system: str | None = None, max_new_tokens: int = 128) -> str:
        """Greedy answer to one user turn, rendered with the model's chat template."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = render(self.tokenizer, messages, generation_prompt=True)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        return str(self.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)).strip()


def load_chat_model(
    model_cache: Path, *, adapter: str | Path | None = None, base_model: str | None = None
) -> ChatModel:
    """Load a base model (from ``base_model`` or the adapter's manifest) and the adapter, if any.

    Raises:
        ModelError: missing files, or an adapter trained on other base weights than these.
    """
    manifest = read_manifest(Path(adapter)) if adapter else None
    name = base_model or (manifest.base_model.name if manifest else None)
    if name is None:
        raise ModelError("give --adapter DIR or --base-model NAME_OR_DIR")
    base = resolve_base_model(name, model_cache)
    if manifest and manifest.base_model.sha256 != base.sha256:
        raise ModelError(
            f"adapter {adapter} was trained on {name} with sha256 {manifest.base_model.sha256[:12]}…, "
            f"but the installed weights hash to {base.sha256[:12]}…; install the original base model"
        )
    tokenizer = load_tokenizer(base)
    model: Any = load_model(base)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return ChatModel(model, tokenizer, base, Path(adapter) if adapter else None)
