"""Atomic training checkpoints, in safetensors and JSON only (never pickle).

A checkpoint is ``OUTPUT/checkpoints/step-000050/``:

    adapter_model.safetensors  adapter_config.json   the LoRA weights (a PEFT directory)
    optimizer.safetensors      optimizer.json        optimizer tensors / param groups and structure
    rng.safetensors            state.json            torch RNG / step, data position, python RNG,
                                                     scheduler, run fingerprint, metrics so far

It is written into ``.tmp-step-…`` and renamed into place, so a process killed mid-write leaves
only a temporary directory that :func:`latest_checkpoint` never picks up.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from loraforge.errors import CheckpointError
from loraforge.files import atomic_directory, remove_stale_temporaries

if TYPE_CHECKING:
    from peft import PeftModel

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]


@dataclass
class Progress:
    """What a run has done so far, kept in each checkpoint's ``state.json``: a resumed run continues its
    metrics, counts and warnings where the checkpoint left them."""

    records: list[dict[str, Any]] = field(default_factory=list)  # the lines of metrics.jsonl so far
    tokens_done: int = 0
    trained_done: int = 0  # tokens that have a target
    train_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def restored(cls, checkpoint: Checkpoint | None) -> Progress:
        """The progress saved in ``checkpoint`` (records up to its step), or a fresh one without it."""
        if checkpoint is None:
            return cls()
        state = checkpoint.state
        return cls(
            records=[r for r in state.get("records", []) if r["step"] <= checkpoint.step],
            tokens_done=int(state.get("tokens_done", 0)),
            trained_done=int(state.get("trained_done", 0)),
            train_seconds=float(state.get("train_seconds", 0.0)),
            warnings=list(state.get("warnings", [])),
        )

    def state(self, fingerprint: str) -> dict[str, Any]:
        """The ``state`` to pass to :func:`save_checkpoint`, with the run's ``fingerprint``."""
        return {
            "fingerprint": fingerprint,
            "records": self.records,
            "tokens_done": self.tokens_done,
            "trained_done": self.trained_done,
            "train_seconds": self.train_seconds,
            "warnings": self.warnings,
        }


def checkpoints_dir(output: Path) -> Path:
    return output / "checkpoints"


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    output: Path,
    step: int,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep``."""
    root = checkpoints_dir(output)
    remove_stale_temporaries(root)
    final = root / f"step-{step:06d}"
    with atomic_directory(final, replace=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tensors, meta = _optimizer_to_files(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        full_state = {
            **state,
            "step": step,
            "scheduler": scheduler.state_dict(),
            "python_rng": _jsonable(random.getstate()),
        }
        (tmp / "state.json").write_text(json.dumps(full_state, indent=1, default=str))
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def _rng_tensors() -> dict[str, torch.Tensor]:
    """CPU and (where present) every CUDA device's generator state, e.g. for LoRA dropout."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i:03d}"] = state
    return tensors


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def list_checkpoints(output: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = checkpoints_dir(output)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / "state.json").is_file():
                found.append(Checkpoint(child, int(m.group(1)), {}))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(output: Path) -> Checkpoint | None:
    found = list_checkpoints(output)
    if not found:
        return None
    ckpt = found[-1]
    ckpt.state = json.loads((ckpt.path / "state.json").read_text())
    return ckpt


def restore_checkpoint(
    ckpt: Checkpoint,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: str,
) -> None:
    """Load adapter, optimizer, scheduler and RNG state from ``ckpt`` into the live objects.

    Raises:
        CheckpointError: the checkpoint was written by a run with different data or settings.
    """
    from peft import set_peft_model_state_dict

    if ckpt.state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{ckpt.path} belongs to a run with different data or settings; resume with the same "
            "config, or start afresh in a new --output directory"
        )
    weights = load_file(str(ckpt.path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise CheckpointError(f"{ckpt.path}: adapter weights do not fit the model: {missing[:3]}")
    meta = json.loads((ckpt.path / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_from_files(load_file(str(ckpt.path / "optimizer.safetensors")), meta))
    scheduler.load_state_dict(ckpt.state["scheduler"])
    rng = load_file(str(ckpt.path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tupled(ckpt.state["python_rng"]))
