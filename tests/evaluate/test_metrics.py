"""Answer metrics, table-driven: each case is (prediction, reference, expected)."""

from __future__ import annotations

import pytest

from loraforge.evaluate.metrics import exact_match, is_valid_json, matches_regex, rouge_l, token_f1

EXACT = [
    ("Paris", "Paris", 1.0),
    ("  paris. ", "Paris", 1.0),  # case, punctuation and whitespace do not count
    ("The Eiffel Tower", "Eiffel tower", 1.0),  # articles do not count
    ("Paris, France", "Paris", 0.0),
    ("", "", 1.0),
    ("", "Paris", 0.0),
]

F1 = [
    ("the cat sat", "the cat sat", 1.0),
    ("cat sat on mat", "cat sat", 2 * (2 / 4) * 1.0 / (2 / 4 + 1.0)),  # P = 1/2, R = 1
    ("dog", "cat", 0.0),
    ("cat cat cat", "cat", 2 * (1 / 3) * 1.0 / (1 / 3 + 1.0)),  # counts are clipped
    ("", "", 1.0),
    ("", "cat", 0.0),
]

# (candidate, reference, F1 of LCS-precision and LCS-recall); articles are dropped before matching
ROUGE_L = [
    ("a b c d", "a b c d", 1.0),
    ("police kill the gunman", "police killed the gunman", 2 / 3),  # Lin (2004): LCS "police gunman"
    ("the gunman kill police", "police killed the gunman", 1 / 3),  # order matters: LCS of one token
    ("w x y z", "w y", 2 * 0.5 * 1.0 / 1.5),  # P = 2/4, R = 2/2
    ("x y z", "a b c", 0.0),
    ("", "", 1.0),
]


@pytest.mark.parametrize(("pred", "ref", "expected"), EXACT)
def test_exact_match(pred: str, ref: str, expected: float) -> None:
    assert exact_match(pred, ref) == expected


@pytest.mark.parametrize(("pred", "ref", "expected"), F1)
def test_token_f1(pred: str, ref: str, expected: float) -> None:
    assert token_f1(pred, ref) == pytest.approx(expected)


@pytest.mark.parametrize(("pred", "ref", "expected"), ROUGE_L)
def test_rouge_l(pred: str, ref: str, expected: float) -> None:
    assert rouge_l(pred, ref) == pytest.approx(expected)


CHECKS = [
    (matches_regex, ("2024-05-01", r"\d{4}-\d{2}-\d{2}"), 1.0),
    (matches_regex, ("on 2024-05-01", r"\d{4}-\d{2}-\d{2}"), 0.0),  # the whole answer must match
    (matches_regex, ("  YES \n", r"YES|NO"), 1.0),
    (is_valid_json, ('{"a": 1}',), 1.0),
    (is_valid_json, ('```json\n{"a": [1, 2]}\n```',), 1.0),
    (is_valid_json, ("{'a': 1}",), 0.0),
    (is_valid_json, ('Sure! {"a": 1}',), 0.0),
]


@pytest.mark.parametrize(("fn", "args", "expected"), CHECKS)
def test_declared_checks(fn, args, expected) -> None:  # type: ignore[no-untyped-def]
    assert fn(*args) == expected
