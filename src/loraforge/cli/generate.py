"""``loraforge generate``: one answer from a base model or an adapter, for a quick look."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraforge.cli.options import Home
from loraforge.cli.output import console
from loraforge.errors import ConfigError


def generate(
    prompt: Annotated[str, typer.Option(help="The user message.")],
    adapter: Annotated[Path | None, typer.Option(help="A trained adapter directory.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model (default: the adapter's).")] = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 128,
    home: Home = None,
) -> None:
    """Answer one prompt with a base model or an adapter (greedy), for a quick look."""
    from loraforge.home import model_cache_dir
    from loraforge.models.generate import load_chat_model
    from loraforge.models.sources import DEFAULT_BASE_MODEL

    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be > 0, got {max_new_tokens}")
    model = load_chat_model(
        model_cache_dir(home), adapter=adapter, base_model=base_model or (None if adapter else DEFAULT_BASE_MODEL)
    )
    console.print(model.chat(prompt, system=system, max_new_tokens=max_new_tokens), highlight=False)
