"""Attention for packed rows: each example attends only to itself, at the cost of its own length.

transformers already keeps packed examples apart by building a block-diagonal causal mask from
position ids that restart at 0. With that mask, SDPA still computes a full ``T × T`` score matrix
per head and layer (and keeps it for the backward pass): for a 1,024-token row holding ten
100-token examples, ten times the work and memory that the examples need. Here each segment runs
its own causal SDPA, so the cost is ``Σ Lᵢ²`` instead of ``T²`` and no score matrix spans two
examples.

Registered under the name ``loraforge_packed``. A call without ``packed_segments`` (generation,
a batch with padding masks) falls back to transformers' SDPA with its mask, so the same model
object serves both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

ATTENTION_NAME = "loraforge_packed"
_registered = False


def segments_from_positions(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """``(B, T)`` position ids that restart at 0 → per row, the ``(start, end)`` of each example."""
    out: list[list[tuple[int, int]]] = []
    width = position_ids.shape[1]
    for row in position_ids.cpu():
        starts = (row == 0).nonzero().flatten().tolist()
        ends = [*starts[1:], width]
        out.append(list(zip(starts, ends, strict=True)))
    return out


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_segments: list[list[tuple[int, int]]] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Args: query ``(B, H, T, D)``; key, value ``(B, Hkv, T, D)``. Returns ``(B, T, H, D)``."""
    if packed_segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    rows = []
    # unbind/split rather than slicing: their backward is one stack/cat, where every slice would
    # allocate and zero a gradient of the full (B, H, T, D) size
    for q_row, k_row, v_row, segments in zip(
        query.unbind(0), key.unbind(0), value.unbind(0), packed_segments, strict=True
    ):
        lengths = [e - s for s, e in segments]
        parts = [
            F.scaled_dot_product_attention(
                q.unsqueeze(0),
                k.unsqueeze(0),
                v.unsqueeze(0),
                is_causal=True,
                scale=scaling,
                dropout_p=dropout if module.training else 0.0,
                enable_gqa=gqa,
            )
            for q, k, v in zip(
                torch.split(q_row, lengths, dim=1),
                torch.split(k_row, lengths, dim=1),
                torch.split(v_row, lengths, dim=1),
                strict=True,
            )
        ]
        rows.append(torch.cat(parts, dim=2))  # (1, H, T, D)
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Make ``loraforge_packed`` known to transformers (idempotent); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        _registered = True
    return ATTENTION_NAME
