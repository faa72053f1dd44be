"""A call's way through the engine: admitted, submitted, its events read, and settled.

Admission runs the cheapest checks first (the key's request limits, the model's name, the prompts'
size, the key's token budget, and last the adapter's load); the events of a call's generations are
read within the request timeout; settling a call meters it (usage, metrics, one log line).
Nothing here imports FastAPI: errors are :class:`APIError` (``api_errors.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from loraforge.govern.pilot import user_hash
from loraforge.serve.adapter_cache import LoadedAdapter
from loraforge.serve.adapters import Registration
from loraforge.serve.api_errors import APIError, engine_unavailable
from loraforge.serve.catalog import ModelCatalog
from loraforge.serve.generation import (
    Engine,
    EngineBusy,
    EngineUnavailable,
    ErrorEvent,
    FinishEvent,
    Generation,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from loraforge.serve.guarding import InputGuard
from loraforge.serve.keys import KeyRecord
from loraforge.serve.limits import LimitExceeded, RateLimiter
from loraforge.serve.observe import BASE, MAX_ANSWER_CHARS, Observer
from loraforge.serve.telemetry import Metrics
from loraforge.serve.usage import UsageLedger

log = logging.getLogger("loraforge.serve")


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
    route: str | None = None  # the route called, when the model was one
    pilot: int | None = None  # the route's pilot, when one took the request
    arm: str | None = None
    user_hash: str | None = None  # the end user's pseudonym (``govern.pilot.user_hash``)
    prompt_text: str | None = None  # what the user asked (input drift); None for token-id prompts
    answer: str | None = None  # the first choice's text, up to ``MAX_ANSWER_CHARS`` (refusals)

    def heard(self, text: str) -> None:
        """Keep the start of the first choice's answer."""
        have = self.answer or ""
        if len(have) < MAX_ANSWER_CHARS:
            self.answer = have + text[: MAX_ANSWER_CHARS - len(have)]


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


class CallGate:
    """Where calls enter the engine and leave it, within each key's limits.

    Args:
        catalog: resolves a call's model and loads its adapter.
        default_max_tokens: a call's ``max_tokens`` when it names none (within the context).
        request_timeout_s: a call not finished within this time gets a 408.
        max_echo_tokens: the longest prompt scored with echo.
        guard: checks requests' messages under the server's guard policy (None: no guard).
    """

    def __init__(
        self,
        engine: Engine,
        catalog: ModelCatalog,
        *,
        limiter: RateLimiter,
        usage: UsageLedger,
        metrics: Metrics,
        observer: Observer,
        default_max_tokens: int,
        request_timeout_s: float,
        max_echo_tokens: int,
        guard: InputGuard | None = None,
    ) -> None:
        self.guard = guard
        self.engine = engine
        self.catalog = catalog
        self.limiter = limiter
        self.usage = usage
        self.metrics = metrics
        self.observer = observer
        self.default_max_tokens = default_max_tokens
        self.request_timeout_s = request_timeout_s
        self.max_echo_tokens = max_echo_tokens

    async def start(
        self,
        key: KeyRecord,
        model: str,
        tokenize: Callable[[], list[list[int]]],
        max_tokens: int | None,
        n: int,
        *,
        echo: bool = False,
        count: int = 1,
        user: str | None = None,
        text: str | None = None,
        screen: Sequence[tuple[str, str]] = (),
    ) -> tuple[Call, list[list[int]], int]:
        """Admit a request, cheapest checks first: the key's request limits, the model's name,
        then (off the event loop) the prompts' tokens, their size, the key's token budget, and
        last the adapter's load. Returns the call, the prompts' token ids and the resolved max_tokens.

        Args:
            count: how many prompts ``tokenize`` will give (checked against the batch before it runs).
            user: the end user's id (the request's ``user``): their pilot arm, and their feedback's group.
            text: what the prompt asks, in words (input drift); None for token ids.
            screen: (role, text) of the messages the guard checks (when the server has one).
        """
        try:
            self.limiter.begin(key.id)
        except LimitExceeded as e:
            raise APIError(429, str(e), code="rate_limit_exceeded", retry_after=e.retry_after) from e
        reserved = 0
        request_id = uuid.uuid4().hex[:24]
        try:
            person = user_hash(key.tenant, user) if user else None
            target = self.catalog.target(key, model, person)
            reg = target.registration
            self._check_count(count, n)
            if self.guard is not None and screen:
                await self.guard.screen(key, model, request_id, screen)
            prompts = await asyncio.to_thread(tokenize)
            max_tokens = self._check_size(prompts, max_tokens, n, echo=echo)
            reserved = sum(len(p) for p in prompts) + max_tokens * n * len(prompts)
            try:
                self.limiter.reserve(key.id, reserved)
            except LimitExceeded as e:
                reserved = 0
                raise APIError(429, str(e), code="rate_limit_exceeded", retry_after=e.retry_after) from e
            adapter = None if reg is None else await self.catalog.load(reg, key)
        except BaseException:
            self.limiter.end(key.id, reserved, 0)
            raise
        call = Call(
            request_id=request_id,
            key=key,
            model=model,
            adapter=adapter,
            prompt_tokens=sum(len(p) for p in prompts),
            reserved=reserved,
            started=time.perf_counter(),
            route=target.route,
            pilot=target.pilot,
            arm=target.arm,
            user_hash=person,
            prompt_text=text,
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

    def finish(self, call: Call, status: int) -> None:
        """Settle a call: its key's limits, its usage row, its metrics and one log line."""
        self.limiter.end(call.key.id, call.reserved, call.prompt_tokens + call.completion_tokens)
        latency = time.perf_counter() - call.started
        reg = call.adapter.registration if call.adapter else None
        seen = self.observer.observe(reg, call.prompt_text, call.answer if status < 400 else None)
        entry = self.usage.record(
            request_id=call.request_id,
            tenant=call.key.tenant,
            key_id=call.key.id,
            model=call.model,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            adapter=reg.name if reg else None,
            route=call.route,
            pilot_id=call.pilot,
            arm=call.arm,
            user_hash=call.user_hash,
            status=status,
            latency_s=round(latency, 4),
            refusal=seen.refusal,
            novelty=seen.novelty,
            unfamiliar=seen.unfamiliar,
        )
        m, label = self.metrics, reg.name if reg else BASE
        m.prompt_tokens.labels(call.key.tenant, call.model).inc(call.prompt_tokens)
        m.completion_tokens.labels(call.key.tenant, call.model).inc(call.completion_tokens)
        m.cost.labels(call.key.tenant, call.model).inc(entry["cost"])
        m.model_requests.labels(call.model, label, str(status)).inc()
        m.model_latency.labels(call.model, label).observe(latency)
        if call.route is not None and call.arm is not None:
            m.pilot_requests.labels(call.route, call.arm).inc()
        if call.first_token is not None:
            m.ttft.observe(call.first_token - call.started)
        log.info(
            "request finished",
            extra={
                "fields": {
                    "request_id": call.request_id,
                    "tenant": call.key.tenant,
                    "key_id": call.key.id,
                    "model": call.model,
                    "adapter": reg.name if reg else None,
                    "arm": call.arm,
                    "status": status,
                    "prompt_tokens": call.prompt_tokens,
                    "completion_tokens": call.completion_tokens,
                    "cost": entry["cost"],
                    "latency_s": round(latency, 4),
                    "ttft_s": round(call.first_token - call.started, 4) if call.first_token else None,
                }
            },
        )

    def submit(self, call: Call, prompts: list[list[int]], params: SamplingParams, n: int) -> list[Generation]:
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
            self.finish(call, 400)
            raise APIError(400, str(e), param="n") from e
        except EngineBusy as e:
            self.finish(call, 429)
            raise APIError(429, str(e), code="queue_full", retry_after=e.retry_after) from e
        except EngineUnavailable as e:
            self.finish(call, 503)
            raise engine_unavailable() from e

    async def events(self, call: Call, gens: list[Generation]) -> AsyncIterator[tuple[int, Any]]:
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
                if isinstance(event, (TokenEvent, FinishEvent)) and i == 0 and event.index == 0 and event.text:
                    call.heard(event.text)
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
