"""`data check` semantics: refusal below 10 examples, warnings, duplicates, suggested epochs."""

from __future__ import annotations

import pytest

from loraforge.data.validate import check_dataset, suggest_epochs
from tests.conftest import chat


@pytest.mark.parametrize(
    ("n", "epochs"),
    [(1, 25), (10, 10), (20, 5), (33, 3), (34, 3), (100, 3), (8333, 3), (8334, 2), (12500, 2), (30000, 1)],
)
def test_suggested_epochs_follow_openai_heuristic(n: int, epochs: int) -> None:
    assert suggest_epochs(n) == epochs


def test_too_few_examples_refused(write_jsonl) -> None:  # type: ignore[no-untyped-def]
    report = check_dataset(write_jsonl([chat(f"q{i}", f"a{i}") for i in range(9)]), None)
    assert not report.ok
    assert [p.code for p in report.errors] == ["too_few_examples"]


def test_few_examples_warned_and_duplicates_flagged(write_jsonl, tokenizer) -> None:  # type: ignore[no-untyped-def]
    records = [chat(f"question {i}", f"answer {i}") for i in range(12)] + [chat("Question  0", "answer 0")]
    report = check_dataset(write_jsonl(records), tokenizer)
    assert report.ok
    codes = [(p.code, p.line) for p in report.warnings]
    assert ("few_examples", 0) in codes
    assert ("duplicate_example", 13) in codes
    s = report.summary()
    assert s["examples"] == 13 and s["usable_examples"] == 13
    assert s["suggested_epochs"] == 7
    assert sum(c for _, _, c in s["histogram"]) == 13


def test_overlong_examples_are_counted(write_jsonl, tokenizer) -> None:  # type: ignore[no-untyped-def]
    records = [chat(f"q{i}", f"a{i}") for i in range(10)] + [
        chat("long " * 300, "x"),
        chat("y", "long " * 300),
    ]
    dropped = check_dataset(write_jsonl(records), tokenizer, max_length=128, overlong="drop")
    assert (dropped.truncated, dropped.dropped) == (0, 2)
    truncated = check_dataset(write_jsonl(records), tokenizer, max_length=128, overlong="truncate")
    # the first long one loses every trained token to truncation, so it is dropped
    assert (truncated.truncated, truncated.dropped) == (1, 1)
    assert [p.line for p in truncated.warnings if p.code == "too_long"] == [11, 12]


def test_everything_dropped_is_refused(write_jsonl, tokenizer) -> None:  # type: ignore[no-untyped-def]
    records = [chat(f"q{i} " + "long " * 200, f"a{i}") for i in range(12)]
    report = check_dataset(write_jsonl(records), tokenizer, max_length=64, overlong="drop")
    assert not report.ok
    assert [p.code for p in report.errors] == ["too_few_examples"]
    assert "left after applying the context length" in report.errors[0].message
