"""A running row of the batch, the work that becomes rows, and the adapter segments rows form.

Rows that share an adapter sit side by side in the batch (a *segment*), so each LoRA delta runs on
a contiguous slice (see ``lora_batching.py``); the helpers here find the segments' edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraforge.serve.detokenize import TextStream
from loraforge.serve.generation import Generation, PromptEvent


@dataclass(eq=False)
class Row:
    gen: Generation
    index: int
    stream: TextStream
    position: int  # the position of ``last`` in the sequence
    last: int  # the newest token: fed at the next decode step
    generated: int = 0
    generator: torch.Generator | None = None
    # A prompt being prefilled in chunks: feed[fed:] follow ``last``. Each decode step feeds one of
    # them and each pass between steps a chunk, until the logits after the last one pick a token.
    feed: list[int] = field(default_factory=list)
    fed: int = 0
    prompt_open: bool = False  # its prompt is not all in the KV yet
    # Echo with logprobs: each prompt token's log-probability (and alternatives), as it is fed.
    scores: PromptEvent | None = None

    @property
    def pending(self) -> int:
        """Prompt tokens still to feed after ``last``."""
        return len(self.feed) - self.fed

    @property
    def key(self) -> str | None:
        return self.gen.request.adapter

    @property
    def tenant(self) -> str:
        return self.gen.request.tenant

    def resume_tokens(self) -> list[int]:
        """What a preempted row prefills to continue: its prompt and every token it generated.

        The logits at the last of them pick the row's next token, as a decode step would have.
        """
        return [*self.gen.request.prompt, *self.stream.ids]


# What one admission pass hands to the prefill: a new request, or a preempted row resuming.
Work = Generation | Row


def gen_of(work: Work) -> Generation:
    return work.gen if isinstance(work, Row) else work


def is_echo(work: Work) -> bool:
    return isinstance(work, Generation) and work.request.params.prompt_logprobs


def close_choice(gen: Generation) -> None:
    """One of ``gen``'s choices has ended; the last one to end closes its stream of events."""
    gen.open_choices -= 1
    if gen.open_choices == 0:
        gen.emit(None)


def segment_end(rows: list[Row], position: int) -> int:
    key = rows[position].key
    end = position
    while end < len(rows) and rows[end].key == key:
        end += 1
    return end


def segment_ends(rows: list[Row]) -> dict[str | None, int]:
    ends: dict[str | None, int] = {}
    for i, row in enumerate(rows):
        ends[row.key] = i + 1
    return ends


def segment_starts(rows: list[Row], *, after: int) -> list[int]:
    """Start positions of the segments that begin at or after ``after``."""
    return [i for i in range(after, len(rows)) if i == 0 or rows[i].key != rows[i - 1].key]
