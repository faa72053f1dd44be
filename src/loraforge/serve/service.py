"""What the API does, without HTTP: resolve the caller's model, enforce limits, run, meter.

Routers (``app.py``) parse and authenticate, then call an ``InferenceService``; everything that
can go wrong here raises ``APIError``, which the app's one exception handler turns into
OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from loraforge.data.templates import render
from loraforge.errors import LoraforgeError, ModelError
from loraforge.serve.adapters import AdapterCache, AdapterStore, LoadedAdapter, Registration
from loraforge.serve.engine import (
    Engine,
    EngineBusy,
    EngineUnavailable,
    ErrorEvent,
    FinishEvent,
    Generation,
    GenerationRequest,
    PromptEvent,
    SamplingParams,
    TokenEvent,
)
from loraforge.serve.keys import KeyRecord
from loraforge.serve.limits import LimitExceeded, RateLimiter
from loraforge.serve.metrics import Metrics
from loraforge.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, chat_logprob_entry
from loraforge.serve.usage import UsageLedger

log = logging.getLogger("loraforge.serve")

STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(LoraforgeError):
    """An error answered to the client as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": STATUS_TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/:]+/)*([^\s'\"/:]+)")


def public_message(error: Exception) -> str:
    """``error``'s message without absolute paths (each becomes its last component): what a
    client may read about a file of the server's."""
    return _PATH.sub(r"\1", str(error))


def engine_unavailable() -> APIError:
    return APIError(503, "the inference engine is not running; retry shortly", code="engine_down", retry_after=5)


def not_found(model: str) -> APIError:
    # The same answer for a missing adapter and another tenant's adapter: no existence leak.
    return APIError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


@dataclass
class _Choice:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Call:
    """One accepted request: who, on what, with how many tokens reserved."""

    request_id: str
    key: KeyRecord
    model: str
    adapter: LoadedAdapter | None
    prompt_tokens: int
    reserved: int
    started: float
    first_token: float | None = None
    completion_tokens: int = 0


def cache_scope(tenant: str, adapter: Registration | None) -> str:
    """Who may reuse whose cached prompt prefixes: one tenant, one registration of an adapter (or the base).

    Keys and values depend on the adapter's weights and on its config (the LoRA scale), so the
    scope names the registration: its name, weights checksum and time of registration (a name
    registered again, with other weights or another config, starts a new scope). The tenant is in
    it so that no tenant's time to first token can tell whether another tenant sent a prompt.
    """
    if adapter is None:
        return f"{tenant}\x00base"
    return f"{tenant}\x00{adapter.name}\x00{adapter.weights_sha256}\x00{adapter.added_at!r}"


class InferenceService:
    def __init__(
        self,
        engine: Engine,
        *,
        store: AdapterStore,
        cache: AdapterCache | None,
        limiter: RateLimiter,
        usage: UsageLedger,
        metrics: Metrics,
        default_max_tokens: int,
        request_timeout_s: float,
        created: int,
        max_echo_tokens: int = 1024,
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.vocab_size = len(self.tokenizer)
        self._pieces: dict[int, str] = {}  # at most one entry per token id of the vocabulary
        self.store = store
        self.cache = cache
        self.limiter = limiter
        self.usage = usage
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.request_timeout_s = request_timeout_s
        self.created = created
        self.max_echo_tokens = max_echo_tokens

    # -- models -------------------------------------------------------------------------------

    def models(self, key: KeyRecord) -> list[ModelCard]:
        base = self.engine.model_id
        cards = [ModelCard(id=base, created=self.created, owned_by="loraforge", root=base)]
        admin = key.role == "admin"
        for reg in self.store.registrations():
            if reg.visible_to(key.tenant):
                cards.append(
                    ModelCard(
                        id=reg.name,
                        created=int(reg.added_at),
                        owned_by="public" if reg.public else reg.tenant or "",
                        parent=base,
                        root=base,
                        governance_flags=list(reg.governance_flags) if admin else None,
                        governance_override=reg.governance_override if admin else None,
                    )
                )
        return cards

    def model(self, key: KeyRecord, name: str) -> ModelCard:
        for card in self.models(key):
            if card.id == name:
                return card
        raise not_found(name)

    def registration(self, key: KeyRecord, model: str) -> Registration | None:
        """The adapter registration the caller may use under the name ``model`` (None = the base model)."""
        if model == self.engine.model_id:
            return None
        reg = self.store.get(model)
        if reg is None or not reg.visible_to(key.tenant):
            raise not_found(model)
        return reg

    async def resolve(self, key: KeyRecord, model: str) -> LoadedAdapter | None:
        """The adapter the caller may use under the name ``model`` (None = the base model), in memory."""
        reg = self.registration(key, model)
        return None if reg is None else await self.load(reg, key)

    async def load(self, reg: Registration, key: KeyRecord | None = None) -> LoadedAdapter:
        """The registered adapter in memory, loaded (and verified) on first use.

        A load from disk counts against ``key``'s adapter loads per minute; the place it takes in
        memory is charged to ``key``'s tenant.
        """
        if self.cache is None:
            raise not_found(reg.name)
        if key is not None and not self.cache.is_loaded(reg):
            try:
                self.limiter.load_adapter(key.id)
            except LimitExceeded as e:
                raise APIError(429, str(e), code="adapter_load_limit", retry_after=e.retry_after) from e
        tenant = key.tenant if key is not None else None
        try:
            return await asyncio.to_thread(self.cache.get, reg, tenant)
        except EngineUnavailable as e:
            raise engine_unavailable() from e
        except ModelError as e:
            log.warning("adapter %s cannot be served: %s", reg.name, e)
            raise APIError(
                400, f"The model '{reg.name}' cannot be served: {public_message(e)}", code="model_incompatible"
            ) from e

    # -- admission ----------------------------------------------------------------------------

    async def _start(
        self,
        key: KeyRecord,
        model: str,
        tokenize: Callable[[], list[list[int]]],
        max_tokens: int | None,
        n: int,
        *,
        echo: bool = False,
        count: int = 1,
    ) -> tuple[Call, list[list[int]], int]:
        """Admit a request, cheapest checks first: the key's request limits, the model's name,
        then (off the event loop) the prompts' tokens, their size, the key's token budget, and
        last the adapter's load. Returns the call, the prompts' token ids and the resolved max_tokens.

        Args:
            count: how many prompts ``tokenize`` will give (checked against the batch before it runs).
        """
        try:
            self.limiter.begin(key.id)
        except LimitExceeded as e:
            raise APIError(429, str(e), code="rate_limit_exceeded", retry_after=e.retry_after) from e
        reserved = 0
        try:
            reg = self.registration(key, model)
            self._check_count(count, n)
            prompts = await asyncio.to_thread(tokenize)
            max_tokens = self._check_size(prompts, max_tokens, n, echo=echo)
            reserved = sum(len(p) for p in prompts) + max_tokens * n * len(prompts)
            try:
                self.limiter.reserve(key.id, reserved)
            except LimitExceeded as e:
                reserved = 0
                raise APIError(429, str(e), code="rate_limit_exceeded", retry_after=e.retry_after) from e
            adapter = None if reg is None else await self.load(reg, key)
        except BaseException:
            self.limiter.end(key.id, reserved, 0)
            raise
        call = Call(
            request_id=f"{uuid.uuid4().hex[:24]}",
            key=key,
            model=model,
            adapter=adapter,
            prompt_tokens=sum(len(p) for p in prompts),
            reserved=reserved,
            started=time.perf_counter(),
        )
        return call, prompts, max_tokens

    def _check_count(self, count: int, n: int) -> None:
        batch = self.engine.max_batch_size
        if count * n > batch:
            raise APIError(
                400,
                f"{count} prompts × n={n} make {count * n} generations; this server runs at most "
                f"{batch} at once (max_batch_size). Send fewer prompts per request",
                param="prompt",
                code="too_many_prompts",
            )

    def _check_size(self, prompts: list[list[int]], max_tokens: int | None, n: int, *, echo: bool) -> int:
        """Refuse work the server will not take on; returns ``max_tokens`` resolved."""
        if min(len(p) for p in prompts) == 0:
            raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        context = self.engine.context_length
        longest = max(len(p) for p in prompts)
        if echo and longest > self.max_echo_tokens:
            raise APIError(
                400,
                f"echo with logprobs scores every prompt token; this server does it for prompts of at most "
                f"{self.max_echo_tokens} tokens (max_echo_tokens), and this one has {longest}",
                param="prompt",
                code="echo_prompt_too_long",
            )
        if max_tokens is None:
            max_tokens = max(1, min(self.default_max_tokens, context - longest))
        if longest + max_tokens > context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the completion). "
                "Please reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        positions = self.engine.kv_positions
        if longest + max_tokens > positions:
            raise APIError(
                503,
                f"this request needs {longest + max_tokens} positions of key/value memory, but the server's "
                f"budget (kv_cache_mb) holds {positions} per request; send a shorter prompt or a lower max_tokens",
                param="max_tokens",
                code="kv_budget_exceeded",
                retry_after=1,
            )
        return max_tokens

    def _finish(self, call: Call, status: int) -> None:
        self.limiter.end(call.key.id, call.reserved, call.prompt_tokens + call.completion_tokens)
        entry = self.usage.record(
            request_id=call.request_id,
            tenant=call.key.tenant,
            key_id=call.key.id,
            model=call.model,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
        )
        self.metrics.prompt_tokens.labels(call.key.tenant, call.model).inc(call.prompt_tokens)
        self.metrics.completion_tokens.labels(call.key.tenant, call.model).inc(call.completion_tokens)
        if call.first_token is not None:
            self.metrics.ttft.observe(call.first_token - call.started)
        log.info(
            "request finished",
            extra={
                "fields": {
                    "request_id": call.request_id,
                    "tenant": call.key.tenant,
                    "key_id": call.key.id,
                    "model": call.model,
                    "status": status,
                    "prompt_tokens": call.prompt_tokens,
                    "completion_tokens": call.completion_tokens,
                    "cost": entry["cost"],
                    "latency_s": round(time.perf_counter() - call.started, 4),
                    "ttft_s": round(call.first_token - call.started, 4) if call.first_token else None,
                }
            },
        )

    def _submit(self, call: Call, prompts: list[list[int]], params: SamplingParams, n: int) -> list[Generation]:
        """Hand the prompts to the engine, all or none; on failure the call is settled."""
        adapter = call.adapter.registration if call.adapter else None
        requests = [
            GenerationRequest(
                request_id=call.request_id,
                prompt=prompt,
                params=params,
                adapter=adapter.name if adapter else None,
                lora=call.adapter.lora if call.adapter else None,
                n=n,
                cache_scope=cache_scope(call.key.tenant, adapter),
                tenant=call.key.tenant,
            )
            for prompt in prompts
        ]
        try:
            return self.engine.submit_all(requests)
        except ValueError as e:  # more choices than the engine's batch can hold
            self._finish(call, 400)
            raise APIError(400, str(e), param="n") from e
        except EngineBusy as e:
            self._finish(call, 429)
            raise APIError(429, str(e), code="queue_full", retry_after=e.retry_after) from e
        except EngineUnavailable as e:
            self._finish(call, 503)
            raise engine_unavailable() from e

    async def _events(self, call: Call, gens: list[Generation]) -> AsyncIterator[tuple[int, Any]]:
        """Events of all generations, tagged with the generation's position, within the timeout."""
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(i: int, gen: Generation) -> None:
            async for event in gen.events():
                await queue.put((i, event))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        open_ = len(gens)
        deadline = call.started + self.request_timeout_s
        try:
            while open_:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise TimeoutError
                i, event = await asyncio.wait_for(queue.get(), remaining)
                if event is None:
                    open_ -= 1
                    continue
                if isinstance(event, ErrorEvent):
                    raise APIError(event.status, event.message, code="engine_error", retry_after=5)
                if isinstance(event, TokenEvent) and call.first_token is None:
                    call.first_token = time.perf_counter()
                if isinstance(event, TokenEvent):
                    call.completion_tokens += 1
                yield i, event
        except TimeoutError as e:
            raise APIError(
                408, f"the request did not finish within {self.request_timeout_s:g} s", code="timeout"
            ) from e
        finally:
            for g in gens:
                g.cancel()
            for t in tasks:
                t.cancel()

    # -- chat ---------------------------------------------------------------------------------

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            text = render(self.tokenizer, messages, generation_prompt=True)
        except Exception as e:  # the template rejected the conversation (e.g. role order)
            raise APIError(
                400, f"the messages cannot be rendered with the model's chat template: {e}", param="messages"
            ) from e
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def chat(self, key: KeyRecord, req: ChatCompletionRequest) -> tuple[Call, AsyncIterator[dict[str, Any]]]:
        """Start a chat completion. Returns the call and its stream of response chunks
        (streaming) or a one-item stream with the whole response."""
        call, (prompt,), max_tokens = await self._start(
            key, req.model, lambda: [self.chat_prompt(req)], req.max_completion_tokens or req.max_tokens, req.n
        )
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=req.stop_list(),
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        )
        (gen,) = self._submit(call, [prompt], params, req.n)
        stream = self._chat_stream(call, req, gen) if req.stream else self._chat_whole(call, req, gen)
        return call, self._settled(call, stream)

    async def _settled(self, call: Call, stream: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        status = 200
        try:
            async for item in stream:
                yield item
        except APIError as e:
            status = e.status
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away
            raise
        finally:
            self._finish(call, status)

    def _usage(self, call: Call) -> dict[str, int]:
        return {
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": call.completion_tokens,
            "total_tokens": call.prompt_tokens + call.completion_tokens,
        }

    def _piece(self, token: int) -> str:
        """One token's text, decoded once per token id (logprobs name thousands of them per response)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = str(self.tokenizer.decode([token]))
        return piece

    def _top(self, top: list[tuple[int, float]] | None) -> list[tuple[str, float]] | None:
        return [(self._piece(t), lp) for t, lp in top] if top is not None else None

    async def _chat_whole(
        self, call: Call, req: ChatCompletionRequest, gen: Generation
    ) -> AsyncIterator[dict[str, Any]]:
        choices = [_Choice() for _ in range(req.n)]
        async for _, event in self._events(call, [gen]):
            if isinstance(event, TokenEvent):
                c = choices[event.index]
                c.text += event.text
                if event.logprob is not None:
                    c.tokens.append(event.token)
                    c.logprobs.append(event.logprob)
                    c.top.append(event.top_logprobs)
            elif isinstance(event, FinishEvent):
                choices[event.index].text += event.text
                choices[event.index].finish_reason = event.reason
        out = []
        for i, c in enumerate(choices):
            logprobs = None
            if req.logprobs:
                logprobs = {
                    "content": [
                        chat_logprob_entry(self._piece(t), lp or 0.0, self._top(top))
                        for t, lp, top in zip(c.tokens, c.logprobs, c.top, strict=True)
                    ]
                }
            out.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "logprobs": logprobs,
                }
            )
        yield _body(call, "chat.completion", out, usage=self._usage(call))

    async def _chat_stream(
        self, call: Call, req: ChatCompletionRequest, gen: Generation
    ) -> AsyncIterator[dict[str, Any]]:
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
            body = _body(call, "chat.completion.chunk", choices, created=created)
            if req.stream_options and req.stream_options.include_usage:
                body["usage"] = usage
            return body

        for i in range(req.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for _, event in self._events(call, [gen]):
            if isinstance(event, TokenEvent):
                if not event.text and event.logprob is None:
                    continue
                choice: dict[str, Any] = {"index": event.index, "delta": {"content": event.text}, "finish_reason": None}
                if req.logprobs and event.logprob is not None:
                    entry = chat_logprob_entry(self._piece(event.token), event.logprob, self._top(event.top_logprobs))
                    choice["logprobs"] = {"content": [entry]}
                yield chunk([choice])
            elif isinstance(event, FinishEvent):
                delta = {"content": event.text} if event.text else {}
                yield chunk([{"index": event.index, "delta": delta, "finish_reason": event.reason}])
        if req.stream_options and req.stream_options.include_usage:
            yield {**chunk([], self._usage(call)), "choices": []}

    # -- completions --------------------------------------------------------------------------

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        try:
            prompts = req.prompts()
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(list(self.tokenizer(p)["input_ids"]))
            else:
                if p and (min(p) < 0 or max(p) >= self.vocab_size):
                    raise APIError(400, f"prompt token ids must lie in 0..{self.vocab_size - 1}", param="prompt")
                out.append(list(p))
        return out

    async def completion(self, key: KeyRecord, req: CompletionRequest) -> tuple[Call, AsyncIterator[dict[str, Any]]]:
        if req.max_tokens == 0 and req.stream:
            raise APIError(400, "max_tokens 0 (scoring the prompt) cannot be streamed", param="stream")
        try:
            count = len(req.prompts())
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e
        call, prompts, max_tokens = await self._start(
            key,
            req.model,
            lambda: self.completion_prompts(req),
            req.max_tokens,
            req.n,
            echo=req.echo and req.logprobs is not None,
            count=count,
        )
        want = req.logprobs
        params = SamplingParams(
            max_tokens=max_tokens if req.max_tokens != 0 else 0,
            min_tokens=req.min_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=req.stop_list(),
            logprobs=want,
            prompt_logprobs=req.echo and want is not None,
        )
        gens = self._submit(call, prompts, params, req.n)
        stream = (
            self._completion_stream(call, req, gens) if req.stream else self._completion_whole(call, req, prompts, gens)
        )
        return call, self._settled(call, stream)

    async def _completion_whole(
        self, call: Call, req: CompletionRequest, prompts: list[list[int]], gens: list[Generation]
    ) -> AsyncIterator[dict[str, Any]]:
        n = req.n
        choices = [_Choice() for _ in range(len(prompts) * n)]
        prompt_scores: dict[int, PromptEvent] = {}
        async for g, event in self._events(call, gens):
            if isinstance(event, PromptEvent):
                prompt_scores[g] = event
            elif isinstance(event, TokenEvent):
                c = choices[g * n + event.index]
                c.text += event.text
                c.tokens.append(event.token)
                c.logprobs.append(event.logprob)
                c.top.append(event.top_logprobs)
            elif isinstance(event, FinishEvent):
                choices[g * n + event.index].text += event.text
                choices[g * n + event.index].finish_reason = event.reason
        out = []
        for i, c in enumerate(choices):
            g = i // n
            prompt_text = str(self.tokenizer.decode(prompts[g])) if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                tokens, lps, tops = list(c.tokens), list(c.logprobs), list(c.top)
                if req.echo and g in prompt_scores:
                    pe = prompt_scores[g]
                    tokens, lps, tops = pe.tokens + tokens, pe.logprobs + lps, pe.top_logprobs + tops
                logprobs = self._completion_logprobs(tokens, lps, tops)
            out.append(
                {
                    "index": i,
                    "text": prompt_text + c.text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason or "length",
                }
            )
        yield _body(call, "text_completion", out, usage=self._usage(call))

    def _completion_logprobs(
        self, tokens: list[int], logprobs: list[float | None], tops: list[list[tuple[int, float]] | None]
    ) -> dict[str, Any]:
        pieces = [self._piece(t) for t in tokens]
        offsets, at = [], 0
        for p in pieces:
            offsets.append(at)
            at += len(p)
        return {
            "tokens": pieces,
            "token_logprobs": logprobs,
            "top_logprobs": [None if top is None else {self._piece(t): lp for t, lp in top} for top in tops],
            "text_offset": offsets,
        }

    async def _completion_stream(
        self, call: Call, req: CompletionRequest, gens: list[Generation]
    ) -> AsyncIterator[dict[str, Any]]:
        created = int(time.time())

        def chunk(index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            return _body(call, "text_completion", [choice], created=created)

        async for g, event in self._events(call, gens):
            index = g * req.n + getattr(event, "index", 0)
            if isinstance(event, TokenEvent):
                lp = None
                if req.logprobs is not None:
                    lp = self._completion_logprobs([event.token], [event.logprob], [event.top_logprobs])
                if event.text or lp:
                    yield chunk(index, event.text, None, lp)
            elif isinstance(event, FinishEvent):
                yield chunk(index, event.text, event.reason)
        if req.stream_options and req.stream_options.include_usage:
            yield _body(call, "text_completion", [], created=created, usage=self._usage(call))


def _body(
    call: Call,
    kind: str,
    choices: list[dict[str, Any]],
    *,
    created: int | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A response or stream chunk of ``kind`` (OpenAI's ``object`` field) around ``choices``."""
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    body: dict[str, Any] = {
        "id": f"{prefix}-{call.request_id}",
        "object": kind,
        "created": created or int(time.time()),
        "model": call.model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def sse(item: dict[str, Any]) -> str:
    return f"data: {json.dumps(item, separators=(',', ':'))}\n\n"
