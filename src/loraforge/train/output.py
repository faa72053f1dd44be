"""The run's output directory: claimed before training, then the adapter files, then the manifest.

A directory holds one run. :func:`claim_output` refuses to train over a finished or started run unless
``--resume`` continues it; the adapter files are written atomically (:func:`save_adapter`) and the
manifest last (:func:`build_manifest`), so its presence marks a complete run.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from loraforge import __version__
from loraforge.data.drift import PROFILE_FILE, build_profile, prompt_texts
from loraforge.data.formats import Example
from loraforge.data.prepare import PreparedData
from loraforge.errors import CheckpointError, ConfigError
from loraforge.files import sha256_file
from loraforge.models.manifest import (
    FORMAT_VERSION,
    KIND,
    PEFT_FILES,
    AdapterManifest,
    BaseModelRecord,
    GovernanceFlag,
)
from loraforge.models.sources import BaseModel
from loraforge.train.checkpoint import Checkpoint, latest_checkpoint
from loraforge.train.config import TrainConfig
from loraforge.train.estimate import Figures


def claim_output(output: Path, resume: bool) -> Checkpoint | None:
    """Create ``output`` for a new run, or find the checkpoint to continue with ``resume``.

    Raises:
        ConfigError: ``output`` is a file or cannot be created.
        CheckpointError: ``output`` holds a finished run, or a started one without ``resume``, or
            ``resume`` finds no complete checkpoint.
    """
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; give a directory")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output directory {output}: {e.strerror}") from e
    checkpoint = None
    if resume and (output / "manifest.json").exists():
        raise CheckpointError(f"{output} holds a finished run (manifest.json); there is nothing to resume")
    if resume:
        checkpoint = latest_checkpoint(output)
        if checkpoint is None:
            raise CheckpointError(
                f"--resume: no complete checkpoint in {output / 'checkpoints'}; start without --resume"
            )
    elif (output / "manifest.json").exists() or (output / "checkpoints").exists():
        raise CheckpointError(
            f"{output} already holds a training run; pass --resume to continue it or choose a new --output"
        )
    return checkpoint


def save_adapter(peft_model: Any, output: Path) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``output`` atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter.", dir=output))
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            os.replace(tmp / name, output / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_manifest(
    *,
    config: TrainConfig,
    base: BaseModel,
    data: PreparedData,
    datasets: list[dict[str, Any]],
    dtype: torch.dtype,
    final_loss: float,
    val_loss: float | None,
    total_steps: int,
    steps_per_epoch: int,
    estimate: Figures,
    actual: Figures,
    started: float,
    train_seconds: float,
    warnings: list[str],
    output: Path,
    fingerprint: str,
) -> AdapterManifest:
    """The manifest of a finished run, with the checksums of the adapter files already in ``output``.

    Args:
        datasets: :func:`loraforge.train.setup.dataset_records`; started: ``time.time()`` at the start.
    """
    return AdapterManifest(
        kind=KIND,
        format_version=FORMAT_VERSION,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        base_model=BaseModelRecord(**base.to_json()),
        datasets=[
            {**d, **r.summary()} if r else d
            for d, r in zip(datasets, [data.train_report, data.validation_report], strict=False)
        ],
        split={
            "train_examples": len(data.train),
            "validation_examples": len(data.validation),
            "validation": "file"
            if config.validation
            else f"held out {config.validation_split:.0%} (seed {config.seed})",
        },
        licensing=data.licensing,
        data_governance=data.governance,
        governance_flags=[GovernanceFlag(**f) for f in data.flags],
        config=config.to_dict(),
        precision={
            "base": str(dtype).removeprefix("torch."),
            "adapter": "float32",
            "optimizer": "float32",
        },
        metrics={
            "final_train_loss": final_loss,
            "final_val_loss": val_loss,
            "steps": total_steps,
            "epochs": round(total_steps / steps_per_epoch, 3),
        },
        estimate=estimate.to_json(),
        actual=actual.to_json(),
        timings={
            "wall_seconds": round(time.time() - started, 2),
            "train_seconds": round(train_seconds, 2),
        },
        cost={"amount": round(actual.cost, 6), "price_per_hour": config.price_per_hour},
        libraries=library_versions(),
        machine={
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
        },
        warnings=warnings,
        files={
            "adapter": list(PEFT_FILES),
            "metrics": "metrics.jsonl",
            "loss_curve": "loss.png",
            **({"input_profile": PROFILE_FILE} if (output / PROFILE_FILE).is_file() else {}),
        },
        checksums={name: sha256_file(output / name) for name in PEFT_FILES},
        fingerprint=fingerprint,
    )


def save_input_profile(examples: list[Example], output: Path) -> str | None:
    """Write the input profile of the training prompts (``data.drift``) beside the adapter, so that
    the server can watch for prompts unlike them; returns a warning when there are too few."""
    prompts = [prompt_texts((m.role, m.content) for m in ex.messages) for ex in examples]
    try:
        build_profile(prompts).write(output)
    except ConfigError as e:
        return f"no input profile, so no input drift monitoring for this adapter: {e}"
    return None


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that decide the trained weights and their file format."""
    import accelerate
    import peft
    import safetensors
    import transformers

    return {
        "loraforge": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
    }
