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

Fairness: waiting requests are queued per tenant, and free batch slots go to the tenant that
holds the fewest rows. A tenant below its fair share (``max_batch_size`` / tenants with work)
that finds the batch full takes a slot from the tenant furthest above its share: that tenant's
youngest row is *preempted* (its KV dropped, its state kept) and resumes later by prefilling its
prompt and the tokens it already generated, so one tenant's burst costs another tenant at most
one step of waiting, not the length of the burst. Prompt tokens prefilled between two decode
steps are bounded (``max_prefill_tokens``) while other rows are decoding: a long prompt joins the
batch at once and is prefilled in chunks (*chunked prefill*), one chunk between two steps and one
token within each step, so neither one long prompt nor a flood of them stalls running streams.

Isolation: an error while admitting, sampling or detokenizing one row fails that row alone; an
error of a whole decode step fails the rows of that step; an error that escapes anyway ends the
engine thread, after which ``submit`` raises ``EngineUnavailable`` at once and ``on_death`` is
called (the server exits so that a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
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
GREEDY_BELOW = 1e-5  # temperatures below this are greedy: dividing logits by less overflows float32
SEED_LIMIT = 2**63  # torch.Generator seeds are signed 64-bit


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


@dataclass(eq=False)
class _Row:
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
_Work = Generation | _Row


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
        max_queued_per_tenant: requests of one tenant that may wait for a slot at once; more are
            refused with ``EngineBusy`` (default: four times the batch size).
        max_prefill_tokens: the most prompt tokens prefilled between two decode steps while other
            rows decode; within it, as many as take about one decode step's time (measured). A
            prompt of several choices is prefilled whole (alone if need be).
        on_death: called (from the engine thread) if the thread ends by an error, not ``close``.
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
        max_queued_per_tenant: int | None = None,
        max_prefill_tokens: int = 512,
        on_death: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.model_id = model_id
        self.max_queue_wait_s = max_queue_wait_s
        self.stop_tokens = set(stop_tokens)
        self._stop_ids = torch.tensor(sorted(self.stop_tokens), dtype=torch.long)
        self.observer = observer
        self.max_prefill_tokens = max_prefill_tokens
        self.on_death = on_death
        self.died: BaseException | None = None
        self.preemptions = 0
        self._step_s: float | None = None  # a decode step's seconds (moving average)
        self._token_s: float | None = None  # a prefilled prompt token's seconds (moving average)
        self.steps = 0  # decode steps so far (a clock for tests of the scheduler that is not time)
        self._queues: dict[str, deque[Generation]] = {}  # per tenant, in arrival order
        self._parked: dict[str, deque[_Row]] = {}  # preempted rows per tenant, resumed first
        self._turn = 0  # rotates which tenant wins a tie
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
        self.max_queued_per_tenant = max_queued_per_tenant or 4 * self.max_batch_size

    # -- public ---------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Generation:
        return self.submit_all([request])[0]

    def submit_all(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Queue requests together: all of them, or (on an error) none.

        Raises:
            ValueError: a request asks for more choices than the batch holds.
            EngineBusy: their tenant already has ``max_queued_per_tenant`` requests waiting.
            EngineUnavailable: the engine thread has stopped.
        """
        for request in requests:
            if request.n > self.max_batch_size:
                raise ValueError(f"n={request.n} is more than the engine's max batch size {self.max_batch_size}")
        loop = asyncio.get_running_loop()
        gens = [Generation(r, loop, self._outbox) for r in requests]
        with self._cond:
            if self._closed or not self._thread.is_alive():
                raise EngineUnavailable("the inference engine is not running")
            for tenant in {r.tenant for r in requests}:
                queue = self._queues.get(tenant, ())
                adding = sum(1 for r in requests if r.tenant == tenant)
                if len(queue) + adding > self.max_queued_per_tenant:
                    raise EngineBusy(
                        f"this tenant already has {len(queue)} requests waiting for a batch slot "
                        f"(at most {self.max_queued_per_tenant}); retry after the running ones finish"
                    )
            for gen in gens:
                self._queues.setdefault(gen.request.tenant, deque()).append(gen)
            self._cond.notify()
        return gens

    @property
    def kv_positions(self) -> int:
        """Positions of keys and values one request may fill (the pool's memory budget)."""
        return min(self.context_length, self.runner.max_capacity)

    def stats(self) -> dict[str, int]:
        with self._cond:
            queued = sum(len(q) for q in self._queues.values()) + sum(len(p) for p in self._parked.values())
        out = {"queue_depth": queued, "batch_size": len(self._rows), "preemptions": self.preemptions}
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
                raise EngineUnavailable("the engine is closed")
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
        except BaseException as e:
            self.died = e
            log.critical("the engine thread stopped on an error; no request can be served", exc_info=True)
        finally:  # closed, or an error escaped the loop: nobody may wait on this thread any more
            with self._cond:
                self._closed = True
                calls = list(self._calls)
                self._calls.clear()
                waiting = [g for q in self._queues.values() for g in q]
                waiting += [r.gen for p in self._parked.values() for r in p]
                self._queues.clear()
                self._parked.clear()
            message = "the server is shutting down" if self.died is None else "the inference engine stopped"
            for gen in {id(g): g for g in [*waiting, *(r.gen for r in self._rows)]}.values():
                gen.emit(ErrorEvent(message, 503))
                gen.emit(None)
            self._outbox.flush()
            for _, done in calls:
                done.set_exception(EngineUnavailable("the engine is closed"))
            if self.died is not None and self.on_death is not None:
                self.on_death(self.died)

    def _run_calls(self, calls: list[tuple[Callable[[], Any], Future[Any]]]) -> None:
        for fn, done in calls:
            try:
                done.set_result(fn())
            except BaseException as e:  # handed to the caller, who raises it
                done.set_exception(e)

    def _loop_once(self) -> bool:
        """Admit what fits, then one decode step. Returns False when the engine is closed."""
        with self._cond:
            while not self._closed and not self._waiting() and not self._rows and not self._calls:
                self._cond.wait()
            if self._closed:
                return False
            calls = list(self._calls)
            self._calls.clear()
            admitted = self._schedule()
        if calls:
            with torch.inference_mode(False):  # what the calls make is kept beyond this step
                self._run_calls(calls)
        for gen in admitted:
            if isinstance(gen, Generation) and gen.request.params.max_tokens == 0 and not self._chunked(gen):
                self._guarded(functools.partial(self._score, gen), gen)
        generating = [w for w in admitted if self._chunked(w) or _gen_of(w).request.params.max_tokens > 0]
        if generating:
            try:
                self._admit(generating)  # fails the requests that fail, one by one
            except Exception:  # a bug past that: fail what was being admitted, keep the engine
                log.exception("admission failed")
                for gen in {id(_gen_of(w)): _gen_of(w) for w in generating}.values():
                    self._fail(gen)
        prefilled = sum(self._whole_prefill(w) for w in admitted)
        try:
            self._continue_prefills(prefilled)
        except Exception:  # fail the prompts being prefilled, keep the others
            log.exception("chunked prefill failed")
            for gen in {id(r.gen): r.gen for r in self._rows if r.prompt_open}.values():
                self._fail(gen)
        self._outbox.flush()  # first tokens out before the next decode step
        try:
            self._drop_cancelled()
            if self._rows:
                self._step()
            elif not self._waiting():
                self.runner.release()
        except Exception:  # keep serving: fail the rows of this step, not the engine
            log.exception("engine step failed")
            for gen in {id(r.gen): r.gen for r in self._rows}.values():
                self._fail(gen)
            self._rows.clear()
            self.runner.release()
        return True

    def _guarded(self, fn: Callable[[], object], gen: Generation) -> None:
        """Run ``fn()``, work of ``gen``'s; an error fails ``gen`` alone."""
        try:
            fn()
        except Exception:
            log.exception("request %s failed in the engine", gen.request.request_id)
            self._fail(gen)

    def _fail(self, gen: Generation) -> None:
        """End a request with an error and free every slot it holds. Never raises.

        The message names no detail of the error: it could carry another request's data.
        """
        try:
            for i in range(len(self._rows) - 1, -1, -1):
                if self._rows[i].gen is gen:
                    self._remove(i)
        except Exception:  # the KV could not be moved: drop every row, a correct if costly state
            log.exception("could not free a failed request's rows; failing the batch")
            others = {id(r.gen): r.gen for r in self._rows if r.gen is not gen}.values()
            self._rows.clear()
            self.runner.release()
            for other in others:
                other.emit(ErrorEvent("internal engine error; retry the request", 500))
                other.emit(None)
        gen.emit(ErrorEvent("internal engine error; retry the request", 500))
        gen.emit(None)

    def _waiting(self) -> bool:
        return any(self._queues.values()) or any(self._parked.values())

    def _schedule(self) -> list[_Work]:
        """Pick the work to start before the next step (called with the lock held).

        Returns new requests and preempted rows, at most ``max_prefill_tokens`` prompt tokens of
        them (or one request), fairly across tenants; preempts rows where a tenant below its
        fair share finds no free slot.
        """
        now = time.monotonic()
        for queue in self._queues.values():
            for gen in list(queue):
                if gen.cancelled:
                    queue.remove(gen)
                    gen.emit(None)
                elif now - gen.submitted > self.max_queue_wait_s:
                    queue.remove(gen)
                    gen.emit(ErrorEvent(f"no batch slot became free within {self.max_queue_wait_s:g} s; retry later"))
                    gen.emit(None)
        for parked in self._parked.values():
            for row in [r for r in parked if r.gen.cancelled]:
                parked.remove(row)
                self._close_choice(row.gen)
        waiting = [t for t in {*self._queues, *self._parked} if self._queues.get(t) or self._parked.get(t)]
        if not waiting:
            return []
        running: dict[str, int] = {}
        for row in self._rows:
            running[row.tenant] = running.get(row.tenant, 0) + 1
        share = max(1, self.max_batch_size // len({*waiting, *running}))
        free = self.max_batch_size - len(self._rows)
        self._turn += 1
        order = sorted(waiting, key=lambda t: (running.get(t, 0), hash((t, self._turn))))
        for tenant in order:  # preempt for tenants below their share whose next work does not fit
            need = self._slots_needed(tenant)
            while free < need and running.get(tenant, 0) + need <= share:
                victim = max(running, key=lambda t: running[t] if t != tenant else -1, default=None)
                if victim is None or victim == tenant or running[victim] <= share:
                    break
                self._preempt(victim)
                running[victim] -= 1
                free += 1
        admitted: list[_Work] = []
        budget = self.max_prefill_tokens
        while order:
            tenant = min(order, key=lambda t: running.get(t, 0))
            resuming, queued = self._parked.get(tenant), self._queues.get(tenant)
            work: _Work | None = resuming[0] if resuming else queued[0] if queued else None
            if work is None:
                order.remove(tenant)
                continue
            slots = self._slots_of(work)
            tokens = self._whole_prefill(work)
            if (slots > free or (slots == 0 and free == 0)) or (admitted and tokens > budget):
                order.remove(tenant)  # this tenant's next work waits; others may still fit
                continue
            (resuming if isinstance(work, _Row) else queued).popleft()  # type: ignore[union-attr]
            admitted.append(work)
            free -= slots
            budget -= tokens
            running[tenant] = running.get(tenant, 0) + max(1, slots)
        return admitted

    def _slots_of(self, work: _Work) -> int:
        """Batch slots that ``work`` keeps: a row one, a request its choices, a scoring request none."""
        if isinstance(work, _Row):
            return 1
        if work.request.params.max_tokens:
            return work.request.n
        return 1 if self._chunked(work) else 0  # a chunked echo holds a slot while it is scored

    def _slots_needed(self, tenant: str) -> int:
        parked, queue = self._parked.get(tenant), self._queues.get(tenant)
        if parked:
            return 1
        return max(1, self._slots_of(queue[0])) if queue else 0

    def _preempt(self, tenant: str) -> None:
        """Take ``tenant``'s youngest running row out of the batch; it resumes from ``_parked``."""
        position = max(
            (i for i, r in enumerate(self._rows) if r.tenant == tenant), key=lambda i: -self._rows[i].generated
        )
        row = self._rows[position]
        self._remove(position)
        self._parked.setdefault(tenant, deque()).appendleft(row)
        self.preemptions += 1

    def _score(self, gen: Generation) -> None:
        """Prompt log-probabilities only (``max_tokens`` 0): a prefill in a free slot, no row."""
        req = gen.request
        if gen.cancelled:  # the client left while it waited
            gen.emit(None)
            return
        if req.params.prompt_logprobs:  # without echo nothing of the prompt's logits is answered
            logits = self.runner.prefill(len(self._rows), req.prompt, req.lora, all_logits=True)
            gen.emit(_prompt_event(req.prompt, logits, req.params.logprobs or 0))
        for i in range(req.n):
            gen.emit(FinishEvent(i, "length", "", 0))
        gen.emit(None)

    def _admit(self, work: list[_Work]) -> None:
        """Give each request its rows (and each resumed row a slot), prefill the prompts, and pick
        the first tokens. A request that fails fails alone; nothing is sent twice."""
        work = sorted(work, key=lambda w: _gen_of(w).request.adapter or "")  # one adapter's side by side
        whole_echo = [w for w in work if isinstance(w, Generation) and _is_echo(w) and not self._chunked(w)]
        for gen in whole_echo:  # several choices with echo: every position's logits, in one piece
            self._guarded(functools.partial(self._admit_echo, gen), gen)
        plain = [w for w in work if w not in whole_echo]
        if not plain:
            return
        try:
            started = self._admit_together(plain)
        except Exception:
            # Nothing was sent yet: take the rows back and find the one that fails.
            log.exception("prefill of %d requests failed", len(plain))
            for item in plain:
                self._unplace(item)
            if len(plain) == 1:
                self._fail(_gen_of(plain[0]))
            else:
                for item in plain:
                    self._admit([item])
            return
        for item, rows, logits in started:  # the first tokens, each request on its own
            self._guarded(functools.partial(self._begin, item, rows, logits), _gen_of(item))

    def _admit_echo(self, gen: Generation) -> None:
        rows = [self._rows[self._place(self._new_row(gen, i))] for i in range(gen.request.n)]
        logits = self.runner.prefill(self._rows.index(rows[0]), gen.request.prompt, gen.request.lora, all_logits=True)
        gen.emit(_prompt_event(gen.request.prompt, logits, gen.request.params.logprobs or 0))
        self._start_rows(gen, rows, logits[-1:])

    def _chunked(self, work: _Work) -> bool:
        """Whether ``work``'s prompt is prefilled in chunks: a resumed row, or a request of one choice
        that needs the prompt's keys (to generate) or logits (echo). The choices of one prompt
        share one prefill, in one piece."""
        if isinstance(work, _Row):
            return True
        return work.request.n == 1 and (work.request.params.max_tokens > 0 or _is_echo(work))

    def _whole_prefill(self, work: _Work) -> int:
        """Prompt tokens ``work`` prefills in one piece when it is admitted (0 if chunked, or if
        nothing of its prompt is computed: scoring without echo)."""
        if self._chunked(work):
            return 0
        params = _gen_of(work).request.params
        return len(_gen_of(work).request.prompt) if params.max_tokens > 0 or params.prompt_logprobs else 0

    def _join(self, work: _Work) -> None:
        """Place a row whose prompt will be fed in chunks (its cached prefix, if any, goes in now)."""
        if isinstance(work, _Row):
            row, tokens, scope = work, work.resume_tokens(), None
            if row.scores is not None:  # echo: scored again from the start, or not at all if answered
                row.scores = PromptEvent(list(row.gen.request.prompt), [None], [None]) if row.prompt_open else None
        else:
            row, tokens, scope = self._new_row(work, 0), work.request.prompt, work.request.cache_scope
            if _is_echo(work):  # every position's logits are needed: no cached prefix
                row.scores, scope = PromptEvent(list(tokens), [None], [None]), None
        slot = self._place(row)
        past = 0
        if self.prefix_cache is not None and scope:
            past = self.runner.write_prefix(slot, self.prefix_cache.lookup(scope, tokens))
        row.position, row.last, row.feed, row.fed, row.prompt_open = past, tokens[past], tokens, past + 1, True

    def _continue_prefills(self, spent: int) -> None:
        """Prefill the next chunk of the open prompts, within what is left of the step's budget;
        finished prompts pick their first token."""
        rows = [r for r in self._rows if r.prompt_open]
        if not rows:
            return
        # While rows decode, a chunk costs about one step; else up to max_prefill_tokens, so that a
        # request arriving now waits for one chunk at most, not for a flood of prompts.
        decoding = any(not r.prompt_open for r in self._rows)
        budget = (self._chunk_budget() if decoding else self.max_prefill_tokens) - spent
        chunks: list[tuple[_Row, int]] = []
        for row in rows:  # in slot order: one adapter's rows side by side
            take = min(1 + row.pending, budget)
            if take <= 0:
                break
            chunks.append((row, take))
            budget -= take
        if chunks:  # else each open prompt still moves one token per decode step
            # Echo rows need every position's logits, the others only the last: two passes.
            for echo in (False, True):
                group = [c for c in chunks if (c[0].scores is not None) is echo]
                if group:
                    self._prefill_chunks(group)

    def _chunk_budget(self) -> int:
        """Prompt tokens to prefill between two steps while rows decode: as many as take about one
        decode step's time (both measured as the engine runs), so a running stream's tokens come
        at most about twice as slowly; at least ``MIN_CHUNK``, at most ``max_prefill_tokens``."""
        if self._step_s is None or self._token_s is None:
            return self.max_prefill_tokens
        return max(MIN_CHUNK, min(self.max_prefill_tokens, int(self._step_s / self._token_s)))

    def _prefill_chunks(self, chunks: list[tuple[_Row, int]]) -> None:
        """Prefill ``take`` more prompt tokens of each row together; a row whose chunk fails fails alone."""
        echo = chunks[0][0].scores is not None
        started = time.perf_counter()
        try:
            logits = self.runner.prefill_many(
                [self._rows.index(r) for r, _ in chunks],
                [[r.last, *r.feed[r.fed : r.fed + take - 1]] for r, take in chunks],
                [r.gen.request.lora for r, _ in chunks],
                [r.position for r, _ in chunks],
                all_logits=echo,
            )
        except Exception:
            if len(chunks) == 1:
                log.exception("request %s failed in its prefill", chunks[0][0].gen.request.request_id)
                self._fail(chunks[0][0].gen)
            else:
                for chunk in chunks:  # the same chunks again, one by one: the others go on
                    if chunk[0] in self._rows:
                        self._prefill_chunks([chunk])
            return
        tokens = sum(take for _, take in chunks)
        self._token_s = _ema(self._token_s, (time.perf_counter() - started) / tokens)
        done = []
        start = 0
        for i, (row, take) in enumerate(chunks):
            if echo:  # (take, vocab) for this row: score its prompt tokens, keep the last
                mine, start = logits[start : start + take], start + take
                _score_prompt(row, mine, row.position)
                last = mine[-1:]
            else:
                last = logits[i : i + 1]
            if take == 1 + row.pending:  # the whole rest of the prompt: the logits pick the first token
                row.position += take - 1
                row.fed = len(row.feed)
                done.append((row, last))
            else:
                row.last = row.feed[row.fed + take - 1]
                row.fed += take
                row.position += take
        for row, _ in done:  # cached before any row starts: a finished row moves the others' KV
            self._close_prompt(row)
        for row, row_logits in done:
            self._guarded(functools.partial(self._advance, [row], row_logits), row.gen)

    def _close_prompt(self, row: _Row) -> None:
        """The row's prompt is all in its slot: answer its scores (echo), keep its blocks for later
        requests of its scope."""
        row.prompt_open = False
        if row.scores is not None:
            row.gen.emit(row.scores)
        scope = row.gen.request.cache_scope
        if self.prefix_cache is not None and scope:
            slot = self._rows.index(row)
            self.prefix_cache.insert(scope, row.gen.request.prompt, functools.partial(self.runner.read_prefix, slot))

    def _admit_together(self, plain: list[_Work]) -> list[tuple[_Work, list[_Row], torch.Tensor]]:
        """Place and prefill ``plain`` in one forward pass; returns each item's rows and last logits.

        Work prefilled in chunks is only placed (its first token comes from ``_continue_prefills``).
        Sends nothing: an error here leaves only rows to take back (``_unplace``).
        """
        for item in [w for w in plain if self._chunked(w)]:
            self._join(item)
        plain = [w for w in plain if not self._chunked(w)]
        if not plain:
            return []
        rows: list[list[_Row]] = []
        for item in plain:
            if isinstance(item, _Row):
                self._place(item)
                rows.append([item])
            else:
                rows.append([self._rows[self._place(self._new_row(item, i))] for i in range(item.request.n)])
        slots = [self._rows.index(r[0]) for r in rows]
        prompts = [w.resume_tokens() if isinstance(w, _Row) else w.request.prompt for w in plain]
        cache, past = self.prefix_cache, [0] * len(plain)
        scoped = [
            (i, w.request.cache_scope)
            for i, w in enumerate(plain)
            if isinstance(w, Generation) and w.request.cache_scope
        ]
        if cache is not None:  # a cached prefix goes straight into the slot
            for i, scope in scoped:
                past[i] = self.runner.write_prefix(slots[i], cache.lookup(scope, prompts[i]))
        last = self.runner.prefill_many(
            slots,
            [p[n:] for p, n in zip(prompts, past, strict=True)],
            [_gen_of(w).request.lora for w in plain],
            past,
        )
        # Cache the prompts' blocks before any row starts: a row that finishes on its first
        # token is removed, and that moves later rows (their KV) to other slots.
        if cache is not None:
            for i, scope in scoped:
                cache.insert(scope, prompts[i], functools.partial(self.runner.read_prefix, slots[i]))
        return [(item, mine, last[i : i + 1]) for i, (item, mine) in enumerate(zip(plain, rows, strict=True))]

    def _begin(self, item: _Work, rows: list[_Row], logits: torch.Tensor) -> None:
        if isinstance(item, _Row):
            self._advance(rows, logits)  # resumed: the next token, as a decode step would pick it
        else:
            self._start_rows(item, rows, logits)

    def _unplace(self, item: _Work) -> None:
        """Take back the rows ``_admit_together`` placed for ``item`` (none of them has run)."""
        for i in range(len(self._rows) - 1, -1, -1):
            row = self._rows[i]
            if row is item or (isinstance(item, Generation) and row.gen is item):
                self._remove(i)

    def _start_rows(self, gen: Generation, rows: list[_Row], logits: torch.Tensor) -> None:
        first = self._rows.index(rows[0])
        for row in rows[1:]:
            self.runner.copy_prefix(first, self._rows.index(row), len(gen.request.prompt))
        self._advance(rows, logits.expand(len(rows), -1))

    def _new_row(self, gen: Generation, index: int) -> _Row:
        params = gen.request.params
        generator = None
        if params.temperature >= GREEDY_BELOW:
            generator = torch.Generator()
            seed = (params.seed + index) % SEED_LIMIT if params.seed is not None else torch.seed() % SEED_LIMIT
            generator.manual_seed(seed)
        return _Row(
            gen=gen,
            index=index,
            stream=TextStream(self.tokenizer, params.stop),
            position=len(gen.request.prompt) - 1,
            last=-1,
            generator=generator,
        )

    def _place(self, row: _Row) -> int:
        """Place a row at the end of its adapter's segment; returns its slot."""
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
        rows[hole] = row
        self.runner.move(moves)
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
        self.steps += 1
        self._advance(list(rows), logits)
        self._step_s = _ema(self._step_s, time.perf_counter() - started)
        if self.observer:
            self.observer.step(len(rows), sum(len(q) for q in self._queues.values()), time.perf_counter() - started)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token from ``logits`` (one row per entry), emit it, retire finished rows.

        An error with one row (its sampling, its text) fails that row's request only.
        """
        failed: list[Generation] = []
        for i, row in enumerate(rows):  # prompt scores first: the model's own logits, before any mask
            if row.prompt_open and row.scores is not None:
                try:
                    _score_prompt(row, logits[i : i + 1], row.position)
                except Exception:
                    log.exception("request %s failed while its prompt was scored", row.gen.request.request_id)
                    failed.append(row.gen)
        early = [
            i
            for i, r in enumerate(rows)
            if not (r.prompt_open and r.pending) and r.generated < r.gen.request.params.min_tokens
        ]
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
            if row.gen in failed:
                continue
            try:
                if row.prompt_open:  # this step fed a prompt token
                    if row.pending:
                        row.last = row.feed[row.fed]
                        row.fed += 1
                        row.position += 1
                        continue
                    self._close_prompt(row)  # it fed the last one: these logits pick the first token
                outcome = self._next_token(row, tokens[i], logits[i], logprobs[i] if logprobs is not None else None)
            except Exception:
                log.exception("request %s failed while choosing its next token", row.gen.request.request_id)
                failed.append(row.gen)
                continue
            if outcome is not None:
                finished.append((row, *outcome))
        for row, reason, tail in finished:
            if row.gen in failed:
                continue
            row.gen.emit(FinishEvent(row.index, reason, tail, row.generated))
            self._remove(self._rows.index(row))
            self._close_choice(row.gen)
        for gen in {id(g): g for g in failed}.values():
            self._fail(gen)

    def _next_token(
        self, row: _Row, greedy: int, logits: torch.Tensor, logprobs: torch.Tensor | None
    ) -> tuple[str, str] | None:
        """Choose, emit and feed ``row``'s next token; returns (finish reason, held-back text) when it ends."""
        params = row.gen.request.params
        if params.max_tokens == 0:  # scoring with echo: the prompt's scores were all it asked for
            return "length", ""
        token = greedy
        if row.generator is not None:
            token = _sample(logits, params.temperature, params.top_p, row.generator)
        row.generated += 1
        if token in self.stop_tokens:
            return "stop", row.stream.flush()
        text, stopped = row.stream.push(token)
        event = TokenEvent(row.index, token, text)
        if logprobs is not None and params.logprobs is not None:
            event.logprob = float(logprobs[token])
            if params.logprobs:
                top = torch.topk(logprobs, params.logprobs)
                event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        row.gen.emit(event)
        row.last = token
        row.position += 1
        if stopped:
            return "stop", ""
        if row.generated >= params.max_tokens or row.position >= self.context_length:
            return "length", row.stream.flush()
        return None


MIN_CHUNK = 16  # prompt tokens prefilled between two steps at the least (each step feeds one more)


def _ema(average: float | None, value: float, weight: float = 0.2) -> float:
    return value if average is None else (1 - weight) * average + weight * value


def _score_prompt(row: _Row, logits: torch.Tensor, start: int) -> None:
    """Add the log-probabilities of the prompt tokens that ``logits`` (positions ``start``.., one
    row each) predict to ``row.scores``."""
    scores, prompt = row.scores, row.gen.request.prompt
    assert scores is not None
    end = min(start + logits.shape[0], len(prompt) - 1)  # position t predicts token t + 1
    if end > start:
        part = _prompt_event(prompt[start : end + 1], logits[: end - start], row.gen.request.params.logprobs or 0)
        scores.logprobs.extend(part.logprobs[1:])
        scores.top_logprobs.extend(part.top_logprobs[1:])


def _gen_of(work: _Work) -> Generation:
    return work.gen if isinstance(work, _Row) else work


def _is_echo(work: _Work) -> bool:
    return isinstance(work, Generation) and work.request.params.prompt_logprobs


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """A token drawn from ``softmax(logits / temperature)`` within the ``top_p`` nucleus.

    Non-finite probabilities (logits of inf or nan, or a temperature that overflows them) never
    reach the sampler: the row then takes the most likely token instead.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        return int(torch.nan_to_num(logits.float(), nan=-math.inf).argmax())
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


PROMPT_LOGPROB_CHUNK = 256  # positions whose log-softmax over the vocabulary is held at once


def _prompt_event(prompt: list[int], logits: torch.Tensor, top: int) -> PromptEvent:
    """Log-probabilities of each prompt token (position t predicts t+1), in chunks of positions."""
    chosen: list[float | None] = [None]
    alternatives: list[list[tuple[int, float]] | None] = [None]
    targets = torch.tensor(prompt[1:], dtype=torch.long)
    for start in range(0, len(prompt) - 1, PROMPT_LOGPROB_CHUNK):
        end = min(len(prompt) - 1, start + PROMPT_LOGPROB_CHUNK)
        logprobs = torch.log_softmax(logits[start:end].float(), dim=-1)  # (chunk, vocab)
        chosen.extend(logprobs.gather(1, targets[start:end, None])[:, 0].tolist())
        if top:
            values, indices = torch.topk(logprobs, top, dim=-1)
            alternatives.extend(
                list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)
            )
        else:
            alternatives.extend([None] * (end - start))
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
