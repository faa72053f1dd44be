"""What an adapter must be before the server trusts it: names, files, configs and weights checked.

Every file is read as a regular file (no link, FIFO or device) under a size limit; a config must
describe LoRA the engine runs (no DoRA, a rank under the limit, known targets); the weights'
tensors must have the shapes that config promises; and an adapter is published to every tenant
only with a passed data-governance record (or a recorded override).
"""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch

from loraforge.errors import ModelError
from loraforge.models.manifest import AdapterManifest
from loraforge.registry.schema import valid_name as valid_name  # the registry's name rule, used here too

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MAX_LORA_RANK = 64
MAX_ADAPTER_BYTES = 1 << 30  # one file of an adapter (a rank-64 adapter of an 8B model is ~0.7 GB)
EVIDENCE_FILES = (
    "loss.png",
    "metrics.jsonl",
    "input_profile.json",
)  # copied beside the adapter for a reviewer of the store
KEY_RE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def publication_problems(manifest: AdapterManifest) -> list[str]:
    """Why an adapter's data-governance record does not allow publishing it to every tenant.

    It passes when the licence check of its training data passed, personal data found in it was
    redacted or dropped (not only reported), and no governance exception was taken
    (``governance_flags``: unlicensed data allowed, secrets kept, a non-default policy, …).
    """
    problems = []
    licensing = manifest.licensing
    if not isinstance(licensing, dict):
        problems.append("its manifest has no licence record (it was not trained by `loraforge train`)")
    elif licensing.get("ok") is not True:
        problems.append("the licence check of its training data did not pass (trained with --allow-unlicensed)")
    pii = (manifest.data_governance or {}).get("pii")
    if not isinstance(pii, dict):
        problems.append("its manifest has no personal-data record")
    elif pii.get("action") not in ("redact", "drop") and pii.get("examples_with_pii"):
        problems.append(
            f"{pii.get('examples_with_pii')} training examples with personal data were trained on as they were "
            "(--pii report); retrain with --pii redact or --pii drop"
        )
    for flag in manifest.flags():
        if flag["flag"] != "allow_unlicensed" or (isinstance(licensing, dict) and licensing.get("ok") is True):
            problems.append(f"governance exception {flag['flag']}: {flag['detail']}")
    return problems


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path``, which must be a regular file (not a link, FIFO or device) of at most
    ``max_bytes``; checked on the opened file, so that it cannot be swapped between check and read.

    Raises:
        ModelError: what ``path`` is instead, or its size.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as e:
        raise ModelError(f"{path} is missing") from e
    except OSError as e:  # ELOOP: a symbolic link
        if path.is_symlink():
            raise ModelError(f"{path} is a symbolic link; copy the real file into the adapter directory") from e
        raise ModelError(f"{path} cannot be read: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ModelError(f"{path} is not a regular file (a FIFO, socket or device); an adapter holds files only")
        if info.st_size > max_bytes:
            raise ModelError(
                f"{path} is {_size(info.st_size)}, more than the limit of {_size(max_bytes)} for one adapter file "
                "(--max-size-mb)"
            )
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ModelError(f"{path} grew past {_size(max_bytes)} while it was read")
    return data


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def check_adapter_config(config: Any, where: str, *, max_rank: int = MAX_LORA_RANK) -> None:
    """Refuse an ``adapter_config.json`` the engine cannot or must not run.

    Raises:
        ModelError: not a LoRA config, a rank above ``max_rank``, a non-finite or non-positive
            ``lora_alpha``, or a LoRA variant the engine cannot run (DoRA, modules_to_save, alpha_pattern).
    """
    if not isinstance(config, dict):
        raise ModelError(f"{where}: adapter_config.json must be a JSON object")
    ranks = [config.get("r", 8), *dict(config.get("rank_pattern") or {}).values()]
    for r in ranks:
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ModelError(f"{where}: LoRA rank {r!r} is not a positive integer")
        if r > max_rank:
            raise ModelError(f"{where}: LoRA rank {r} is above this server's limit of {max_rank} (max_lora_rank)")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise ModelError(f"{where}: lora_alpha must be a finite positive number, got {alpha!r}")
    if config.get("use_dora"):
        raise ModelError(f"{where} is a DoRA adapter; the serving engine runs plain LoRA and rsLoRA only")
    if config.get("modules_to_save"):
        raise ModelError(f"{where} trains whole modules ({config['modules_to_save']}); the engine cannot serve it")
    if config.get("alpha_pattern"):
        raise ModelError(f"{where} uses alpha_pattern, which the serving engine does not support")


def check_adapter_weights(weights: bytes, where: str, *, max_rank: int = MAX_LORA_RANK) -> None:
    """Refuse weights that are not finite LoRA matrices of rank at most ``max_rank``.

    Raises:
        ModelError: unreadable safetensors, a tensor that is not a LoRA weight, a rank above the
            limit, or a value that is inf or nan.
    """
    from safetensors.torch import load

    try:
        tensors = load(weights)
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ModelError(f"{where}: {WEIGHTS} is not a readable safetensors file ({e})") from e
    for key, tensor in tensors.items():
        if tensor.dim() != 2 or ".lora_" not in key:
            raise ModelError(f"{where}: tensor {key!r} is not a LoRA weight matrix")
        rank = tensor.shape[0] if ".lora_A" in key else tensor.shape[1]
        if rank > max_rank:
            raise ModelError(f"{where}: {key} has rank {rank}, above this server's limit of {max_rank} (max_lora_rank)")
        if not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{where}: {key} holds values that are inf or nan; the adapter is damaged")
