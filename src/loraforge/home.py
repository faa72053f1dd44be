"""Where an installation keeps its state: ``LORAFORGE_HOME`` (default ``~/.loraforge``)."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_home(home: str | Path | None = None) -> Path:
    """Return the home directory: the argument, else ``$LORAFORGE_HOME``, else ``~/.loraforge``."""
    if home is not None:
        return Path(home).expanduser().resolve()
    env = os.environ.get("LORAFORGE_HOME")
    return Path(env).expanduser().resolve() if env else Path.home() / ".loraforge"


def model_cache_dir(home: str | Path | None = None) -> Path:
    """Directory of dequantized base models.

    ``$LORAFORGE_MODEL_CACHE`` overrides ``HOME/models`` so that many homes (tests, demos) can
    share one cache: dequantizing a GGUF takes ~20 s and gives the same files every time.
    """
    env = os.environ.get("LORAFORGE_MODEL_CACHE")
    return Path(env).expanduser().resolve() if env else resolve_home(home) / "models"
