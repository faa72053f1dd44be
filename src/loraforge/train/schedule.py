"""Which packed rows each optimizer step trains on: a deterministic schedule, so a data position is a step.

The training examples are packed once into rows of ``seq_len`` tokens; each epoch shuffles the order
of the rows (seeded by ``seed + epoch``) and deals them out to the processes. Every epoch has the
same number of micro-batches, so step ``s`` always sees the same rows and a resumed run continues
exactly where the killed one stopped.
"""

from __future__ import annotations

import math
import random

from loraforge.data.packing import PackedBatch, PackedRow, collate_rows, pack_examples
from loraforge.data.templates import TokenizedExample


class Schedule:
    """The micro-batches of every optimizer step of a run, for one process (``rank`` of ``world``).

    Args:
        examples: the tokenized training examples.
        seq_len: tokens per packed row; batch_rows: rows per micro-batch; grad_accum: micro-batches
            per optimizer step.
        seed: packing and per-epoch shuffles; rank, world: this process and the number of processes.
        pad_id: the tokenizer's padding id.
        epochs: passes over the data, used when ``max_steps`` is None.
    """

    def __init__(
        self,
        examples: list[TokenizedExample],
        *,
        seq_len: int,
        batch_rows: int,
        grad_accum: int,
        seed: int,
        rank: int,
        world: int,
        pad_id: int,
        epochs: float,
        max_steps: int | None,
    ) -> None:
        self.batch_rows, self.grad_accum, self.seed = batch_rows, grad_accum, seed
        self.rank, self.world, self.pad_id = rank, world, pad_id
        # Pack once, then shuffle the order of rows per epoch: every epoch has the same number of
        # micro-batches, so a data position is just a step number (and resume is exact).
        self.rows = pack_examples(examples, seq_len, shuffle_seed=seed)
        self.per_rank = max(1, len(self.rows) // (batch_rows * world)) * batch_rows
        self.epoch_cache: dict[int, list[list[PackedRow]]] = {}
        self.steps_per_epoch = math.ceil(len(self.micro_batches(0)) / grad_accum)
        self.total_steps = max_steps or max(1, math.ceil(epochs * self.steps_per_epoch))

    def micro_batches(self, epoch: int) -> list[list[PackedRow]]:
        """This process's micro-batches (lists of ``batch_rows`` rows) of ``epoch``, in order."""
        if epoch not in self.epoch_cache:
            self.epoch_cache.clear()
            order = list(range(len(self.rows)))
            random.Random(self.seed + epoch).shuffle(order)
            # every rank gets the same number of rows (a few rows sit out an epoch when they don't divide)
            mine = [self.rows[i] for i in order[self.rank :: self.world]][: self.per_rank] or [self.rows[order[0]]]
            size = self.batch_rows
            self.epoch_cache[epoch] = [mine[i : i + size] for i in range(0, len(mine), size)]
        return self.epoch_cache[epoch]

    def step_batches(self, step: int) -> list[PackedBatch]:
        """The ``grad_accum`` collated micro-batches of optimizer step ``step`` (0-based)."""
        groups = self.micro_batches(step // self.steps_per_epoch)
        i = (step % self.steps_per_epoch) * self.grad_accum
        return [collate_rows(g, self.pad_id) for g in groups[i : i + self.grad_accum]]


def validation_batches(
    examples: list[TokenizedExample], seq_len: int, batch_rows: int, pad_id: int
) -> list[PackedBatch]:
    """The validation examples packed (in their order) and collated ``batch_rows`` rows at a time."""
    rows = pack_examples(examples, seq_len)
    return [collate_rows(rows[i : i + batch_rows], pad_id) for i in range(0, len(rows), batch_rows)]
