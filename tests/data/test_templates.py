"""Masks against the real chat template: exactly the assistant content and its end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.data.formats import Example, Message, load_dataset
from loraforge.data.templates import IGNORE_INDEX, tokenize_all, tokenize_example

EOT = "<|im_end|>"


def _labelled_text(tokenizer, tok) -> str:  # type: ignore[no-untyped-def]
    return str(tokenizer.decode([i for i, lab in zip(tok.input_ids, tok.labels, strict=True) if lab != IGNORE_INDEX]))


def _labelled_runs(tok) -> list[list[int]]:  # type: ignore[no-untyped-def]
    runs: list[list[int]] = []
    current: list[int] = []
    for i, lab in zip(tok.input_ids, tok.labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == i
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


FORMAT_FILES = [
    (
        "chat.jsonl",
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris, of course."},
                ]
            }
        ),
        ["Paris, of course."],
    ),
    (
        "alpaca.jsonl",
        json.dumps({"instruction": "Add", "input": "2 and 3", "output": "The sum is 5."}),
        ["The sum is 5."],
    ),
    ("completion.jsonl", json.dumps({"prompt": "Name a colour", "completion": "Blue"}), ["Blue"]),
    ("data.csv", 'user,assistant\n"Hello, there","General Kenobi!"\n', ["General Kenobi!"]),
]


@pytest.mark.parametrize(("name", "text", "answers"), FORMAT_FILES)
def test_mask_covers_exactly_assistant_content_and_end_of_turn(
    tmp_path: Path,
    tokenizer,
    name: str,
    text: str,
    answers: list[str],  # type: ignore[no-untyped-def]
) -> None:
    path = tmp_path / name
    path.write_text(text + "\n", encoding="utf-8")
    result = load_dataset(path)
    assert not result.problems
    tok = tokenize_example(tokenizer, result.examples[0], 1024)
    assert tok is not None
    runs = _labelled_runs(tok)
    assert [tokenizer.decode(r) for r in runs] == [a + EOT for a in answers]
    # the end-of-turn token is the last labelled token of every run, and nothing after it is labelled
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    assert all(r[-1] == eot_id for r in runs)
    # the labelled text is exactly a suffix-free slice of the rendered conversation
    rendered = tokenizer.decode(tok.input_ids)
    assert all(a + EOT in rendered for a in answers)


def test_weight_zero_turn_is_context_only(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ex = Example(
        (
            Message("user", "First?"),
            Message("assistant", "Old answer.", weight=0),
            Message("user", "Second?"),
            Message("assistant", "New answer."),
        ),
        "x.jsonl",
        1,
    )
    tok = tokenize_example(tokenizer, ex, 1024)
    assert tok is not None
    assert _labelled_text(tokenizer, tok) == "New answer." + EOT
    assert "Old answer." in tokenizer.decode(tok.input_ids)


def test_multi_turn_labels_every_trained_turn(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ex = Example(
        (
            Message("user", "a?"),
            Message("assistant", "A."),
            Message("user", "b?"),
            Message("assistant", "B."),
        ),
        "x",
        1,
    )
    tok = tokenize_example(tokenizer, ex, 1024)
    assert tok is not None
    assert [tokenizer.decode(r) for r in _labelled_runs(tok)] == ["A." + EOT, "B." + EOT]


def test_overlong_truncate_and_drop(tokenizer) -> None:  # type: ignore[no-untyped-def]
    long = Example((Message("user", "word " * 10), Message("assistant", "ok " * 80)), "x", 7)
    tok = tokenize_example(tokenizer, long, 80, "truncate")
    assert tok is not None and tok.truncated and len(tok.input_ids) == 80 and tok.num_trained > 0
    assert tokenize_example(tokenizer, long, 80, "drop") is None
    # truncation that cuts away every trained token drops the example
    assert tokenize_example(tokenizer, long, 40, "truncate") is None
    kept, truncated, dropped = tokenize_all(tokenizer, [long, long], 80, "truncate")
    assert (len(kept), truncated, dropped) == (2, 2, 0)
