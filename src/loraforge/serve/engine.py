"""The in-process inference engine: continuous batching of many adapters over one base model.

Requests join and leave the running batch between decode steps. A request is prefilled alone
(its prompt in one forward pass, keys and values written to its own KV slot), then decodes one
token per step together with every other running row, whatever adapter each row uses. Rows are
kept grouped by adapter so each LoRA delta runs on a contiguous slice (see ``lora_batching.py``).

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
A tenant that has used more of the engine lately than another waiting tenant is *paced*
(``pacing.py``): what its rows add to each step and its prefills between steps are paid back at a
rate that keeps the lighter tenant's streams within ``tenant_slowdown`` of their own pace.

Isolation: an error while admitting, sampling or detokenizing one row fails that row alone; an
error of a whole decode step fails the rows of that step; an error that escapes anyway ends the
engine thread, after which ``submit`` raises ``EngineUnavailable`` at once and ``on_death`` is
called (the server exits so that a supervisor restarts it).

Here: the thread, its loop and the decode step. The request and event types are
``generation.py``; the running batch ``batch.py`` (its rows ``rows.py``); the choice of waiting
work ``scheduling.py``; placing and prefilling it ``admission.py``; sampling ``sampling.py``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from loraforge.serve.admission import Admission
from loraforge.serve.batch import RunningBatch
from loraforge.serve.forward import LlamaRunner
from loraforge.serve.generation import (
    EngineBusy,
    EngineObserver,
    EngineUnavailable,
    ErrorEvent,
    FinishEvent,
    Generation,
    GenerationRequest,
    Outbox,
    TokenEvent,
)
from loraforge.serve.pacing import PACE, Pacer
from loraforge.serve.prefix_cache import PrefixCache
from loraforge.serve.rows import Row, close_choice, gen_of
from loraforge.serve.sampling import sample, score_prompt
from loraforge.serve.scheduling import FairScheduler, chunked, whole_prefill

log = logging.getLogger("loraforge.serve")
T = TypeVar("T")


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
        tenant_slowdown: how many times more slowly a tenant's streams may run because of a
            tenant that has used more of the engine lately (see ``pacing.py``).
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
        tenant_slowdown: float = PACE,
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
        self.pacer = Pacer(pace=tenant_slowdown)  # how much a heavier tenant may slow a lighter one's streams
        self.steps = 0  # decode steps so far (a clock for tests of the scheduler that is not time)
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._outbox = Outbox()
        self._cond = threading.Condition()
        self._closed = False
        built: Future[LlamaRunner] = Future()
        self._thread = threading.Thread(target=self._run, args=(runner, built), name="loraforge-engine", daemon=True)
        self._thread.start()
        self.runner = built.result()  # the builder's error, if any, is raised here
        self.context_length = self.runner.context_length
        self.max_batch_size = self.runner.max_slots
        self.max_queued_per_tenant = max_queued_per_tenant or 4 * self.max_batch_size

    def _build(self, runner: LlamaRunner | Callable[[], LlamaRunner]) -> None:
        """The model and what works on it (on the engine's thread, before its loop starts)."""
        self.runner = runner if isinstance(runner, LlamaRunner) else runner()
        self.batch = RunningBatch(self.runner)
        self.scheduler = FairScheduler(
            max_batch_size=self.runner.max_slots,
            max_prefill_tokens=self.max_prefill_tokens,
            max_queue_wait_s=self.max_queue_wait_s,
        )
        self.admission = Admission(
            self.batch,
            tokenizer=self.tokenizer,
            prefix_cache=self.prefix_cache,
            max_prefill_tokens=self.max_prefill_tokens,
            advance=self._advance,
        )

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
            queues = self.scheduler.queues
            for tenant in {r.tenant for r in requests}:
                queue = queues.get(tenant, ())
                adding = sum(1 for r in requests if r.tenant == tenant)
                if len(queue) + adding > self.max_queued_per_tenant:
                    raise EngineBusy(
                        f"this tenant already has {len(queue)} requests waiting for a batch slot "
                        f"(at most {self.max_queued_per_tenant}); retry after the running ones finish"
                    )
            for gen in gens:
                queues.setdefault(gen.request.tenant, deque()).append(gen)
            self._cond.notify()
        return gens

    @property
    def kv_positions(self) -> int:
        """Positions of keys and values one request may fill (the pool's memory budget)."""
        return min(self.context_length, self.runner.max_capacity)

    @property
    def preemptions(self) -> int:
        """Rows taken out of the batch so far to give another tenant its share."""
        return self.scheduler.preemptions

    def stats(self) -> dict[str, int]:
        with self._cond:
            queued = self.scheduler.queued() + sum(len(p) for p in self.scheduler.parked.values())
        out = {"queue_depth": queued, "batch_size": len(self.batch.rows), "preemptions": self.preemptions}
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
            self._build(runner)
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
                waiting = self.scheduler.drain()
            message = "the server is shutting down" if self.died is None else "the inference engine stopped"
            for gen in {id(g): g for g in [*waiting, *(r.gen for r in self.batch.rows)]}.values():
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
        batch = self.batch
        with self._cond:
            while not self._closed and not self.scheduler.waiting() and not batch.rows and not self._calls:
                self._cond.wait()
            if self._closed:
                return False
            calls = list(self._calls)
            self._calls.clear()
            waits = self.pacer.plan(Counter(r.tenant for r in batch.rows), self.scheduler.tenants())
            admitted = self.scheduler.schedule(batch, waits)
        if calls:
            with torch.inference_mode(False):  # what the calls make is kept beyond this step
                self._run_calls(calls)
        started = time.perf_counter()
        for gen in admitted:
            if isinstance(gen, Generation) and gen.request.params.max_tokens == 0 and not chunked(gen):
                batch.guarded(functools.partial(self.admission.score, gen), gen)
        generating = [w for w in admitted if chunked(w) or gen_of(w).request.params.max_tokens > 0]
        if generating:
            try:
                self.admission.admit(generating)  # fails the requests that fail, one by one
            except Exception:  # a bug past that: fail what was being admitted, keep the engine
                log.exception("admission failed")
                for gen in {id(gen_of(w)): gen_of(w) for w in generating}.values():
                    batch.fail(gen)
        tokens = Counter[str]()
        for work in admitted:
            tokens[gen_of(work).request.tenant] += whole_prefill(work)
        try:
            tokens += self.admission.continue_prefills(tokens.total(), self.pacer.step_s, self.pacer)
        except Exception:  # fail the prompts being prefilled, keep the others
            log.exception("chunked prefill failed")
            for gen in {id(r.gen): r.gen for r in batch.rows if r.prompt_open}.values():
                batch.fail(gen)
        self.pacer.charge(time.perf_counter() - started, tokens)
        self._outbox.flush()  # first tokens out before the next decode step
        try:
            batch.drop_cancelled()
            if batch.rows:
                self._step()
            elif not self.scheduler.waiting():
                self.runner.release()
        except Exception:  # keep serving: fail the rows of this step, not the engine
            log.exception("engine step failed")
            for gen in {id(r.gen): r.gen for r in batch.rows}.values():
                batch.fail(gen)
            batch.rows.clear()
            self.runner.release()
        return True

    def _step(self) -> None:
        started = time.perf_counter()
        rows = self.batch.rows
        logits = self.runner.decode([r.last for r in rows], [r.position for r in rows], self.batch.segments())
        self.steps += 1
        self._advance(list(rows), logits)
        self.pacer.record_step(Counter(r.tenant for r in rows), time.perf_counter() - started)
        if self.observer:
            self.observer.step(len(rows), self.scheduler.queued(), time.perf_counter() - started)

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Pick each row's next token from ``logits`` (one row per entry), emit it, retire finished rows.

        An error with one row (its sampling, its text) fails that row's request only.
        """
        failed: list[Generation] = []
        for i, row in enumerate(rows):  # prompt scores first: the model's own logits, before any mask
            if row.prompt_open and row.scores is not None:
                try:
                    score_prompt(row, logits[i : i + 1], row.position)
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
        finished: list[tuple[Row, str, str]] = []
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
                    self.admission.close_prompt(row)  # it fed the last one: these logits pick the first token
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
            self.batch.remove(self.batch.rows.index(row))
            close_choice(row.gen)
        for gen in {id(g): g for g in failed}.values():
            self.batch.fail(gen)

    def _next_token(
        self, row: Row, greedy: int, logits: torch.Tensor, logprobs: torch.Tensor | None
    ) -> tuple[str, str] | None:
        """Choose, emit and feed ``row``'s next token; returns (finish reason, held-back text) when it ends."""
        params = row.gen.request.params
        if params.max_tokens == 0:  # scoring with echo: the prompt's scores were all it asked for
            return "length", ""
        token = greedy
        if row.generator is not None:
            token = sample(logits, params.temperature, params.top_p, row.generator)
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
