"""What the API does, without HTTP: resolve the caller's model, enforce limits, run, meter.

Routers (``app.py``) parse and authenticate, then call an ``InferenceService``; everything that
can go wrong here raises ``APIError``, which the app's one exception handler turns into
OpenAI's error shape.

This module shapes the OpenAI endpoints (chat completions and completions, whole or streamed); which
models a caller may use is ``catalog.py``, and a call's way into the engine and out (limits, sizes,
submission, events, metering) is ``calls.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from loraforge.data.drift import DEFAULT_WINDOW, prompt_texts
from loraforge.data.templates import render
from loraforge.serve.adapter_cache import AdapterCache
from loraforge.serve.adapters import AdapterStore
from loraforge.serve.api_errors import APIError
from loraforge.serve.calls import Call, CallGate
from loraforge.serve.catalog import ModelCatalog
from loraforge.serve.generation import (
    Engine,
    FinishEvent,
    Generation,
    PromptEvent,
    SamplingParams,
    TokenEvent,
)
from loraforge.serve.guarding import InputGuard
from loraforge.serve.keys import KeyRecord
from loraforge.serve.limits import RateLimiter
from loraforge.serve.observe import Observer
from loraforge.serve.protocol import ChatCompletionRequest, CompletionRequest, chat_logprob_entry
from loraforge.serve.telemetry import Metrics
from loraforge.serve.usage import UsageLedger


class InferenceService:
    """The OpenAI-compatible inference endpoints over an engine.

    ``catalog`` answers which models a key may use (``/v1/models``) and loads adapters; ``calls``
    admits, runs and meters each request.
    """

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
        monitor_window: int = DEFAULT_WINDOW,
        guard: InputGuard | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.vocab_size = len(self.tokenizer)
        self._pieces: dict[int, str] = {}  # at most one entry per token id of the vocabulary
        self.limiter = limiter
        self.usage = usage
        self.catalog = ModelCatalog(engine, store=store, cache=cache, limiter=limiter, created=created)
        self.observer = Observer(store, metrics, window=monitor_window)
        self.calls = CallGate(
            engine,
            self.catalog,
            limiter=limiter,
            usage=usage,
            metrics=metrics,
            observer=self.observer,
            default_max_tokens=default_max_tokens,
            request_timeout_s=request_timeout_s,
            max_echo_tokens=max_echo_tokens,
            guard=guard,
        )

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            text = render(self.tokenizer, messages, generation_prompt=True)
        except Exception as e:  # the template rejected the conversation (e.g. role order)
            raise APIError(
                400, f"the messages cannot be rendered with the model's chat template: {e}", param="messages"
            ) from e
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def chat(
        self, key: KeyRecord, req: ChatCompletionRequest, *, user: str | None = None
    ) -> tuple[Call, AsyncIterator[dict[str, Any]]]:
        """Start a chat completion. Returns the call and its stream of response chunks
        (streaming) or a one-item stream with the whole response.

        Args:
            user: the end user's id (the request's ``user`` field, else the ``X-End-User`` header).
        """
        call, (prompt,), max_tokens = await self.calls.start(
            key,
            req.model,
            lambda: [self.chat_prompt(req)],
            req.max_completion_tokens or req.max_tokens,
            req.n,
            user=req.user or user,
            text=prompt_texts((m.role, m.text()) for m in req.messages),
            screen=[(m.role, m.text()) for m in req.messages],
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
        (gen,) = self.calls.submit(call, [prompt], params, req.n)
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
            self.calls.finish(call, status)

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
        choices = [Choice() for _ in range(req.n)]
        async for _, event in self.calls.events(call, [gen]):
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
        yield response_body(call, "chat.completion", out, usage=self._usage(call))

    async def _chat_stream(
        self, call: Call, req: ChatCompletionRequest, gen: Generation
    ) -> AsyncIterator[dict[str, Any]]:
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
            body = response_body(call, "chat.completion.chunk", choices, created=created)
            if req.stream_options and req.stream_options.include_usage:
                body["usage"] = usage
            return body

        for i in range(req.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for _, event in self.calls.events(call, [gen]):
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

    async def completion(
        self, key: KeyRecord, req: CompletionRequest, *, user: str | None = None
    ) -> tuple[Call, AsyncIterator[dict[str, Any]]]:
        if req.max_tokens == 0 and req.stream:
            raise APIError(400, "max_tokens 0 (scoring the prompt) cannot be streamed", param="stream")
        try:
            texts = req.prompts()
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e
        words = "\n".join(p for p in texts if isinstance(p, str))
        call, prompts, max_tokens = await self.calls.start(
            key,
            req.model,
            lambda: self.completion_prompts(req),
            req.max_tokens,
            req.n,
            echo=req.echo and req.logprobs is not None,
            count=len(texts),
            user=req.user or user,
            text=words or None,
            screen=[("user", p) for p in texts if isinstance(p, str)],
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
        gens = self.calls.submit(call, prompts, params, req.n)
        stream = (
            self._completion_stream(call, req, gens) if req.stream else self._completion_whole(call, req, prompts, gens)
        )
        return call, self._settled(call, stream)

    async def _completion_whole(
        self, call: Call, req: CompletionRequest, prompts: list[list[int]], gens: list[Generation]
    ) -> AsyncIterator[dict[str, Any]]:
        n = req.n
        choices = [Choice() for _ in range(len(prompts) * n)]
        prompt_scores: dict[int, PromptEvent] = {}
        async for g, event in self.calls.events(call, gens):
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
        yield response_body(call, "text_completion", out, usage=self._usage(call))

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
            return response_body(call, "text_completion", [choice], created=created)

        async for g, event in self.calls.events(call, gens):
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
            yield response_body(call, "text_completion", [], created=created, usage=self._usage(call))


@dataclass
class Choice:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


def response_body(
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
    if call.adapter is not None:  # which adapter answered: through a route, it changes with deployments
        reg = call.adapter.registration
        body["system_fingerprint"] = f"{reg.name}:{reg.weights_sha256[:12]}"
    if usage is not None:
        body["usage"] = usage
    return body
