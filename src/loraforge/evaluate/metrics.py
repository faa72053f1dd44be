"""Answer metrics for generated text: exact match, token F1, ROUGE-L, and the checks a dataset declares.

Normalisation follows SQuAD's evaluation script: lower case, punctuation and the articles
"a", "an", "the" removed, whitespace collapsed. Every metric returns a number in [0, 1].
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "‘’“”–—…")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD's normalisation)."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over normalised tokens (bags, with counts).

    Two empty answers agree (1.0); one empty answer against a non-empty one scores 0.0.
    """
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_tokens(pred: list[str], ref: list[str]) -> float:
    """ROUGE-L F1 (β = 1) of two token lists: LCS-based precision and recall."""
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalised tokens."""
    return rouge_l_tokens(answer_tokens(prediction), answer_tokens(reference))


def matches_regex(prediction: str, pattern: str) -> float:
    """1.0 when the whole answer (stripped) matches ``pattern`` (``re.fullmatch``, DOTALL)."""
    return float(re.fullmatch(pattern, prediction.strip(), flags=re.DOTALL) is not None)


def is_valid_json(prediction: str) -> float:
    """1.0 when the answer parses as JSON; a single surrounding Markdown code fence is allowed."""
    text = prediction.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fence:
        text = fence.group(1)
    try:
        json.loads(text)
    except ValueError:
        return 0.0
    return 1.0
