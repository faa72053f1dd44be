"""Pacing: while another tenant's rows decode, a tenant's work between steps takes on average no
more than its allowance per step, and always moves on."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from loraforge.serve.generation import GenerationRequest, SamplingParams
from loraforge.serve.pacing import Pacer
from tests.serve.test_engine import _runner
from tests.serve.test_scheduler import _collect, _Recording, recording_engine


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _pacer(**steps: float) -> tuple[Pacer, _Clock]:
    """A pacer (pace 1.5, a fifth of a step at least) that has measured steps of these sizes
    (``rows1=0.010``: a step of one row took 10 ms) for nobody in particular."""
    clock = _Clock()
    pacer = Pacer(pace=1.5, min_share=0.2, clock=clock)
    for size, seconds in steps.items():
        pacer.record_step(Counter(nobody=int(size.removeprefix("rows"))), seconds)
    pacer.usage.clear()
    return pacer, clock


def test_a_tenant_alone_is_not_paced() -> None:
    pacer, _ = _pacer(rows1=0.010)
    pacer.record_step(Counter(A=3), 0.030)
    assert pacer.plan(Counter(A=3), ["A"]) == set()
    assert pacer.paced == {} and pacer.debt == {}  # its own streams are its own business
    pacer.charge(5.0, Counter(A=100))
    assert pacer.debt == {}
    assert pacer.tokens_for("A", 0.001, 16) is None


@pytest.mark.parametrize(
    ("steps", "others", "expected"),
    [
        ({"rows1": 0.010}, 1, 0.005),  # half of a step of one row alone
        ({"rows1": 0.010, "rows7": 0.012}, 1, 0.005),
        ({"rows1": 0.010, "rows7": 0.200}, 1, None),  # shared steps are very long: a fifth of a step
        ({"rows2": 0.012}, 1, 0.006),  # no measurement at one row: the nearest size above
        ({"rows1": 0.010, "rows2": 0.012, "rows4": 0.016}, 3, 0.006),  # at three rows: the nearest size below
    ],
)
def test_the_allowance_keeps_lighter_streams_near_their_own_pace(
    steps: dict[str, float], others: int, expected: float | None
) -> None:
    pacer, _ = _pacer(**steps)
    step = pacer.step_s or 0.0
    want = expected if expected is not None else 0.2 * step
    assert pacer.allowance(others) == pytest.approx(want)
    assert pacer.allowance(others) >= 0.2 * step  # the paced tenant always moves on


def test_only_the_heavier_tenant_is_paced_and_it_pays_back_what_it_took() -> None:
    pacer, clock = _pacer(rows1=0.010)  # allowance: 5 ms a step
    pacer.record_step(Counter(A=6, B=1), 0.014)  # A has used more of the engine than B
    assert pacer.plan(Counter(A=6, B=1), ["A"]) == set()
    assert set(pacer.paced) == {"A"} and pacer.paced["A"] == pytest.approx(0.005)
    assert pacer.tokens_for("B", 0.0005, 16) is None  # the lighter tenant's work is never held back
    assert pacer.tokens_for("A", 0.0005, 16) == 16  # ten tokens' time, but a chunk is at least 16
    assert pacer.tokens_for("A", 0.0001, 16) == 50
    pacer.charge(0.020, Counter(A=30, B=10))  # 20 ms for 40 tokens: A owes 15 ms, B nothing
    assert pacer.debt == {"A": pytest.approx(0.015)}
    waits = []
    for _ in range(4):
        clock.now += 0.01
        waits.append(pacer.plan(Counter(B=1), ["A"]))
    assert waits == [{"A"}, {"A"}, set(), set()]  # 15 ms owed: two steps wait, the third pays the rest
    assert pacer.tokens_for("A", 0.0001, 16) == 50


def test_a_heavier_tenants_rows_owe_what_they_add_to_the_lighter_tenants_step() -> None:
    pacer, _ = _pacer(rows1=0.010)
    pacer.record_step(Counter(A=6, B=1), 0.020)
    pacer.plan(Counter(A=6, B=1), [])
    pacer.record_step(Counter(A=6, B=1), 0.024)  # 14 ms more than B's row alone
    assert pacer.debt["A"] == pytest.approx(0.014)
    assert "B" not in pacer.debt


def test_a_tenant_that_just_left_still_counts_then_is_forgotten() -> None:
    pacer, clock = _pacer(rows1=0.010)
    pacer.record_step(Counter(A=6, B=1), 0.020)
    pacer.plan(Counter(A=6, B=1), [])
    clock.now += 0.3  # B's stream ended; its client sends the next request at once
    pacer.plan(Counter(A=6), [])
    assert "A" in pacer.paced
    clock.now += 0.5  # B is gone: A is alone
    pacer.plan(Counter(A=6), [])
    assert pacer.paced == {} and pacer.debt == {}


def test_a_queued_request_of_a_lighter_tenant_paces_the_heavier_one() -> None:
    pacer, _ = _pacer(rows1=0.010)
    pacer.record_step(Counter(A=6), 0.020)
    pacer.plan(Counter(A=6), ["B"])  # B's first request waits for a slot
    assert "A" in pacer.paced


def test_over_many_steps_a_paced_tenant_takes_no_more_than_the_lighter_one() -> None:
    """A tenant with long prompts beside one stream (10 ms a step): while it has used more, it gets
    its allowance; below, it is not paced; so it ends up with about the stream's share, no more."""
    pacer, clock = _pacer(rows1=0.010)
    pacer.record_step(Counter(A=1, B=1), 0.010)
    spent = 0.0
    steps = 2000
    for _ in range(steps):
        clock.now += 0.015
        if not pacer.plan(Counter(B=1), ["A"]):
            pacer.charge(0.033, Counter(A=64))  # a chunk of 33 ms each time it may work
            spent += 0.033
        pacer.record_step(Counter(B=1), 0.010)
    assert 0.005 <= spent / steps <= 0.010 * 1.1  # unpaced: 33 ms every step


class _Slow(_Recording):
    """A runner whose prompt tokens are dear next to a decode step: 2 ms each against a 4 ms step."""

    def prefill(self, slot: int, tokens: list[int], *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.002 * len(tokens))
        return super().prefill(slot, tokens, *args, **kwargs)

    def prefill_many(self, slots: Any, prompts: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.002 * sum(len(p) for p in prompts))
        return super().prefill_many(slots, prompts, *args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.004)
        return super().decode(*args, **kwargs)


def test_a_flood_of_long_prompts_leaves_most_steps_free_for_another_tenants_stream(tiny_model_dir: Path) -> None:
    """Tenant A's long prompts cost far more than its allowance: while B streams, most gaps between
    two steps hold none of A's chunks, yet every request finishes with the tokens it gets alone."""
    recording = _Slow(_runner(tiny_model_dir, slots=4))
    engine = recording_engine(recording, max_prefill_tokens=64)
    try:
        stream = GenerationRequest(
            "s", [1, 2, 3], SamplingParams(max_tokens=80, min_tokens=80, temperature=0), tenant="B"
        )
        long = [
            GenerationRequest(
                f"x{i}",
                [100 + (7 * i + j) % 900 for j in range(120)],
                SamplingParams(max_tokens=2, temperature=0),
                tenant="A",
            )
            for i in range(3)
        ]
        alone = [_collect(engine, [r])[0]["tokens"] for r in [stream, *long]]
        recording.between, base = [0], engine.steps
        results = _collect(engine, [stream, *long], stagger=0.05)
        paced = engine.pacer
    finally:
        engine.close()
    assert all(r["error"] is None for r in results)
    assert [r["tokens"] for r in results] == alone
    first = results[0]["first_step"] - base
    during = recording.between[first : first + 60]  # the gaps while B streams and A's prompts wait
    assert len(during) == 60
    busy = sum(1 for tokens in during if tokens)
    assert busy < len(during) / 3, str(recording.between)  # unpaced, nearly every gap held a chunk of A's
    assert paced.step_s is not None and paced.step_by_size
