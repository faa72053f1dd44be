"""Weights in ggml's block formats, as GGUF files store them, for the serving engine.

A weight row of K inputs is K/32 blocks of 32 values, each block one or two fp16 numbers and
small integer codes:

- **Q4_1** ``w = d·q + m`` with ``q`` in 0..15: 5 bits per weight. ``qs`` (N, K/2) uint8 holds
  byte ``j`` of a block as ``q[j] | q[j + 16] << 4``; ``d`` and ``m`` are (N, K/32) fp16.
- **Q8_0** ``w = d·q`` with ``q`` in -127..127: 8.5 bits per weight. ``qs`` (N, K) int8, ``d``
  (N, K/32) fp16.

A base model loaded from a GGUF file (the default one is Q4_1, with a Q8_0 embedding) holds
exactly these values once dequantized. ``exact_blocks`` quantizes a float32 weight the way ggml
does and keeps the result only if it dequantizes back to the very same floats: the engine then
serves the model it was trained on, bit for bit in its weights, from a fifth of the bytes.
The products themselves are in ``kernels/blocks_cpu.cpp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
KINDS = ("q4_1", "q8_0")  # tried in this order: the smaller format first


@dataclass(frozen=True, eq=False)
class Blocks:
    """One weight (N, K) in a block format (``mins`` only for Q4_1)."""

    kind: str
    qs: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        rows = int(self.qs.shape[0])
        return rows, int(self.scales.shape[1]) * BLOCK

    @property
    def nbytes(self) -> int:
        parts = [self.qs, self.scales] + ([self.mins] if self.mins is not None else [])
        return sum(p.numel() * p.element_size() for p in parts)


def quantize(weight: torch.Tensor, kind: str) -> Blocks:
    """``weight`` (N, K), K a multiple of 32, in ``kind`` blocks, rounded as ggml's reference
    quantizers round (``quantize_row_q4_1_ref``, ``quantize_row_q8_0_ref``).

    Raises:
        ValueError: an unknown kind, or a shape that blocks cannot hold.
    """
    if kind not in KINDS:
        raise ValueError(f"block format must be one of {', '.join(KINDS)}, got {kind!r}")
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"blocks hold (N, K) weights with K a multiple of {BLOCK}; this one is {tuple(weight.shape)}")
    rows, cols = weight.shape
    b = weight.detach().float().reshape(rows, cols // BLOCK, BLOCK)
    if kind == "q4_1":
        low, high = b.amin(-1), b.amax(-1)
        d = (high - low) / 15
        inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        q = ((b - low[..., None]) * inverse[..., None] + 0.5).floor().clamp(0, 15).to(torch.uint8)
        qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(rows, cols // 2).contiguous()
        return Blocks(kind, qs, d.half().contiguous(), low.half().contiguous())
    d = b.abs().amax(-1) / 127
    inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    scaled = b * inverse[..., None]
    whole = scaled.trunc()  # roundf: to the nearest integer, halves away from zero
    q = (whole + scaled.sign() * ((scaled - whole).abs() >= 0.5)).clamp(-127, 127)
    q = q.to(torch.int8).reshape(rows, cols)
    return Blocks(kind, q.contiguous(), d.half().contiguous(), None)


def dequantize(blocks: Blocks, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight (or only its ``rows``), computed as ggml and gguf-py compute it."""
    qs, scales, mins = blocks.qs, blocks.scales, blocks.mins
    if rows is not None:
        qs, scales = qs[rows], scales[rows]
        mins = mins[rows] if mins is not None else None
    n, nb = scales.shape
    d = scales.float()[..., None]
    if blocks.kind == "q4_1":
        assert mins is not None
        packed = qs.view(n, nb, BLOCK // 2)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()
        return (d * q + mins.float()[..., None]).reshape(n, nb * BLOCK)
    return (d * qs.view(n, nb, BLOCK).float()).reshape(n, nb * BLOCK)


def exact_blocks(weight: torch.Tensor) -> Blocks | None:
    """``weight`` in the smallest block format that gives back exactly its values, or ``None``."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % BLOCK:
        return None
    bits = weight.contiguous().view(torch.int32)  # bit for bit: -0.0 is not 0.0, a NaN never matches
    for kind in KINDS:
        blocks = quantize(weight, kind)
        if torch.equal(dequantize(blocks).view(torch.int32), bits):
            return blocks
    return None
