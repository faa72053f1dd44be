"""The engine under hostile load: one row's failure is its own, tenants share the batch fairly,
prompt floods cannot stall running streams, and a dead engine refuses work at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loraforge.serve.engine import LocalEngine
from loraforge.serve.forward import LlamaRunner
from loraforge.serve.generation import (
    EngineBusy,
    EngineUnavailable,
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    PromptEvent,
    SamplingParams,
    TokenEvent,
)
from loraforge.serve.sampling import sample
from tests.serve.test_engine import _FakeTokenizer, _runner


def _collect(
    engine: LocalEngine,
    requests: list[GenerationRequest],
    stagger: float = 0.0,
    before_last: Callable[[], Awaitable[None]] | None = None,
) -> list[dict[str, Any]]:
    """Run requests concurrently; per request its tokens, error (if any) and the engine step of its first token.

    ``before_last`` is awaited before the last request is submitted.
    """

    async def one(req: GenerationRequest, delay: float) -> dict[str, Any]:
        await asyncio.sleep(delay)
        if before_last is not None and req is requests[-1]:
            await before_last()
        out: dict[str, Any] = {"error": None, "submitted_step": engine.steps, "first_step": None}
        choices: dict[int, list[int]] = {}
        async for event in engine.submit(req).events():
            if isinstance(event, TokenEvent):
                if out["first_step"] is None:
                    out["first_step"] = engine.steps
                choices.setdefault(event.index, []).append(event.token)
            elif isinstance(event, PromptEvent):
                out["prompt"] = event
            elif isinstance(event, ErrorEvent):
                out["error"] = (event.status, event.message)
            elif isinstance(event, FinishEvent):
                out.setdefault("finish", []).append(event.reason)
        out["tokens"] = [t for i in sorted(choices) for t in choices[i]]  # choice by choice
        return out

    async def all_() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one(r, i * stagger) for i, r in enumerate(requests))))

    return asyncio.run(all_())


def _greedy(max_tokens: int, **extra: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **extra)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    engine = LocalEngine(_runner(tiny_model_dir, slots=4), tokenizer=_FakeTokenizer(), model_id="tiny")
    yield engine
    engine.close()


@pytest.mark.parametrize("temperature", [1e-300, 5e-38, 1e-6])
def test_tiny_temperatures_are_greedy(engine: LocalEngine, temperature: float) -> None:
    prompt = [1, 2, 3, 4]
    greedy = _collect(engine, [GenerationRequest("g", prompt, _greedy(8))])[0]
    tiny = _collect(engine, [GenerationRequest("t", prompt, SamplingParams(max_tokens=8, temperature=temperature))])[0]
    assert tiny["error"] is None and tiny["tokens"] == greedy["tokens"]


@pytest.mark.parametrize(
    "logits",
    [
        torch.tensor([0.0, float("inf"), 1.0]),
        torch.tensor([float("nan"), 2.0, 1.0]),
        torch.tensor([float("-inf"), float("-inf"), 3.0]),
        torch.tensor([1e38, 3e38, -3e38]),
    ],
)
def test_sampling_never_sees_non_finite_probabilities(logits: torch.Tensor) -> None:
    token = sample(logits, 1e-30, 0.9, torch.Generator().manual_seed(0))
    assert token == int(torch.nan_to_num(logits, nan=-float("inf")).argmax())


def test_the_largest_seed_with_several_choices_from_an_idle_engine(engine: LocalEngine) -> None:
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=2**63 - 1)
    engine.runner.release()  # idle: an empty KV pool, as after a quiet spell
    out = _collect(engine, [GenerationRequest("s", [5, 6, 7], params, n=3)])[0]
    assert out["error"] is None and len(out["tokens"]) == 12
    assert engine.alive()


def test_a_failing_row_fails_alone_while_others_run(engine: LocalEngine) -> None:
    """A request that breaks while its tokens are chosen (here: more top logprobs than the
    vocabulary has, which the API would refuse) and one whose prompt breaks the prefill (a token
    id past the vocabulary) fail with a 500 that names nothing of theirs; the requests beside them
    in the same steps finish normally."""
    good = [GenerationRequest(f"ok{i}", [10 + i, 11, 12], _greedy(6)) for i in range(2)]
    bad_sampling = GenerationRequest("bad1", [1, 2, 3], _greedy(6, logprobs=10**7))
    bad_prompt = GenerationRequest("bad2", [1, 2, engine.runner.vocab_size + 5], _greedy(6))
    alone = [_collect(engine, [r])[0]["tokens"] for r in good]
    results = _collect(engine, [good[0], bad_sampling, bad_prompt, good[1]])
    assert [r["tokens"] for r in (results[0], results[3])] == alone
    for failed in (results[1], results[2]):
        assert failed["error"] == (500, "internal engine error; retry the request")
    assert engine.alive()
    assert _collect(engine, [good[0]])[0]["tokens"] == alone[0]  # and it keeps serving


def test_a_tenant_below_its_share_takes_a_slot_from_the_flooding_one(tiny_model_dir: Path) -> None:
    """Tenant A fills every slot with long generations; tenant B's request starts within a step
    or two (A's youngest row is preempted), and every preempted row of A resumes to give exactly
    the tokens it gives when it runs alone."""
    engine = LocalEngine(_runner(tiny_model_dir, slots=4), tokenizer=_FakeTokenizer(), model_id="tiny")
    try:
        flood = [
            GenerationRequest(f"a{i}", [20 + i, 21, 22, 23], _greedy(300), tenant="A", n=1 + (i == 0)) for i in range(3)
        ]
        victim = GenerationRequest("b", [30, 31, 32], _greedy(5), tenant="B")
        alone = [_collect(engine, [r])[0]["tokens"] for r in [*flood, victim]]

        async def when_full() -> None:  # B arrives once A holds every slot
            while engine.stats()["batch_size"] < 4:
                await asyncio.sleep(0.001)

        results = _collect(engine, [*flood, victim], before_last=when_full)
    finally:
        engine.close()
    assert engine.preemptions >= 1
    assert [r["tokens"] for r in results] == alone
    b = results[-1]
    assert b["first_step"] - b["submitted_step"] <= 2


def test_a_tenant_with_too_many_queued_requests_is_refused(tiny_model_dir: Path) -> None:
    engine = LocalEngine(
        _runner(tiny_model_dir, slots=2), tokenizer=_FakeTokenizer(), model_id="tiny", max_queued_per_tenant=3
    )

    async def flood() -> tuple[int, int]:
        accepted = refused = 0
        gens = []
        for i in range(12):
            try:
                gens.append(engine.submit(GenerationRequest(f"f{i}", [1, 2, 3], _greedy(30), tenant="A")))
                accepted += 1
            except EngineBusy:
                refused += 1
        # another tenant still gets in
        other = engine.submit(GenerationRequest("o", [4, 5], _greedy(2), tenant="B"))
        async for _ in other.events():
            pass
        for gen in gens:
            gen.cancel()
        return accepted, refused

    try:
        accepted, refused = asyncio.run(flood())
    finally:
        engine.close()
    assert refused >= 12 - 3 - 2 and accepted <= 5


class _Recording:
    """Wraps a runner: records the prompt tokens prefilled between decode steps."""

    def __init__(self, runner: LlamaRunner) -> None:
        self.runner = runner
        self.between: list[int] = [0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def prefill(self, slot: int, tokens: list[int], *args: Any, **kwargs: Any) -> Any:
        self.between[-1] += len(tokens)
        return self.runner.prefill(slot, tokens, *args, **kwargs)

    def prefill_many(self, slots: Any, prompts: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        self.between[-1] += sum(len(p) for p in prompts)
        return self.runner.prefill_many(slots, prompts, *args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        self.between.append(0)
        return self.runner.decode(*args, **kwargs)


def recording_engine(recording: _Recording, max_prefill_tokens: int) -> LocalEngine:
    """An engine on a recording runner, with room for many queued requests."""
    return LocalEngine(
        lambda: recording,  # type: ignore[arg-type, return-value]
        tokenizer=_FakeTokenizer(),
        model_id="tiny",
        max_prefill_tokens=max_prefill_tokens,
        max_queued_per_tenant=100,
    )


def test_long_prompts_are_prefilled_in_chunks_beside_running_streams(tiny_model_dir: Path) -> None:
    """While a stream decodes, other tenants' long prompts join the batch and are prefilled at most
    ``max_prefill_tokens`` between two steps (one token more within each step); every request gets
    exactly the tokens it gets alone, when its prompt is prefilled in one piece."""
    recording = _Recording(_runner(tiny_model_dir, slots=4))
    engine = recording_engine(recording, max_prefill_tokens=64)
    try:
        stream = GenerationRequest("s", [1, 2, 3], _greedy(60), tenant="B")
        long = [
            GenerationRequest(f"x{i}", [100 + (7 * i + j) % 900 for j in range(200)], _greedy(3), tenant="A")
            for i in range(6)
        ]
        scoring = [GenerationRequest(f"y{i}", list(range(100, 130)), SamplingParams(max_tokens=0)) for i in range(20)]
        alone = [_collect(engine, [r])[0]["tokens"] for r in [stream, *long]]
        recording.between = [0]
        results = _collect(engine, [stream, *long, *scoring], stagger=0.01)
    finally:
        engine.close()
    assert all(r["error"] is None for r in results)
    assert [r["tokens"] for r in results[: 1 + len(long)]] == alone
    assert max(recording.between) <= 64  # no pass between two steps prefilled more than the budget
    assert sum(recording.between) >= 6 * 150  # and the prompts were prefilled in chunks, not token by token


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_is_scored_in_chunks_beside_running_streams(tiny_model_dir: Path, max_tokens: int) -> None:
    """A completion with echo and logprobs is scored chunk by chunk (and token by token within the
    steps) while a stream decodes: the same prompt log-probabilities as in one piece, then the same tokens."""
    recording = _Recording(_runner(tiny_model_dir, slots=4))
    engine = LocalEngine(
        lambda: recording,  # type: ignore[arg-type, return-value]
        tokenizer=_FakeTokenizer(),
        model_id="tiny",
        max_prefill_tokens=16,
    )
    try:
        stream = GenerationRequest("s", [1, 2, 3], _greedy(80), tenant="B")
        prompt = [100 + (11 * j) % 700 for j in range(120)]
        echo = GenerationRequest("e", prompt, _greedy(max_tokens, logprobs=2, prompt_logprobs=True), tenant="A")
        alone = _collect(engine, [echo])[0]
        recording.between = [0]
        together = _collect(engine, [stream, echo], stagger=0.02)[1]
    finally:
        engine.close()
    assert max(recording.between) <= 16  # it was scored in chunks (alone, 120 tokens go in one piece)
    for result in (alone, together):
        assert result["error"] is None and result["prompt"].tokens == prompt
        assert len(result["prompt"].logprobs) == len(prompt) and result["prompt"].logprobs[0] is None
    a, b = alone["prompt"], together["prompt"]
    assert max(abs(x - y) for x, y in zip(a.logprobs[1:], b.logprobs[1:], strict=True)) < 1e-4
    assert [[t for t, _ in top] for top in a.top_logprobs[1:]] == [[t for t, _ in top] for top in b.top_logprobs[1:]]
    assert together["tokens"] == alone["tokens"] and len(alone["tokens"]) == max_tokens


def test_a_row_preempted_while_its_prompt_is_scored_is_scored_once(tiny_model_dir: Path) -> None:
    """A's echo request is preempted mid-prompt by B; it resumes and answers its prompt's scores
    once, equal to those of a run alone, then its tokens."""
    engine = LocalEngine(
        _runner(tiny_model_dir, slots=2), tokenizer=_FakeTokenizer(), model_id="tiny", max_prefill_tokens=16
    )
    try:
        long_run = GenerationRequest("a0", [5, 6, 7], _greedy(200), tenant="A")
        prompt = [100 + (13 * j) % 700 for j in range(300)]
        echo = GenerationRequest("a1", prompt, _greedy(3, logprobs=1, prompt_logprobs=True), tenant="A")
        victim = GenerationRequest("b", [30, 31], _greedy(3), tenant="B")
        alone = _collect(engine, [echo])[0]

        async def when_full() -> None:
            while engine.stats()["batch_size"] < 2:
                await asyncio.sleep(0.001)

        results = _collect(engine, [long_run, echo, victim], stagger=0.01, before_last=when_full)
    finally:
        engine.close()
    assert engine.preemptions >= 1 and all(r["error"] is None for r in results)
    scored = results[1]
    assert scored["prompt"].tokens == prompt and len(scored["prompt"].logprobs) == len(prompt)
    assert (
        max(abs(x - y) for x, y in zip(alone["prompt"].logprobs[1:], scored["prompt"].logprobs[1:], strict=True)) < 1e-4
    )
    assert scored["tokens"] == alone["tokens"]


def test_a_dead_engine_refuses_work_at_once_and_says_so(tiny_model_dir: Path) -> None:
    died = threading.Event()
    engine = LocalEngine(
        _runner(tiny_model_dir), tokenizer=_FakeTokenizer(), model_id="tiny", on_death=lambda e: died.set()
    )

    def crash() -> bool:
        raise RuntimeError("a bug in the loop")

    engine._loop_once = crash  # type: ignore[method-assign]
    engine.call(lambda: 1)  # wakes the thread; its next pass dies
    assert died.wait(10) and not engine.alive() and engine.died is not None

    async def submit() -> None:
        engine.submit(GenerationRequest("late", [1, 2], _greedy(2)))

    with pytest.raises(EngineUnavailable):
        asyncio.run(submit())
