"""Padding-free packing: several tokenized examples share one fixed-length row.

Within a row, position ids restart at 0 for every example. transformers reads that restart as a
sequence boundary and builds a block-diagonal causal mask, so no token attends across examples
(``tests/data/test_packing.py`` checks that per-example losses match unpacked ones).

Targets are shifted here, per example: ``targets[t]`` is the label of token ``t + 1`` when that
token belongs to the same example, else ``IGNORE_INDEX``. The loss therefore never asks the last
token of one example to predict the first token of the next.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraforge.data.templates import IGNORE_INDEX, TokenizedExample

if TYPE_CHECKING:
    import torch


@dataclass
class PackedRow:
    input_ids: list[int]
    targets: list[int]  # already shifted: the token each position must predict, or IGNORE_INDEX
    position_ids: list[int]
    lengths: list[int]  # of the examples in the row, in order

    @property
    def num_targets(self) -> int:
        return sum(1 for t in self.targets if t != IGNORE_INDEX)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX where nothing is predicted
    position_ids: torch.Tensor  # (B, T) int64, restarting at 0 for every example and for the padding
    real: torch.Tensor  # (B, T) bool, False on padding

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.real.sum())


def collate_rows(rows: list[PackedRow], pad_id: int, length: int | None = None) -> PackedBatch:
    """Stack rows into tensors, padding each to ``length`` (default: the longest row).

    The padding forms a segment of its own (positions restart at 0) and predicts nothing.
    """
    import torch

    width = length or max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        ids[b, :n] = torch.tensor(row.input_ids)
        targets[b, :n] = torch.tensor(row.targets)
        positions[b, :n] = torch.tensor(row.position_ids)
        positions[b, n:] = torch.arange(width - n)
        real[b, :n] = True
    return PackedBatch(ids, targets, positions, real)


def shifted_targets(labels: list[int]) -> list[int]:
    """``labels[1:] + [IGNORE_INDEX]``: position t predicts token t + 1 of the same example."""
    return [*labels[1:], IGNORE_INDEX]


def pack_examples(
    examples: list[TokenizedExample], seq_len: int, *, shuffle_seed: int | None = None
) -> list[PackedRow]:
    """Pack examples into rows of at most ``seq_len`` tokens (best fit, no example split).

    Args:
        examples: tokenized examples, each at most ``seq_len`` tokens long.
        seq_len: row capacity in tokens.
        shuffle_seed: shuffle the examples with this seed before packing (None keeps the order).

    Returns:
        Rows in a deterministic order; every example appears exactly once.
    """
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    rows: list[PackedRow] = []
    free: list[int] = []  # remaining capacity of each row
    for i in order:
        ex = examples[i]
        n = len(ex.input_ids)
        if n > seq_len:
            raise ValueError(f"example of {n} tokens does not fit rows of {seq_len}; tokenize with that limit")
        # best fit: the fullest row that still has room; a new row when none has
        best = -1
        for r, room in enumerate(free):
            if room >= n and (best < 0 or room < free[best]):
                best = r
        if best < 0:
            rows.append(PackedRow([], [], [], []))
            free.append(seq_len)
            best = len(rows) - 1
        row = rows[best]
        row.input_ids.extend(ex.input_ids)
        row.targets.extend(shifted_targets(ex.labels))
        row.position_ids.extend(range(n))
        row.lengths.append(n)
        free[best] -= n
    return rows
