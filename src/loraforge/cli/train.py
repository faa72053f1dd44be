"""``loraforge train``: its flags are the fields of ``TrainConfig`` (see :mod:`loraforge.cli.options`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraforge.cli.options import TRAIN_FLAGS, ConfigFlags, Home, config_flags
from loraforge.cli.output import console
from loraforge.errors import ConfigError


@config_flags(TRAIN_FLAGS)
def train(
    config: Annotated[Path | None, typer.Option(help="YAML file; any option below can be set in it.")] = None,
    *,
    flags: ConfigFlags,
    home: Home = None,
) -> None:
    """Train a LoRA adapter; writes a PEFT directory with manifest.json, metrics.jsonl and loss.png."""
    from loraforge.cli.train_progress import RichReporter
    from loraforge.home import model_cache_dir
    from loraforge.train import load_config
    from loraforge.train import train as run_training

    if "max_steps" in flags and "epochs" in flags:
        raise ConfigError("give either --max-steps or --epochs, not both")
    cfg = load_config(config, flags)
    if "max_steps" in flags:  # a flag beats the YAML, whichever of the two the YAML set
        cfg.epochs = None
    if "epochs" in flags:
        cfg.max_steps = None
    run_training(cfg, model_cache=model_cache_dir(home), reporter=RichReporter(console))
