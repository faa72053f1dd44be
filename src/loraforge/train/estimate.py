"""Pre-flight estimate and actual figures: tokens, FLOPs, time, peak memory and cost.

FLOPs follow the usual count for a frozen-base LoRA step: a forward pass costs 2·N per token
(N = parameters of the decoder's linear layers) and the backward pass another 2·N (gradients
with respect to activations only; the frozen weights get no gradient), so 4·N per token. The
output head (H × V) runs only at positions that have a target, adding 4·H·V per trained token.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from loraforge.data.templates import TokenizedExample


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def linear_params(model: nn.Module) -> tuple[int, int]:
    """(parameters of the decoder's linear layers, parameters of the output head)."""
    base: Any = model
    head = base.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    decoder = base.get_decoder()
    n = 0
    for name, module in decoder.named_modules():
        if isinstance(module, nn.Linear) and "lora_" not in name:
            n += module.weight.numel()
    return n, head_params


def step_flops(n_linear: int, n_head: int, tokens: int, trained_tokens: int) -> float:
    return 4.0 * n_linear * tokens + 4.0 * n_head * trained_tokens


@dataclass
class Figures:
    tokens: int
    trained_tokens: int
    flops: float
    seconds: float
    peak_rss_bytes: int
    price_per_hour: float

    @property
    def cost(self) -> float:
        return self.seconds / 3600 * self.price_per_hour

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def gflops_per_second(self) -> float:
        return self.flops / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            cost=round(self.cost, 6),
            tokens_per_second=round(self.tokens_per_second, 1),
            gflops_per_second=round(self.gflops_per_second, 2),
        )
        return d


def estimate_run(
    examples: list[TokenizedExample],
    *,
    steps: int,
    steps_per_epoch: int,
    n_linear: int,
    n_head: int,
    seconds_per_token: float,
    eval_tokens: float,
    extra_bytes: int,
    price_per_hour: float,
) -> Figures:
    """The pre-flight estimate of ``steps`` optimizer steps over ``examples`` (``steps_per_epoch`` a pass).

    Args:
        n_linear, n_head: :func:`linear_params` of the base model.
        seconds_per_token: measured on one real micro-batch (:func:`time_probe`).
        eval_tokens: evaluation work in training-token equivalents (a forward pass is a third of a step).
        extra_bytes: memory the run will add to this process's peak so far (LoRA gradients, Adam moments).
    """
    epoch_tokens = sum(len(t.input_ids) for t in examples)
    epoch_trained = sum(t.num_trained for t in examples)
    tokens_total = int(epoch_tokens * steps / steps_per_epoch)
    trained_total = int(epoch_trained * steps / steps_per_epoch)
    return Figures(
        tokens=tokens_total,
        trained_tokens=trained_total,
        flops=step_flops(n_linear, n_head, tokens_total, trained_total),
        seconds=seconds_per_token * (tokens_total + eval_tokens),
        peak_rss_bytes=peak_rss_bytes() + extra_bytes,
        price_per_hour=price_per_hour,
    )


def time_probe(run_once: Any, repeats: int = 2) -> float:
    """Seconds of the last of ``repeats`` calls (the first one warms up allocators and kernels)."""
    elapsed = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        run_once()
        elapsed = time.perf_counter() - start
    return elapsed


def matmul_peak_gflops(dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """Measured GEMM throughput of this machine for ``dtype`` (square matrices)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9
