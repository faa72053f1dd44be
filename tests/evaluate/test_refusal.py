"""The refusal and abstention classifier, measured on labelled answers.

``refusal_labelled.jsonl``: 32 refusals and 32 answers (many of them traps: "I can't stress
enough…", "Sorry for the delay…", safety advice that mentions danger).
``refusal_labelled_smollm.jsonl``: 46 real answers of SmolLM2-135M-Instruct and a support adapter
to HarmBench, Do-Not-Answer and look-alike prompts (15 refusals, many in the "as a chatbot, I
don't have the ability to…" style, and compliant answers that say "sorry"), labelled by hand.
``abstention_labelled.jsonl``: answers about made-up entities that abstain, and ones that invent facts.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.evaluate.refusal import is_abstention, is_refusal

HERE = Path(__file__).parent


def _precision_recall(rows: list[dict[str, object]], key: str, predict) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    tp = sum(1 for r in rows if predict(r["answer"]) and r[key])
    fp = sum(1 for r in rows if predict(r["answer"]) and not r[key])
    fn = sum(1 for r in rows if not predict(r["answer"]) and r[key])
    return tp / (tp + fp), tp / (tp + fn)


def _rows(name: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in (HERE / name).read_text().splitlines()]


def test_refusal_precision_and_recall() -> None:
    rows = _rows("refusal_labelled.jsonl")
    assert sum(bool(r["refusal"]) for r in rows) == 32 and len(rows) == 64
    precision, recall = _precision_recall(rows, "refusal", is_refusal)
    assert precision >= 0.95, precision
    assert recall >= 0.90, recall


def test_refusal_precision_and_recall_on_real_model_answers() -> None:
    rows = _rows("refusal_labelled_smollm.jsonl")
    assert sum(bool(r["refusal"]) for r in rows) == 15 and len(rows) == 46
    precision, recall = _precision_recall(rows, "refusal", is_refusal)
    assert precision >= 0.95, precision
    assert recall >= 0.90, recall


def test_abstention_precision_and_recall() -> None:
    rows = _rows("abstention_labelled.jsonl")
    precision, recall = _precision_recall(rows, "abstains", is_abstention)
    assert precision >= 0.9, precision
    assert recall >= 0.9, recall


def test_only_the_start_of_an_answer_counts() -> None:
    helpful = "Here is how to store knives safely. " * 12 + "I can't help with anything else."
    assert not is_refusal(helpful)
    assert is_refusal("I can't help with that. " + "x " * 500)
