"""The in-process inference engine: continuous batching of many adapters over one base model.

Requests join and leave the running batch between decode steps. A request is prefilled alone
(its prompt in one forward pass, keys and values written to its own KV slot), then decodes one
token per step together with every other running row, whatever adapter each row uses. Rows are
kept grouped by adapter so each LoRA delta runs on a contiguous slice (see ``runner.py``).

The server talks to the engine through the ``Engine`` protocol, so another backend (vLLM) can
take its place. Events reach the caller's event loop through ``call_soon_threadsafe``; the
engine runs in its own thread because PyTorch releases the GIL during the heavy work.

Every tensor operation of the server runs on that one thread: the model is built there and
adapters are prepared there (``call``). Each thread that runs a parallel PyTorch operation keeps
an OpenMP thread pool for the life of the process, and once the process holds more OpenMP threads
than cores, libgomp stops spin-waiting between parallel regions: every one of the hundreds of
small GEMMs in a decode step then waits for a sleeping thread to wake. One pool keeps batch-1
decoding ~1.5× faster on two cores (see docs/serving.md).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from loraforge.serve.prefix_cache import PrefixCache
from loraforge.serve.runner import LlamaRunner, LoraLayers, Segment
from loraforge.serve.text import TextStream

log = logging.getLogger("loraforge.serve")
T = TypeVar("T")


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
    tokenizer: Any

    def submit(self, request: GenerationRequest) -> Generation: ...
    def stats(self) -> dict[str, int]: ...
    def alive(self) -> bool: ...
    def close(self) -> None: ...


@dataclass(eq=False)
class _Row:
    gen: Generation
    index: int
    stream: TextStream
    position: int  # the position of ``last`` in the sequence
    last: int  # the newest token: fed at the next decode step
    generated: int = 0
    generator: torch.Generator | None = None

    @property
    def key(self) -> str | None:
        return self.gen.request.adapter


class LocalEngine:
    """Continuous batching over a ``LlamaRunner``.

    Args:
        runner: the model, or a function that builds it (called on the engine's thread, so that
            the model's tensors are made by the thread that will use them; its errors are raised
            here).
        tokenizer: its tokenizer (for text deltas and stop strings).
        model_id: the name clients use for the base model.
        max_queue_wait_s: a request not started within this time gets an error (503).
        stop_tokens: ids that end a generation (end of turn, end of text).
        prefix_cache: keeps prompt prefixes' keys and values for requests of the same scope.
    """

    def __init__(
        self,
        runner: LlamaRunner | Callable[[], LlamaRunner],
        tokenizer: Any,
        *,
        model_id: str,
        max_queue_wait_s: float = 30.0,
        stop_tokens: Sequence[int] = (),
        observer: EngineObserver | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.model_id = model_id
        self.max_queue_wait_s = max_queue_wait_s
        self.stop_tokens = set(stop_tokens)
        self._stop_ids = torch.tensor(sorted(self.stop_tokens), dtype=torch.long)
        self.observer = observer
        self._pending: deque[Generation] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._outbox = Outbox()
        self._rows: list[_Row] = []
        self._cond = threading.Condition()
        self._closed = False
        built: Future[LlamaRunner] = Future()
        self._thread = threading.Thread(target=self._run, args=(runner, built), name="loraforge-engine", daemon=True)
        self._thread.start()
        self.runner = built.result()  # the builder's error, if any, is raised here
        self.context_length = self.runner.context_length
        self.max_batch_size = self.runner.max_slots

    # -- public ---------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Generation:
        if request.n > self.max_batch_size:
            raise ValueError(f"n={request.n} is more than the engine's max batch size {self.max_batch_size}")
        gen = Generation(request, asyncio.get_running_loop(), self._outbox)
        with self._cond:
            self._pending.append(gen)
            self._cond.notify()
        return gen

    def stats(self) -> dict[str, int]:
        out = {"queue_depth": len(self._pending), "batch_size": len(self._rows)}
        if self.prefix_cache is not None:
            cache = self.prefix_cache.stats()
            out.update(
                prefix_cache_prompt_tokens=cache.prompt_tokens,
                prefix_cache_hit_tokens=cache.hit_tokens,
                prefix_cache_bytes=cache.bytes,
            )
        return out

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine's thread between two decode steps and return its result.

        For tensor work outside decoding (preparing an adapter), so that only the engine's
        thread ever runs PyTorch operations. ``fn`` runs outside inference mode: the tensors it
        makes are ordinary ones, kept beyond the step. Blocks the caller (use it from a worker
        thread).

        Raises:
            RuntimeError: the engine is closed or its thread has stopped.
        """
        if threading.current_thread() is self._thread:
            with torch.inference_mode(False):
                return fn()
        done: Future[T] = Future()
        with self._cond:
            if self._closed or not self._thread.is_alive():
                raise RuntimeError("the engine is closed")
            self._calls.append((fn, done))
            self._cond.notify()
        return done.result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # -- the loop -------------------------------------------------------------------------------

    def _run(self, runner: LlamaRunner | Callable[[], LlamaRunner], built: Future[LlamaRunner]) -> None:
        try:
            self.runner = runner if isinstance(runner, LlamaRunner) else runner()
        except BaseException as e:
            built.set_exception(e)
            return
        built.set_result(self.runner)
        try:
            with torch.inference_mode():
                while self._loop_once():
                    self._outbox.flush()
        finally:  # closed, or an error escaped the loop: nobody may wait on this thread any more
            with self._cond:
                self._closed = True
                calls = list(self._calls)
                self._calls.clear()
            for gen in [*self._pending, *(r.gen for r in self._rows)]:
                gen.emit(ErrorEvent("the server is shutting down", 503))
                gen.emit(None)
            self._outbox.flush()
            for _, done in calls:
                done.set_exception(RuntimeError("the engine is closed"))

    def _run_calls(self, calls: list[tuple[Callable[[], Any], Future[Any]]]) -> None:
        for fn, done in calls:
            try:
                done.set_result(fn())
            except BaseException as e:  # handed to the caller, who raises it
                done.set_exception(e)

    def _loop_once(self) -> bool:
        """Admit what fits, then one decode step. Returns False when the engine is closed."""
        with self._cond:
            while not self._closed and not self._pending and not self._rows and not self._calls:
                self._cond.wait()
            if self._closed:
                return False
            calls = list(self._calls)
            self._calls.clear()
            admitted = self._take_pending()
        if calls:
            with torch.inference_mode(False):  # what the calls make is kept beyond this step
                self._run_calls(calls)
        scoring = [g for g in admitted if g.request.params.max_tokens == 0]
        generating = [g for g in admitted if g.request.params.max_tokens > 0]
        for gen in scoring:
            try:
                self._score(gen)
            except Exception as e:
                log.exception("prefill failed")
                self._fail(gen, f"internal engine error: {e}")
        if generating:
            try:
                self._admit(generating)
            except Exception as e:
                log.exception("prefill failed")
                for gen in generating:
                    self._fail(gen, f"internal engine error: {e}")
        self._outbox.flush()  # first tokens out before the next decode step
        try:
            self._drop_cancelled()
            if self._rows:
                self._step()
            elif not self._pending:
                self.runner.release()
        except Exception as e:  # keep serving: fail the running requests, not the engine
            log.exception("engine step failed")
            failed = {id(r.gen): r.gen for r in self._rows}.values()
            self._rows.clear()
            self.runner.release()
            for gen in failed:
                gen.emit(ErrorEvent(f"internal engine error: {e}", 500))
                gen.emit(None)
        return True

    def _fail(self, gen: Generation, message: str) -> None:
        """End a request with an error and free every slot it holds."""
        for i in range(len(self._rows) - 1, -1, -1):
            if self._rows[i].gen is gen:
                self._remove(i)
        gen.emit(ErrorEvent(message, 500))
        gen.emit(None)

    def _take_pending(self) -> list[Generation]:
        now = time.monotonic()
        free = self.max_batch_size - len(self._rows)
        admitted: list[Generation] = []
        while self._pending:
            gen = self._pending[0]
            if gen.cancelled:
                self._pending.popleft()
                gen.emit(None)
            elif now - gen.submitted > self.max_queue_wait_s:
                self._pending.popleft()
                gen.emit(ErrorEvent(f"no batch slot became free within {self.max_queue_wait_s:g} s; retry later"))
                gen.emit(None)
            elif gen.request.n <= free or (gen.request.params.max_tokens == 0 and free > 0):
                self._pending.popleft()
                admitted.append(gen)
                free -= gen.request.n if gen.request.params.max_tokens else 0
            else:
                break
        return admitted

    def _score(self, gen: Generation) -> None:
        """Prompt log-probabilities only (``max_tokens`` 0): a prefill in a free slot, no row."""
        req = gen.request
        logits = self.runner.prefill(len(self._rows), req.prompt, req.lora, all_logits=req.params.prompt_logprobs)
        if req.params.prompt_logprobs:
            gen.emit(_prompt_event(req.prompt, logits, req.params.logprobs or 0))
        for i in range(req.n):
            gen.emit(FinishEvent(i, "length", "", 0))
        gen.emit(None)

    def _admit(self, gens: list[Generation]) -> None:
        """Give each request its rows, prefill the prompts together, and pick the first tokens."""
        gens = sorted(gens, key=lambda g: g.request.adapter or "")  # one adapter's prompts side by side
        rows: list[list[_Row]] = []
        for gen in gens:
            mine = []
            for i in range(gen.request.n):
                mine.append(self._rows[self._insert(gen, i)])
            rows.append(mine)
        echo = [g for g in gens if g.request.params.prompt_logprobs]
        plain = [(g, r) for g, r in zip(gens, rows, strict=True) if not g.request.params.prompt_logprobs]
        for gen in echo:  # completions with echo need every prompt position's logits
            first = rows[gens.index(gen)]
            logits = self.runner.prefill(
                self._rows.index(first[0]), gen.request.prompt, gen.request.lora, all_logits=True
            )
            gen.emit(_prompt_event(gen.request.prompt, logits, gen.request.params.logprobs or 0))
            self._start_rows(gen, first, logits[-1:])
        if plain:
            slots = [self._rows.index(r[0]) for _, r in plain]
            prompts = [g.request.prompt for g, _ in plain]
            cache, past = self.prefix_cache, [0] * len(plain)
            scoped = [(i, g.request.cache_scope) for i, (g, _) in enumerate(plain) if g.request.cache_scope]
            if cache is not None:  # a cached prefix goes straight into the slot
                for i, scope in scoped:
                    past[i] = self.runner.write_prefix(slots[i], cache.lookup(scope, prompts[i]))
            last = self.runner.prefill_many(
                slots, [p[n:] for p, n in zip(prompts, past, strict=True)], [g.request.lora for g, _ in plain], past
            )
            # Cache the prompts' blocks before any row starts: a row that finishes on its first
            # token is removed, and that moves later rows (their KV) to other slots.
            if cache is not None:
                for i, scope in scoped:
                    cache.insert(scope, prompts[i], functools.partial(self.runner.read_prefix, slots[i]))
            for i, (gen, mine) in enumerate(plain):
                self._start_rows(gen, mine, last[i : i + 1])

    def _start_rows(self, gen: Generation, rows: list[_Row], logits: torch.Tensor) -> None:
        first = self._rows.index(rows[0])
        for row in rows[1:]:
            self.runner.copy_prefix(first, self._rows.index(row), len(gen.request.prompt))
        self._advance(rows, logits.expand(len(rows), -1))

    def _insert(self, gen: Generation, index: int) -> int:
        """Place a new row at the end of its adapter's segment; returns its slot."""
        params = gen.request.params
        generator = None
        if params.temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(params.seed + index if params.seed is not None else torch.seed())
        row = _Row(
            gen=gen,
            index=index,
            stream=TextStream(self.tokenizer, params.stop),
            position=len(gen.request.prompt) - 1,
            last=-1,
            generator=generator,
        )
        rows = self._rows
        ends = _segment_ends(rows)
        if row.key not in ends:
            rows.append(row)
            return len(rows) - 1
        # Open a hole at the end of the row's segment: each later segment moves its first row to
        # just past its end (one KV copy per later segment), last segment first.
        target = ends[row.key]
        rows.append(row)  # placeholder at the end, overwritten below
        hole = len(rows) - 1
        moves = []
        for start in reversed(_segment_starts(rows[:-1], after=target)):
            rows[hole] = rows[start]
            moves.append((start, hole))
            hole = start
        self.runner.move(moves)
        rows[hole] = row
        return hole

    def _remove(self, position: int) -> None:
        """Take a finished row out, keeping segments contiguous (one KV copy per later segment)."""
        rows = self._rows
        moves = []
        hole = position
        end = _segment_end(rows, position)
        while True:
            if end - 1 != hole:
                rows[hole] = rows[end - 1]
                moves.append((end - 1, hole))
            hole = end - 1
            if end == len(rows):
                break
            end = _segment_end(rows, end)
        rows.pop()
        self.runner.move(moves)

    def _drop_cancelled(self) -> None:
        for i in range(len(self._rows) - 1, -1, -1):
            row = self._rows[i]
            if row.gen.cancelled:
                self._remove(i)
                self._close_choice(row.gen)

    def _close_choice(self, gen: Generation) -> None:
        gen.open_choices -= 1
        if gen.open_choices == 0:
            gen.emit(None)

    def _step(self) -> None:
        started = time.perf_counter()
        rows = self._rows
        segments = []
        start = 0
        for end in sorted(_segment_ends(rows).values()):
            segments.append(Segment(start, end, rows[start].gen.request.lora))
            start = end
        logits = self.runner.decode([r.last for r in rows], [r.position for r in rows], segments)
        self._advance(list(rows), logits)
        if self.observer:
            self.observer.step(len(rows), len(self._pending), time.perf_counter() - started)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token from ``logits`` (one row per entry), emit it, retire finished rows."""
        early = [i for i, r in enumerate(rows) if r.generated < r.gen.request.params.min_tokens]
        if early and self.stop_tokens:
            # In place: a step's logits are its own (a prompt's are expanded to its choices: copied).
            logits = logits if logits.is_contiguous() else logits.contiguous()
            logits[torch.tensor(early)[:, None], self._stop_ids[None, :]] = float("-inf")
        tokens = logits.argmax(dim=-1).tolist()
        logprobs = None
        if any(r.gen.request.params.logprobs is not None for r in rows):
            logprobs = torch.log_softmax(logits.float(), dim=-1)
        finished: list[tuple[_Row, str, str]] = []
        for i, row in enumerate(rows):
            params = row.gen.request.params
            token = tokens[i]
            if params.temperature > 0:
                token = _sample(logits[i], params.temperature, params.top_p, row.generator)
            row.generated += 1
            if token in self.stop_tokens:
                finished.append((row, "stop", row.stream.flush()))
                continue
            text, stopped = row.stream.push(token)
            event = TokenEvent(row.index, token, text)
            if logprobs is not None and params.logprobs is not None:
                event.logprob = float(logprobs[i, token])
                if params.logprobs:
                    top = torch.topk(logprobs[i], params.logprobs)
                    event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            row.gen.emit(event)
            row.last = token
            row.position += 1
            if stopped:
                finished.append((row, "stop", ""))
            elif row.generated >= params.max_tokens or row.position >= self.context_length:
                finished.append((row, "length", row.stream.flush()))
        for row, reason, tail in finished:
            row.gen.emit(FinishEvent(row.index, reason, tail, row.generated))
            self._remove(self._rows.index(row))
            self._close_choice(row.gen)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def _prompt_event(prompt: list[int], logits: torch.Tensor, top: int) -> PromptEvent:
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (T, vocab): position t predicts t+1
    chosen: list[float | None] = [None]
    alternatives: list[list[tuple[int, float]] | None] = [None]
    for t in range(1, len(prompt)):
        chosen.append(float(logprobs[t - 1, prompt[t]]))
        if top:
            values, indices = torch.topk(logprobs[t - 1], top)
            alternatives.append(list(zip(indices.tolist(), values.tolist(), strict=True)))
        else:
            alternatives.append(None)
    return PromptEvent(list(prompt), chosen, alternatives)


def _segment_end(rows: list[_Row], position: int) -> int:
    key = rows[position].key
    end = position
    while end < len(rows) and rows[end].key == key:
        end += 1
    return end


def _segment_ends(rows: list[_Row]) -> dict[str | None, int]:
    ends: dict[str | None, int] = {}
    for i, row in enumerate(rows):
        ends[row.key] = i + 1
    return ends


def _segment_starts(rows: list[_Row], *, after: int) -> list[int]:
    """Start positions of the segments that begin at or after ``after``."""
    return [i for i in range(after, len(rows)) if i == 0 or rows[i].key != rows[i - 1].key]
