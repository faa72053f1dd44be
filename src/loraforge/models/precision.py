"""The precision policy: which dtype the frozen base weights are stored in, for training and serving.

Where the hardware has fast bf16 the frozen base is *stored* in bf16 (no re-cast per use, half the
memory) while LoRA weights and the optimizer state stay in fp32; elsewhere everything is fp32.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def fast_bf16_available(device: torch.device) -> bool:
    """True where bf16 matmuls are faster than fp32: CUDA with bf16, or a CPU with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = torch.cpu
        amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        return bool(amx or avx512_bf16)
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the frozen base is stored in: ``auto`` picks bf16 only where it is fast."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if fast_bf16_available(device) else torch.float32
