"""What every suite shares: the two models under test, prompts, and scores with intervals.

The two sides are the base model and the base model with the adapter merged into its weights
(``W0 + (α/r)·BA``, PEFT's ``merge_and_unload``): the same tokenizer and prompts, and no LoRA
detour at run time, so both sides cost the same. Greedy generations are cached per side and
prompt, so suites that ask the same question (task answers reused for memorization) pay once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from loraforge.data.templates import render
from loraforge.evaluate.scoring import BranchScore, Tree, generate_greedy, score_trees
from loraforge.evaluate.stats import Estimate, Statistic, bootstrap_ci, paired_bootstrap

Side = Literal["base", "adapter"]
SIDES: tuple[Side, Side] = ("base", "adapter")


@dataclass
class ModelPair:
    """The base model, the adapted model and their tokenizer; each call names the side it runs on."""

    base: Any
    adapter: Any
    tokenizer: Any
    row_tokens: int = 1024
    batch_size: int = 32
    _generated: dict[tuple[Side, tuple[int, ...], int], list[int]] = field(default_factory=dict, repr=False)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_prompt(self, user: str, *, system: str | None = None) -> list[int]:
        """Token ids of a one-turn chat up to the start of the assistant's answer."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.encode(render(self.tokenizer, messages, generation_prompt=True))

    def model(self, side: Side) -> Any:
        return self.base if side == "base" else self.adapter

    def score(self, side: Side, trees: Sequence[Tree]) -> list[list[BranchScore]]:
        return score_trees(self.model(side), trees, row_tokens=self.row_tokens)

    def generate(self, side: Side, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (token ids, cut at end-of-sequence), cached per side and prompt."""
        keys = [(side, tuple(p), max_new_tokens) for p in prompts]
        todo = sorted({k for k in keys if k not in self._generated}, key=lambda k: keys.index(k))
        if todo:
            eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            eos = eos if isinstance(eos, int) and eos != self.tokenizer.unk_token_id else self.tokenizer.eos_token_id
            outs = generate_greedy(
                self.model(side),
                [list(k[1]) for k in todo],
                max_new_tokens=max_new_tokens,
                eos_token_id=int(eos),
                pad_token_id=int(self.tokenizer.pad_token_id),
                batch_size=self.batch_size,
            )
            self._generated.update(zip(todo, outs, strict=True))
        return [self._generated[k] for k in keys]

    def generate_text(self, side: Side, prompts: Sequence[list[int]], max_new_tokens: int) -> list[str]:
        return [
            str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()
            for ids in self.generate(side, prompts, max_new_tokens)
        ]


Direction = Literal["higher", "lower", "neither"]


@dataclass
class Metric:
    """One score on both sides with its interval, and the paired delta (adapter − base).

    ``unit`` is ``%`` for rates (points), or the measure's own unit (``nats/token``, ``bits``).
    ``better`` says which direction is an improvement ("neither": closer to a reference such as
    50% is better, or it is a signal, not a quality).
    """

    id: str
    label: str
    unit: str
    better: Direction
    base: Estimate
    adapter: Estimate
    delta: Estimate
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "unit": self.unit,
            "better": self.better,
            "base": self.base.to_json(),
            "adapter": self.adapter.to_json(),
            "delta": self.delta.to_json(),
            "note": self.note,
        }


def compare(
    id: str,
    label: str,
    base: Sequence[float] | np.ndarray,
    adapter: Sequence[float] | np.ndarray,
    *,
    unit: str = "%",
    better: Direction = "higher",
    note: str = "",
    statistic: Statistic | None = None,
    seed: int = 0,
) -> Metric:
    """Score per item on both sides → a :class:`Metric`. Rates (unit ``%``) take 0/1 values and are scaled ×100."""
    kwargs: dict[str, Any] = {"seed": seed} | ({"statistic": statistic} if statistic else {})
    b, a = bootstrap_ci(base, **kwargs), bootstrap_ci(adapter, **kwargs)
    d = paired_bootstrap(base, adapter, **kwargs)
    if unit == "%":
        b, a, d = b.scaled(100), a.scaled(100), d.scaled(100)
    return Metric(id, label, unit, better, b, a, d, note)


@dataclass
class SuiteResult:
    """What one suite found: its metrics, side-by-side samples, and what it ran on."""

    name: str
    metrics: list[Metric] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def metric(self, id: str) -> Metric | None:
        return next((m for m in self.metrics if m.id == id), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metrics": [m.to_json() for m in self.metrics],
            "samples": self.samples,
            "details": self.details,
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
        }


def timed(run: Callable[[], SuiteResult]) -> SuiteResult:
    start = time.perf_counter()
    result = run()
    result.seconds = time.perf_counter() - start
    return result


def pick_choice(scores: list[BranchScore]) -> int:
    """The choice with the highest mean log-probability per token (length-normalised)."""
    return int(np.argmax([s.mean for s in scores]))
