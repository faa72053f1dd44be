"""What the server and the engine exchange: requests, their events, and the ``Engine`` protocol.

A request is queued as a :class:`Generation`; the engine's thread emits events into it and the
server's event loop reads them (``Outbox`` batches them through ``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from loraforge.serve.lora_batching import LoraLayers

log = logging.getLogger("loraforge.serve")


class EngineUnavailable(RuntimeError):
    """The engine thread has stopped (closed, or died of an error): nothing can be submitted."""


class EngineBusy(RuntimeError):
    """A tenant has too many requests waiting for a batch slot; ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class SamplingParams:
    """How to continue a prompt. ``temperature`` 0 is greedy decoding."""

    max_tokens: int
    min_tokens: int = 0  # end-of-turn tokens are masked until this many tokens are generated
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # alternatives per generated token; None = no logprobs
    prompt_logprobs: bool = False  # also score the prompt tokens (completions with echo)


@dataclass
class GenerationRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    adapter: str | None = None  # adapter name, for grouping and metrics
    lora: LoraLayers | None = None
    n: int = 1
    cache_scope: str | None = None  # whose cached prompt prefixes it may reuse (None: no reuse)
    tenant: str = ""  # whose fair share of the batch the request counts against


@dataclass
class TokenEvent:
    index: int
    token: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    index: int
    reason: str  # "stop" | "length"
    text: str  # text held back until now
    completion_tokens: int


@dataclass
class PromptEvent:
    """Log-probabilities of the prompt tokens (the first has none)."""

    tokens: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


@dataclass
class ErrorEvent:
    message: str
    status: int = 503


Event = TokenEvent | FinishEvent | PromptEvent | ErrorEvent


class EngineObserver(Protocol):
    def step(self, batch_size: int, queue_depth: int, seconds: float) -> None: ...


class Generation:
    """A submitted request: iterate its events; ``cancel()`` frees its batch slots."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, outbox: Outbox) -> None:
        self.request = request
        self.loop = loop
        self.outbox = outbox
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.cancelled = False
        self.submitted = time.monotonic()
        self.open_choices = request.n

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event: Event | None) -> None:
        """Queue an event; the engine delivers a step's events in one hop to the event loop."""
        self.outbox.add(self, event)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            if event is None:
                return
            yield event


class Outbox:
    """Events produced by the engine thread, delivered to each event loop once per step.

    One ``call_soon_threadsafe`` per step instead of one per token keeps the server's event loop
    from waking (and competing with PyTorch's threads for the cores) for every token of every row.
    """

    def __init__(self) -> None:
        self._items: list[tuple[Generation, Event | None]] = []

    def add(self, gen: Generation, event: Event | None) -> None:
        self._items.append((gen, event))

    def flush(self) -> None:
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, Event | None]]] = {}
        for gen, event in items:
            by_loop.setdefault(gen.loop, []).append((gen, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                log.debug("dropped %d events for a closed event loop", len(batch))


def _deliver(batch: list[tuple[Generation, Event | None]]) -> None:
    for gen, event in batch:
        gen.queue.put_nowait(event)


class Engine(Protocol):
    """What the server needs from an inference backend."""

    model_id: str
    context_length: int
    max_batch_size: int
    tokenizer: Any

    @property
    def kv_positions(self) -> int: ...
    def submit(self, request: GenerationRequest) -> Generation: ...
    def submit_all(self, requests: Sequence[GenerationRequest]) -> list[Generation]: ...
    def stats(self) -> dict[str, int]: ...
    def alive(self) -> bool: ...
    def close(self) -> None: ...
